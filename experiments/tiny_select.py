"""Claim: the selectors change what the tiny model learns against random selection, at
equal steps and tokens.

    .venv/bin/python -m experiments.tiny_select         # 3 seeds, 150 steps

Arms: ``random`` (the baseline), ``loss`` (focus: high), ``delta_loss``, the template
``custom`` selector (``examples/custom_selector.py``: arithmetic and code in equal shares),
and two online batch selectors that choose every step's batch from a larger candidate
batch:

- ``rho_loss`` (RHO-LOSS, 8 of 80 candidates per step): its irreducible-loss (IL) model is
  step 1 of the example, ``rho_il``, trained on the held-out splits of the four domains,
  which are also the rows this experiment evaluates on (the IL model has seen them; the
  selected model never trains on them). ``rho_loss_static_il`` is the same selector with
  an IL model that never saw them: the uniform-mixture run of ``experiments.tiny_mix``
  (``static``, the same seed and steps; the reference of ``tiny_weight``'s ``reducible``),
  trained on the pool itself (one pass over about a fifth of it).
- ``greats`` (GREATS, 8 of 16 candidates per step, ``logra`` gradient features of the
  whole model): its validation gradient is the mean gradient of 16 rows drawn per step from
  the held-out splits of the three learnable domains, again the evaluated rows (as the
  targets of ``experiments.tiny_target``). ``greats_pool_targets`` draws those rows from the
  training rows of the learnable domains instead (pool rows: nothing held out is seen).

Metric: the mean held-out loss of the three learnable domains.
"""

from __future__ import annotations

import sys

from experiments.common import Arm, run_experiment

#: GREATS on the baseline's own config (full fine-tuning, learning rate 1e-3).
GREATS = {
    "paradigm": "select",
    "algorithm": "greats",
    "warmup_steps": 0,
    "update_every": 1,
    "params": {"fraction": 0.5, "targets": 16, "method": "logra", "proj_dim": 8192},
}

ARMS = [
    Arm("random_select", "select_random.yaml"),
    Arm("loss_select", "select_loss.yaml"),
    Arm("delta_loss", "select_delta_loss.yaml"),
    Arm("custom_select", "select_custom.yaml"),
    Arm("rho_il", "select_rho_loss_1_irreducible.yaml", evaluate=False),
    Arm(
        "rho_loss",
        "select_rho_loss_2_main.yaml",
        ("datasteer.params.reference_model={run:rho_il}",),
        after=("rho_il",),
    ),
    Arm("static", "mix_static.yaml", evaluate=False),  # trained by experiments.tiny_mix
    Arm(
        "rho_loss_static_il",
        "select_rho_loss_2_main.yaml",
        ("datasteer.params.reference_model={run:static}",),
        after=("static",),
    ),
    Arm("greats", "select_random.yaml", ("eval_dataset=prose_eval,code_eval,arithmetic_eval",), datasteer=GREATS),
    Arm("greats_pool_targets", "select_random.yaml", ("eval_dataset=prose,code,arithmetic",), datasteer=GREATS),
]

if __name__ == "__main__":
    sys.exit(run_experiment("tiny_select", "Selectors vs random selection", "random_select", ARMS, doc=__doc__))
