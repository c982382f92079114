"""Claim: the targeted selectors, given the arithmetic evaluation set as targets, lower
the held-out arithmetic loss and raise arithmetic accuracy against random selection.

    .venv/bin/python -m experiments.tiny_target         # 3 seeds, 150 steps

Arms: ``random_lora`` (the baseline), ``less``, ``cluster_less``, ``near``, ``tsds`` (its
neighbour lists prepared per seed with ``datasteer prepare tsds``) and ``greats_target``
(GREATS, ``examples/select_greats.yaml``: 8 of 16 candidates every step, the validation
gradient from 8 target rows drawn per step; ``greats_target_80``: 8 of 80 candidates). Every arm trains LoRA
adapters at learning rate 5e-3, as the LESS examples do: with all parameters trained,
LESS's per-sample gradients of the whole model took 25-30 s per batch of 8 on busy cores,
15 updates of 512 candidates far beyond a few minutes. The targets are
``arithmetic_eval``; the metric is measured on the same held-out rows (the targets are
the held-out set, as in LESS's setup), plus the other domains to show what it costs.
"""

from __future__ import annotations

import sys

from experiments.common import Arm, run_experiment

LORA = ("finetuning_type=lora", "lora_target=all", "lora_rank=8", "learning_rate=5.0e-3")
ARMS = [
    Arm("random_lora", "select_random.yaml", LORA),
    Arm("less", "select_less.yaml", LORA),
    Arm("cluster_less", "select_cluster_less.yaml", LORA),
    Arm("near", "select_near.yaml", LORA),
    Arm("tsds", "select_tsds.yaml", LORA, prepare="tsds"),
    Arm("greats_target", "select_greats.yaml", LORA),  # not "greats": tiny_select's arm of that name
    Arm("greats_target_80", "select_greats.yaml", (*LORA, "datasteer.params.fraction=0.1")),
]

if __name__ == "__main__":
    sys.exit(
        run_experiment(
            "tiny_target",
            "Targeted selectors (target: arithmetic) vs random selection",
            "random_lora",
            ARMS,
            doc=__doc__,
            target="arithmetic",
        )
    )
