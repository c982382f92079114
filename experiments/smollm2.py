"""The arms of the SmolLM2-135M experiments: one base config, each arm its own ``datasteer:`` block.

Every arm continues SmolLM2-135M-Instruct with LoRA (r 8 on q_proj, v_proj) on the built-in
corpus (200 rows per domain, 64-token blocks), ``examples/pt_smollm2_lora.yaml``, for the
same steps, batch and learning rate; only the ``datasteer:`` block differs. Needs
``./install.sh --with-smollm2``.
"""

from __future__ import annotations

from experiments.common import Arm, run_experiment

BASE = "pt_smollm2_lora.yaml"

STATIC = {"paradigm": "mix", "algorithm": "static"}
ODM = {"paradigm": "mix", "algorithm": "odm", "update_every": 1}
RANDOM = {"paradigm": "select", "algorithm": "random", "warmup_steps": 4, "update_every": 8}
NEAR = {"paradigm": "select", "algorithm": "near", "warmup_steps": 4, "update_every": 8, "params": {"neighbours": 32}}
UNIFORM = {"paradigm": "weight", "algorithm": "uniform"}
REDUCIBLE = {"paradigm": "weight", "algorithm": "reducible", "params": {"reference_model": "{run:static}"}}
# Sized for 40 steps of 4 domains: aioli's rounds of 20 steps open with 8 LearnParams steps (one
# sweep of 2-step intervals); ado's laws are fitted every 10 steps from step 10.
AIOLI = {
    "paradigm": "mix",
    "algorithm": "aioli",
    "update_every": 1,
    "params": {"round_steps": 20, "interval_steps": 2, "sweeps": 1, "eta": 1.0},
}
ADO = {
    "paradigm": "mix",
    "algorithm": "ado",
    "warmup_steps": 10,
    "update_every": 1,
    "params": {"prior": "uniform", "ignore_steps": 2, "fit_every": 10, "fit_stride": 1},
}
# DoReMi's three steps: the reference is the static run; the proxy (same model and LoRA) learns
# the domain weights; the main run trains on them.
DOREMI_PROXY = {
    "paradigm": "mix",
    "algorithm": "doremi",
    "update_every": 5,
    "params": {"reference_model": "{run:static}"},
}
DOREMI = {
    "paradigm": "mix",
    "algorithm": "static",
    "params": {"proportions_file": "{run:doremi_proxy}/domain_weights.json"},
}
COMPOSED = {
    "mix": {"algorithm": "odm", "update_every": 1},
    "weight": {"algorithm": "reducible", "params": {"reference_model": "{run:static}"}},
}

ARMS = {
    "static": Arm("static", BASE, datasteer=STATIC),
    "odm": Arm("odm", BASE, datasteer=ODM),
    "aioli": Arm("aioli", BASE, datasteer=AIOLI),
    "ado": Arm("ado", BASE, datasteer=ADO),
    "doremi_proxy": Arm("doremi_proxy", BASE, datasteer=DOREMI_PROXY, after=("static",), evaluate=False),
    "doremi": Arm("doremi", BASE, datasteer=DOREMI, after=("doremi_proxy",)),
    "random_select": Arm("random_select", BASE, datasteer=RANDOM),
    "near": Arm("near", BASE, datasteer=NEAR),
    "uniform_weight": Arm("uniform_weight", BASE, datasteer=UNIFORM),
    "reducible": Arm("reducible", BASE, datasteer=REDUCIBLE, after=("static",)),
    "odm+reducible": Arm("odm+reducible", BASE, datasteer=COMPOSED, after=("static",)),
}


def run(name: str, title: str, baseline: str, arms: list[Arm], *, doc: str, target: str | None = None) -> int:
    """A SmolLM2 experiment: 40 steps, one seed (a run takes 13 to 28 minutes on 2 busy CPU
    cores), held-out texts scored on the 64 tokens the runs train on."""
    return run_experiment(
        name,
        title,
        baseline,
        arms,
        doc=doc,
        steps=40,
        seeds=(1,),
        output="outputs/experiments/smollm2",
        target=target,
        eval_length=64,
    )
