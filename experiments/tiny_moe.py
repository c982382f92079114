"""Claim: Dynamic Mixture (router-based domain weights) changes the held-out loss of the
tiny MoE model against the uniform mixture.

    .venv/bin/python -m experiments.tiny_moe            # 3 seeds, 150 steps

Arms: ``static_moe`` (``examples/mix_dynamic_moe.yaml`` with the static uniform mixture,
the baseline) and ``dynamic_moe``. Both train the built-in tiny Qwen2-MoE (SFT rows, the
router trained in both: freezing it, as the paper did, would leave the arms unequal). Metric: the mean held-out response loss of the
learnable domains.
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.common import Arm, Experiment, main, parse_args

ARMS = [
    Arm("static_moe", "mix_dynamic_moe.yaml", datasteer={"paradigm": "mix", "algorithm": "static"}, stage="sft"),
    Arm("dynamic_moe", "mix_dynamic_moe.yaml", ("datasteer.params.freeze_router=false",), stage="sft"),
]

if __name__ == "__main__":
    ns = parse_args(__doc__.splitlines()[0], steps=150)
    exp = Experiment(
        "tiny_moe",
        "Dynamic Mixture vs the uniform mixture (tiny MoE)",
        "static_moe",
        ARMS,
        ns.seeds,
        ns.steps,
        Path(ns.output_dir),
    )
    sys.exit(main(exp, ns))
