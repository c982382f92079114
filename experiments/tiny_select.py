"""Claim: the untargeted selectors change what the tiny model learns against random
selection, at equal steps and tokens.

    .venv/bin/python -m experiments.tiny_select         # 3 seeds, 150 steps

Arms: ``random`` (the baseline), ``loss`` (focus: high), ``delta_loss``, and the template
``custom`` selector (``examples/custom_selector.py``: arithmetic and code in equal shares).
Metric: the mean held-out loss of the three learnable domains.
"""

from __future__ import annotations

import sys

from experiments.common import Arm, run_experiment

ARMS = [
    Arm("random_select", "select_random.yaml"),
    Arm("loss_select", "select_loss.yaml"),
    Arm("delta_loss", "select_delta_loss.yaml"),
    Arm("custom_select", "select_custom.yaml"),
]

if __name__ == "__main__":
    sys.exit(run_experiment("tiny_select", "Selectors vs random selection", "random_select", ARMS, doc=__doc__))
