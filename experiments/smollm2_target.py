"""Claim (real model): NEAR, targeting the arithmetic evaluation set, lowers SmolLM2-135M's
held-out arithmetic loss against random selection at equal steps and tokens.

    .venv/bin/python -m experiments.smollm2_target      # needs ./install.sh --with-smollm2
"""

from __future__ import annotations

import sys

from experiments.smollm2 import ARMS, run

if __name__ == "__main__":
    sys.exit(
        run(
            "smollm2_target",
            "SmolLM2-135M: NEAR (target: arithmetic) vs random selection",
            "random_select",
            [ARMS["random_select"], ARMS["near"]],
            doc=__doc__,
            target="arithmetic",
        )
    )
