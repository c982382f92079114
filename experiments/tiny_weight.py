"""Claim: the weighters change what the tiny model learns against uniform weights, at
equal steps, samples and tokens (weighting never changes which samples are drawn).

    .venv/bin/python -m experiments.tiny_weight         # 3 seeds, 150 steps

Arms: ``uniform`` (the baseline), ``loss`` (linupper), ``adapt`` (anchors: the arithmetic
evaluation set), ``reducible`` (RHO-LOSS as weights; its reference model is the uniform
mixture run of ``experiments.tiny_mix``, the same seed and steps), and the template
``custom`` weighter (arithmetic 2, noise 0.5). Metric: the mean held-out loss of the
three learnable domains.
"""

from __future__ import annotations

import sys

from experiments.common import Arm, run_experiment

ARMS = [
    Arm("static", "mix_static.yaml", evaluate=False),  # the reference model of `reducible`
    Arm("uniform_weight", "weight_uniform.yaml"),
    Arm("loss_weight", "weight_loss.yaml"),
    Arm("adapt", "weight_adapt.yaml"),
    Arm("reducible", "weight_reducible.yaml", ("datasteer.params.reference_model={run:static}",), after=("static",)),
    Arm("custom_weight", "weight_custom.yaml"),
]

if __name__ == "__main__":
    sys.exit(run_experiment("tiny_weight", "Weighters vs uniform weights", "uniform_weight", ARMS, doc=__doc__))
