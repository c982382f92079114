"""One rank of a 2-process TSDS run: select from a prepared file, write this rank's picks.

Usage: python -m torch.distributed.run --nproc-per-node 2 tsds_worker.py PREPARED OUT_DIR
(PREPARED as ``tests/selectors/test_tsds.py`` writes it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist
from tests.factories import select_context
from tests.selectors.test_tsds import fake_ops

from datasteer.selectors.tsds import TsdsParams, TsdsSelector


def main() -> None:
    prepared, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    ops = fake_ops()  # the pool and targets the test prepared the file for
    selector = TsdsSelector(TsdsParams(prepared=prepared))
    picks = []
    for update in range(3):
        ctx = select_context(ops=ops, num_samples=8, update=update, total_updates=3, seed=9, step=update)
        picks.append(selector.select(ctx).tolist())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(picks))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
