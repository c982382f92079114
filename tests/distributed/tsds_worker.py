"""One rank of a 2-process TSDS run: select from a prepared file, write this rank's picks."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from datasteer.rng import torch_generator
from datasteer.selectors.base import SelectContext
from datasteer.selectors.tsds import TsdsParams, TsdsSelector


def main() -> None:
    prepared, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    pool = [{"input_ids": [i, i + 1]} for i in range(6)]
    ops = SimpleNamespace(model=None, dataset=pool, targets=[SimpleNamespace(dataset=[{"input_ids": [9, 9]}])])
    selector = TsdsSelector(TsdsParams(prepared=prepared))
    picks = []
    for update in range(3):
        ctx = SelectContext(
            step=update,
            first_step=1,
            last_step=1,
            max_steps=10,
            update=update,
            domain_names=("x",),
            generator=torch_generator(9, "select", update),
            total_updates=3,
            num_samples=8,
            pool_size=6,
            domains=torch.zeros(6, dtype=torch.long),
            ops=ops,  # type: ignore[arg-type]
        )
        picks.append(selector.select(ctx).tolist())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(picks))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
