"""Peak memory of similarity scoring over feature stores of growing size.

For each pool size (default 10k, 100k, 1M rows of d=256 float16), a fresh subprocess
writes a seeded random store in chunks, and another fresh subprocess scores it: the mean
cosine similarity of every row to 64 queries (LESS's score), the top-k rows of that
score, and the top-k rows per query. Each subprocess reports its own peak RSS
(``ru_maxrss``), so the numbers are per size. Streaming keeps them flat: the last line
reads ``RESULT rss_growth_10k_to_1m=<peak 1M / peak 10k> ...`` (goal: about 1.3 or less).

Usage: ``.venv/bin/python benchmarks/selection_memory.py [--sizes 10000,100000,1000000]``.
Temporary stores live under a temp dir that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_write(directory: Path, n: int, dim: int, dtype: str) -> dict[str, float]:
    from datasteer.ops.feature_store import FeatureStore
    from datasteer.rng import numpy_generator

    start_rss = peak_rss_mb()
    t0 = time.perf_counter()
    store = FeatureStore(directory)
    chunk = 16384
    with store.writer(f"bench-{n}-{dim}", rows=n, dtype=dtype) as w:
        for i, first in enumerate(range(0, n, chunk)):
            gen = numpy_generator(0, "selection-memory", i)
            w.write(gen.standard_normal((min(chunk, n - first), dim), dtype=np.float32))
    return {"write_s": time.perf_counter() - t0, "write_rss_mb": peak_rss_mb(), "write_base_mb": start_rss}


def worker_score(directory: Path, queries: int, k: int, chunk_rows: int) -> dict[str, float]:
    import torch

    from datasteer.ops.feature_store import FeatureStore, mean_similarity, topk_similarity
    from datasteer.rng import torch_generator

    store = FeatureStore(directory)
    n, dim = store.shape
    q = torch.randn(queries, dim, generator=torch_generator(0, "selection-memory-queries"))
    base = peak_rss_mb()  # after imports: what every size pays regardless of n
    t0 = time.perf_counter()
    scores = mean_similarity(store, q, chunk_rows=chunk_rows)
    selected = torch.topk(scores, min(k, n)).indices  # the selection a LESS-style selector makes
    t1 = time.perf_counter()
    top_scores, top_idx = topk_similarity(store, q, k, chunk_rows=chunk_rows)
    t2 = time.perf_counter()
    return {
        "n": n,
        "score_s": t1 - t0,
        "topk_s": t2 - t1,
        "score_rss_mb": peak_rss_mb(),
        "score_base_mb": base,
        # Cheap checksums so the work cannot be optimised away and runs can be compared.
        "best_mean": float(scores[selected[0]]),
        "best_query0": float(top_scores[0, 0]),
        "best_query0_row": int(top_idx[0, 0]),
    }


def run_worker(args: list[str]) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, env=env)
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def label(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--chunk-rows", type=int, default=16384)
    parser.add_argument("--worker", choices=["write", "score"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "write":
        print(json.dumps(worker_write(args.dir, args.n, args.dim, args.dtype)))
        return
    if args.worker == "score":
        print(json.dumps(worker_score(args.dir, args.queries, args.k, args.chunk_rows)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[dict[str, float]] = []
    root = Path(tempfile.mkdtemp(prefix="datasteer-selection-memory-"))
    try:
        for n in sizes:
            directory = root / f"n{n}"
            common = ["--dir", str(directory), "--dim", str(args.dim), "--dtype", args.dtype]
            written = run_worker(["--worker", "write", "--n", str(n), *common])
            scored = run_worker(
                [
                    "--worker", "score", *common,
                    "--queries", str(args.queries), "--k", str(args.k), "--chunk-rows", str(args.chunk_rows),
                ]
            )  # fmt: skip
            disk_mb = sum(p.stat().st_size for p in directory.iterdir()) / 2**20
            rows.append({"n": n, "disk_mb": disk_mb, **written, **scored})
            shutil.rmtree(directory)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"d={args.dim} {args.dtype}, {args.queries} queries, k={args.k}, chunk_rows={args.chunk_rows}; "
        "peak RSS per fresh process (MiB); base = after imports"
    )
    header = f"{'rows':>9} {'disk MiB':>9} {'write s':>8} {'write RSS':>10} {'score s':>8} {'topk s':>7} {'base RSS':>9} {'score RSS':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['n']:>9} {r['disk_mb']:>9.1f} {r['write_s']:>8.2f} {r['write_rss_mb']:>10.1f} {r['score_s']:>8.2f} "
            f"{r['topk_s']:>7.2f} {r['score_base_mb']:>9.1f} {r['score_rss_mb']:>10.1f}"
        )
    first, last = rows[0], rows[-1]
    key = f"{label(int(first['n']))}_to_{label(int(last['n']))}"
    print(
        f"RESULT rss_growth_{key}={last['score_rss_mb'] / first['score_rss_mb']:.3f} "
        f"write_rss_growth_{key}={last['write_rss_mb'] / first['write_rss_mb']:.3f} "
        f"score_extra_mb_{label(int(last['n']))}={last['score_rss_mb'] - last['score_base_mb']:.1f} "
        f"peak_rss_mb_{label(int(last['n']))}={last['score_rss_mb']:.1f} "
        f"score_plus_topk_s_{label(int(last['n']))}={last['score_s'] + last['topk_s']:.2f}"
    )


if __name__ == "__main__":
    main()
