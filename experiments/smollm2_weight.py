"""Claim (real model): reducible-loss weights (RHO-LOSS as weights; the reference model is
the uniform-mixture run of the same seed) change SmolLM2-135M's held-out loss against
uniform weights at equal steps and tokens.

The baseline is the ``random_select`` run of ``smollm2_target``: random selection serves a
uniformly random stream of the pool with weight 1, which is what uniform weights on the
Trainer's own shuffled pool are (a separate run would cost ten minutes on 2 cores to
measure the same distribution).

    .venv/bin/python -m experiments.smollm2_weight      # needs ./install.sh --with-smollm2
"""

from __future__ import annotations

import sys
from dataclasses import replace

from experiments.smollm2 import ARMS, run

if __name__ == "__main__":
    sys.exit(
        run(
            "smollm2_weight",
            "SmolLM2-135M: reducible-loss weights vs uniform weights",
            "random_select",
            [replace(ARMS["static"], evaluate=False), ARMS["random_select"], ARMS["reducible"]],
            doc=__doc__,
        )
    )
