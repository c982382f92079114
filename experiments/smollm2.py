"""The arms of the SmolLM2-135M experiments: one base config, each arm its own ``datasteer:`` block.

Every arm continues SmolLM2-135M-Instruct with LoRA (r 8 on q_proj, v_proj) on the built-in
corpus (200 rows per domain, 64-token blocks), ``examples/pt_smollm2_lora.yaml``, for the
same steps, batch and learning rate; only the ``datasteer:`` block differs. Needs
``./install.sh --with-smollm2``.
"""

from __future__ import annotations

from experiments.common import Arm

BASE = "pt_smollm2_lora.yaml"
STATIC = {"paradigm": "mix", "algorithm": "static"}
ODM = {"paradigm": "mix", "algorithm": "odm", "update_every": 1}
RANDOM = {"paradigm": "select", "algorithm": "random", "warmup_steps": 4, "update_every": 8}
NEAR = {"paradigm": "select", "algorithm": "near", "warmup_steps": 4, "update_every": 8, "params": {"neighbours": 32}}
UNIFORM = {"paradigm": "weight", "algorithm": "uniform"}
REDUCIBLE = {"paradigm": "weight", "algorithm": "reducible", "params": {"reference_model": "{run:static}"}}
COMPOSED = {
    "mix": {"algorithm": "odm", "update_every": 1},
    "weight": {"algorithm": "reducible", "params": {"reference_model": "{run:static}"}},
}

ARMS = {
    "static": Arm("static", BASE, datasteer=STATIC),
    "odm": Arm("odm", BASE, datasteer=ODM),
    "random_select": Arm("random_select", BASE, datasteer=RANDOM),
    "near": Arm("near", BASE, datasteer=NEAR),
    "uniform_weight": Arm("uniform_weight", BASE, datasteer=UNIFORM),
    "reducible": Arm("reducible", BASE, datasteer=REDUCIBLE, after=("static",)),
    "odm+reducible": Arm("odm+reducible", BASE, datasteer=COMPOSED, after=("static",)),
}
