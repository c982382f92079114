"""Claim (real model): a composed run (ODM mixing + reducible-loss weighting) against the
uniform mixture, at equal steps and tokens.

    .venv/bin/python -m experiments.smollm2_compose     # needs ./install.sh --with-smollm2
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.common import Experiment, main, parse_args
from experiments.smollm2 import ARMS

if __name__ == "__main__":
    ns = parse_args(__doc__.splitlines()[0], steps=40, seeds=(1,), output="outputs/experiments/smollm2")
    arms = [ARMS["static"], ARMS["odm"], ARMS["odm+reducible"]]
    exp = Experiment(
        "smollm2_compose",
        "SmolLM2-135M: ODM + reducible weights vs the uniform mixture",
        "static",
        arms,
        ns.seeds,
        ns.steps,
        Path(ns.output_dir),
        eval_length=64,  # the runs train on 64-token blocks
    )
    sys.exit(main(exp, ns))
