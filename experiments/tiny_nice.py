"""Claim: NICE, rewarded by exact match on the arithmetic prompts, lowers the arithmetic
response loss and raises its accuracy against random selection (SFT, LoRA).

    .venv/bin/python -m experiments.tiny_nice           # 3 seeds, 150 steps

Arms: ``random_sft`` (``examples/select_nice.yaml`` with ``algorithm: random``, the
baseline) and ``nice``. Both train LoRA adapters on the prompt/response rows with the same
template. Metric: the held-out arithmetic response loss; ``targets_without_signal`` in
each NICE record says how often no sampled answer was right (then the reference answer
stands in, and the update is LESS).
"""

from __future__ import annotations

import sys

from experiments.common import Arm, run_experiment

RANDOM = {"paradigm": "select", "algorithm": "random", "warmup_steps": 5, "update_every": 10}
ARMS = [
    Arm("random_sft", "select_nice.yaml", datasteer=RANDOM, stage="sft"),
    Arm("nice", "select_nice.yaml", stage="sft"),
]

if __name__ == "__main__":
    sys.exit(
        run_experiment(
            "tiny_nice",
            "NICE (target: arithmetic, SFT) vs random selection",
            "random_sft",
            ARMS,
            doc=__doc__,
            target="arithmetic",
        )
    )
