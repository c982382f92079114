"""Claim (real model): a composed run (ODM mixing + reducible-loss weighting) against the
uniform mixture, at equal steps and tokens.

    .venv/bin/python -m experiments.smollm2_compose     # needs ./install.sh --with-smollm2
"""

from __future__ import annotations

import sys

from experiments.smollm2 import ARMS, run

if __name__ == "__main__":
    sys.exit(
        run(
            "smollm2_compose",
            "SmolLM2-135M: ODM + reducible weights vs the uniform mixture",
            "static",
            [ARMS["static"], ARMS["odm"], ARMS["odm+reducible"]],
            doc=__doc__,
        )
    )
