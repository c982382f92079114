"""One rank of a 1- or 2-process CPU (gloo) run of the dynamic_moe mixer on a tiny MoE model.

Usage: python -m torch.distributed.run --nproc-per-node 2 moe_worker.py OUT_DIR SOURCE
(SOURCE: ``pool`` without eval sets, ``eval`` with one eval set per domain).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.distributed.ddp_worker import finish, worker_args
from tests.factories import DOMAINS, make_dataset, make_moe_model
from transformers import default_data_collator

from datasteer.hf import SteeringTrainer
from datasteer.mixers.dynamic_moe import DynamicMoEMixer


def main() -> tuple[Path, dict[str, Any]]:
    out, source = Path(sys.argv[1]), sys.argv[2]
    args = worker_args(out, per_device_eval_batch_size=3)
    evals = None
    if source == "eval":  # one held-out set per domain, named <domain>_eval
        held_out = make_dataset(sizes=(7, 7, 7), seed=1)
        evals = {
            f"{name}_eval": held_out.filter(lambda row, n=name: row["domain"] == n).remove_columns("domain")
            for name in DOMAINS
        }
    steering = {
        "paradigm": "mix",
        "algorithm": "dynamic_moe",
        "warmup_steps": 1,
        "update_every": 2,
        "seed": 9,
        "params": {"source": source, "samples_per_domain": 5, "eta": 10.0, "smoothing": 0.05},
    }
    trainer = SteeringTrainer(
        model=make_moe_model(),
        args=args,
        train_dataset=make_dataset(),
        eval_dataset=evals,
        data_collator=default_data_collator,
        steering=steering,
    )
    trainer.train()
    ctl = trainer.steering
    mixer = ctl.plan.mixer
    assert isinstance(mixer, DynamicMoEMixer)
    record = {
        "plans": [(s, p.tolist()) for s, p in ctl.sampler._plans],
        "history": mixer.history,
        "source": mixer.source_used,
        "held_out": mixer.held_out.tolist() if mixer.held_out is not None else None,
        "router": trainer.model.model.layers[0].mlp.gate.weight.requires_grad,
    }
    return out, record


if __name__ == "__main__":
    finish(*main())  # the trainer is released when main returns, before the group is destroyed
