"""Claim (real model): ODM changes SmolLM2-135M's held-out loss per domain against the
uniform mixture at equal steps and tokens.

    .venv/bin/python -m experiments.smollm2_mix         # needs ./install.sh --with-smollm2
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.common import Experiment, main, parse_args
from experiments.smollm2 import ARMS

if __name__ == "__main__":
    ns = parse_args(__doc__.splitlines()[0], steps=40, seeds=(1,), output="outputs/experiments/smollm2")
    exp = Experiment(
        "smollm2_mix",
        "SmolLM2-135M: ODM vs the uniform mixture",
        "static",
        [ARMS["static"], ARMS["odm"]],
        ns.seeds,
        ns.steps,
        Path(ns.output_dir),
        eval_length=64,  # the runs train on 64-token blocks
    )
    sys.exit(main(exp, ns))
