"""Claim: the targeted selectors, given the arithmetic evaluation set as targets, lower
the held-out arithmetic loss and raise arithmetic accuracy against random selection.

    .venv/bin/python -m experiments.tiny_target         # 3 seeds, 150 steps

Arms: ``random`` (the baseline), ``less``, ``cluster_less``, ``near``, ``tsds`` (its
neighbour lists prepared per seed with ``datasteer prepare tsds``). Every arm trains all
parameters at learning rate 1e-3 (the LESS examples default to LoRA). The targets are
``arithmetic_eval``; the metric is measured on the same held-out rows (the targets are
the held-out set, as in LESS's setup), plus the other domains to show what it costs.
"""

from __future__ import annotations

import sys

from experiments.common import Arm, run_experiment

FULL = ("finetuning_type=full", "learning_rate=1.0e-3")
ARMS = [
    Arm("random_select", "select_random.yaml"),
    Arm("less", "select_less.yaml", FULL),
    Arm("cluster_less", "select_cluster_less.yaml", FULL),
    Arm("near", "select_near.yaml"),
    Arm("tsds", "select_tsds.yaml", prepare="tsds"),
]

if __name__ == "__main__":
    sys.exit(
        run_experiment(
            "tiny_target",
            "Targeted selectors (target: arithmetic) vs random selection",
            "random_select",
            ARMS,
            doc=__doc__,
            target="arithmetic",
        )
    )
