"""Claim (real model): ODM changes SmolLM2-135M's held-out loss per domain against the
uniform mixture at equal steps and tokens.

    .venv/bin/python -m experiments.smollm2_mix         # needs ./install.sh --with-smollm2
"""

from __future__ import annotations

import sys

from experiments.smollm2 import ARMS, run

if __name__ == "__main__":
    sys.exit(
        run(
            "smollm2_mix",
            "SmolLM2-135M: ODM vs the uniform mixture",
            "static",
            [ARMS["static"], ARMS["odm"]],
            doc=__doc__,
        )
    )
