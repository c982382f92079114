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
from pathlib import Path

from experiments.common import Experiment, main, parse_args
from experiments.smollm2 import ARMS

if __name__ == "__main__":
    ns = parse_args(__doc__.splitlines()[0], steps=40, seeds=(1,), output="outputs/experiments/smollm2")
    arms = [
        replace(ARMS["static"], evaluate=False),
        ARMS["random_select"],
        ARMS["reducible"],
    ]
    exp = Experiment(
        "smollm2_weight",
        "SmolLM2-135M: reducible-loss weights vs uniform weights",
        "random_select",
        arms,
        ns.seeds,
        ns.steps,
        Path(ns.output_dir),
        eval_length=64,  # the runs train on 64-token blocks
    )
    sys.exit(main(exp, ns))
