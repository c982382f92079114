"""One rank of a 2-process CPU (gloo) DDP run with the NICE selector; writes its plans.

Usage: python -m torch.distributed.run --nproc-per-node 2 nice_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.distributed.ddp_worker import Recording, finish, worker_args
from tests.factories import make_dataset, make_model, make_sft_dataset
from transformers import default_data_collator

STEERING = {
    "paradigm": "select",
    "algorithm": "nice",
    "warmup_steps": 1,
    "update_every": 3,
    "seed": 9,
    # 5 targets in groups of 8 // 3 = 2: ranks get 2 and 1 groups (the short one pads).
    "params": {"proj_dim": 512, "mc_samples": 2, "max_new_tokens": 4, "reward": "token_f1"},
}


def main() -> None:
    out = Path(sys.argv[1])
    args = worker_args(out, per_device_eval_batch_size=8, logging_steps=1)
    trainer = Recording(
        model=make_model(),
        args=args,
        train_dataset=make_dataset(),
        eval_dataset=make_sft_dataset(sizes=(0, 0, 5), seed=1).remove_columns("domain"),
        data_collator=default_data_collator,
        steering=STEERING,
    )
    trainer.trained = []
    trainer.train()
    plans = [(s, p.tolist() if p is not None else None) for s, p in trainer.steering.sampler._plans]
    finish(out, {"trained": trainer.trained, "plans": plans})


if __name__ == "__main__":
    main()
