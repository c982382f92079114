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

from experiments.common import Arm, run_experiment

ARMS = [
    Arm("static_moe", "mix_dynamic_moe.yaml", datasteer={"paradigm": "mix", "algorithm": "static"}, stage="sft"),
    Arm("dynamic_moe", "mix_dynamic_moe.yaml", ("datasteer.params.freeze_router=false",), stage="sft"),
]

if __name__ == "__main__":
    sys.exit(
        run_experiment("tiny_moe", "Dynamic Mixture vs the uniform mixture (tiny MoE)", "static_moe", ARMS, doc=__doc__)
    )
