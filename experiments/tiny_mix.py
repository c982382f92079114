"""Claim: the online mixers change the held-out loss of the built-in corpus's domains
against the uniform mixture, at equal steps and tokens.

    .venv/bin/python -m experiments.tiny_mix            # 3 seeds, 150 steps: about 15 min on 2 cores

Arms: ``static`` (uniform, the baseline), ``random`` (a fresh Dirichlet draw per update),
``scheduled`` (the README's curriculum: noise to the learnable domains), ``odm``,
``doremi`` (step 3: static at the proportions learned by the step-2 proxy, whose reference
model is the ``static`` run of the same seed), ``aioli`` and ``ado`` (their examples), the
control ``aioli_eta0`` (aioli's perturbed LearnParams steps, but eta ~ 0 keeps p uniform), and the
composed ``odm + loss + loss`` (``examples/compose_mix_select_weight.yaml``). Metric: the mean
held-out loss of the three learnable domains (``noise`` is random tokens; it is reported, not
averaged in).

    .venv/bin/python -m experiments.tiny_mix --only aioli ado   # train just these arms (and the baseline)
"""

from __future__ import annotations

import sys

from experiments.common import Arm, run_experiment

ARMS = [
    Arm("static", "mix_static.yaml"),
    Arm("random", "mix_random.yaml"),
    Arm("scheduled", "mix_scheduled.yaml"),
    Arm("odm", "mix_odm.yaml"),
    Arm(
        "doremi_proxy",
        "mix_doremi_2_proxy.yaml",
        ("datasteer.params.reference_model={run:static}",),
        after=("static",),
        evaluate=False,
    ),
    Arm(
        "doremi",
        "mix_doremi_3_main.yaml",
        ("datasteer.params.proportions_file={run:doremi_proxy}/domain_weights.json",),
        after=("doremi_proxy",),
    ),
    Arm("odm+loss+loss", "compose_mix_select_weight.yaml"),
    Arm("aioli", "mix_aioli.yaml"),
    # control: aioli's LearnParams rounds with p kept (all but) uniform: what the perturbations cost
    Arm("aioli_eta0", "mix_aioli.yaml", ("datasteer.params.eta=1e-9",)),
    Arm("ado", "mix_ado.yaml"),
]

if __name__ == "__main__":
    sys.exit(run_experiment("tiny_mix", "Mixers vs the uniform mixture", "static", ARMS, doc=__doc__))
