"""Peak memory of a real LESS selection as the pool grows: the features must not be held in memory.

Each pool size runs in a fresh subprocess: the built-in tiny Llama (``builtin:tiny-llama``)
with a LoRA adapter on its attention projections, a pool of random token rows, 16 target
rows, and one :meth:`LessSelector.select` through the real :class:`ModelOps` (``logra``
gradient features at ``proj_dim`` 8192, no Adam). The child reports its peak RSS
(``ru_maxrss``) and the RSS before the selection (model and pool loaded). The pool rows
are generated from their index, so the pool itself costs next to nothing.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/selection_memory.py [--quick]``. To measure
another version of the library (e.g. the parent commit's in-memory features), point
``PYTHONPATH`` at its ``src``. The last line is ``RESULT less_rss_growth_5k_to_50k=<peak RSS
ratio, large/small pool> ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ = 32
PROJ_DIM = 8192
TARGETS = 16


class RandomRows:
    """``n`` rows of ``SEQ`` token ids, row ``i`` drawn from a generator seeded with ``i``."""

    def __init__(self, n: int, vocab: int, seed: int) -> None:
        self.n, self.vocab, self.seed = n, vocab, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        import numpy as np

        if not 0 <= i < self.n:
            raise IndexError(i)
        ids = np.random.default_rng((self.seed, i)).integers(4, self.vocab, size=SEQ).tolist()
        return {"input_ids": ids, "attention_mask": [1] * SEQ, "labels": ids}


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident set size now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(pool_size: int, batch_size: int) -> dict[str, float]:
    """One LESS selection over a pool of ``pool_size`` rows; its memory and time."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, default_data_collator

    from datasteer.assets import ensure_builtin
    from datasteer.ops import ModelOps
    from datasteer.rng import torch_generator
    from datasteer.selectors.base import SelectContext
    from datasteer.selectors.less import LessParams, LessSelector

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ensure_builtin("tiny-llama"))
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, lora)
    vocab = model.get_input_embeddings().num_embeddings
    cpu = torch.device("cpu")
    target = ModelOps(model, RandomRows(TARGETS, vocab, seed=1), default_data_collator, batch_size, cpu, name="t")
    ops = ModelOps(model, RandomRows(pool_size, vocab, seed=0), default_data_collator, batch_size, cpu, (target,))
    selector = LessSelector(LessParams(proj_dim=PROJ_DIM, method="logra", adam=False))
    ctx = SelectContext(
        step=0,
        first_step=1,
        last_step=1,
        max_steps=1,
        update=0,
        domain_names=("pool",),
        generator=torch_generator(0, "select", 0),
        total_updates=1,
        num_samples=pool_size // 10,
        pool_size=pool_size,
        domains=torch.zeros(pool_size, dtype=torch.long),
        ops=ops,
    )
    before = current_rss_mb()
    started = time.perf_counter()
    chosen = selector.select(ctx)
    seconds = time.perf_counter() - started
    return {
        "pool": pool_size,
        "rss_before_mb": before,
        "peak_rss_mb": rss_mb(),
        "seconds": seconds,
        "selected": len(chosen),
        "digest": int(chosen[:50].sum()),
    }


def measure(pool_size: int, batch_size: int) -> dict[str, float]:
    """:func:`child` in a fresh interpreter (so each size has its own peak)."""
    cmd = [sys.executable, __file__, "--child", str(pool_size), "--batch-size", str(batch_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="pools of 1,000 and 10,000 rows")
    parser.add_argument("--sizes", type=int, nargs=2, default=None, help="the small and the large pool")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per scoring batch")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.batch_size)))
        return
    small, large = args.sizes or ((1_000, 10_000) if args.quick else (5_000, 50_000))
    rows = [measure(n, args.batch_size) for n in (small, large)]
    print(f"{'pool':>8} {'rss before (MiB)':>17} {'peak rss (MiB)':>15} {'features (MiB)':>15} {'seconds':>8}")
    for r in rows:
        features = r["pool"] * PROJ_DIM * 4 / 2**20
        print(
            f"{r['pool']:>8} {r['rss_before_mb']:>17.0f} {r['peak_rss_mb']:>15.0f} {features:>15.0f} {r['seconds']:>8.1f}"
        )
    ratio = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    growth = rows[1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    print(
        f"RESULT less_rss_growth_{small // 1000}k_to_{large // 1000}k={ratio:.3f} "
        f"peak_rss_small_mb={rows[0]['peak_rss_mb']:.0f} peak_rss_large_mb={rows[1]['peak_rss_mb']:.0f} "
        f"growth_mb={growth:.0f} seconds_large={rows[1]['seconds']:.1f} proj_dim={PROJ_DIM} seq={SEQ}"
    )


if __name__ == "__main__":
    main()
