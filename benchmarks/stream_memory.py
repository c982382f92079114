"""Peak memory of a mixture of streamed domains as the corpus grows: nothing may grow with it.

A corpus of 4 domains (one directory of jsonl files per domain, ``rows / 4`` text rows each)
is generated once per size under ``--data-dir``. Each measurement is a fresh subprocess
that streams the whole corpus through datasteer's data path, as a training run does, with
no model: :meth:`StreamedDomains.from_paths` with the built-in tiny tokenizer applied to
each row as it is read, the :class:`SteeringController` of a ``random`` mixer (a fresh
Dirichlet draw every 50 steps, so the mixture moves and every stream position is saved
state), its mixture sampler, a ``DataLoader`` with datasteer's index collator, and the
controller's per-batch bookkeeping and per-step decisions. It draws ``rows / 64`` steps
of 64 rows: as many rows as the corpus holds. The child reports its peak RSS
(``ru_maxrss``) and rows per second.

With ``--select``, a selector chooses from candidate windows of the streams as well (a
``random`` selector over windows of 4 x the rows each domain's share needs, every 10
steps): each window is read and the chosen quarter trained, the rest skipped, so the run
takes ``rows / 256`` steps to stream the corpus once, and each stream keeps the rows its
windows need in flight (:attr:`SteeringController.stream_rows`).

The sizes run interleaved and repeated (the machine is shared); the table gives the median
of each size and its ratio to the smallest.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/stream_memory.py [--sizes 10000 100000 1000000] [--select]``.
The last line is ``RESULT stream_rss_growth=<peak RSS ratio, largest/smallest corpus> ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOMAINS = ("prose", "code", "arithmetic", "noise")
BATCH = 64
MAX_TOKENS = 64
FILES_PER_DOMAIN = 4


def generate(root: Path, rows: int) -> Path:
    """``rows`` text rows over 4 domains, each domain ``FILES_PER_DOMAIN`` jsonl files (cached)."""
    import numpy as np

    folder = root / f"corpus_{rows}"
    done = folder / "done"
    if done.is_file():
        return folder
    rng = np.random.default_rng(rows)
    words = [f"w{i}" for i in range(2000)]
    per_file = rows // len(DOMAINS) // FILES_PER_DOMAIN
    for d, name in enumerate(DOMAINS):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for f in range(FILES_PER_DOMAIN):
            ids = rng.integers(d * 400, d * 400 + 800, size=(per_file, 24))
            with (folder / name / f"part{f:02d}.jsonl").open("w") as out:
                for row in ids:
                    out.write(json.dumps({"text": " ".join(words[i] for i in row)}) + "\n")
    done.write_text("ok\n")
    return folder


#: The mixer alone, or with a selector choosing from candidate windows of 4 x the rows needed.
MIX = {"mix": {"algorithm": "random", "update_every": 50}, "seed": 1}
SELECT = {**MIX, "select": {"algorithm": "random", "update_every": 10, "stream_window": 4}}


def child(folder: Path, rows: int, select: bool) -> dict[str, Any]:
    """Stream the corpus once through the steered data path; peak RSS and rows/s."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from datasteer.assets import resolve_builtin
    from datasteer.controller import SteeringController
    from datasteer.integrations.hf import INDEX_KEY, IndexCollator, _IndexedDataset
    from datasteer.plan import build_plan
    from datasteer.streams import StreamedDomains

    tokenizer = AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token

    def tokenize(row: dict[str, Any]) -> dict[str, Any]:
        return dict(tokenizer(row["text"], truncation=True, max_length=MAX_TOKENS))

    streams = StreamedDomains.from_paths({d: folder / d for d in DOMAINS}, transform=tokenize)
    steps = rows // (BATCH * (4 if select else 1))  # the whole corpus read once
    plan = build_plan(SELECT if select else MIX)
    ctl = SteeringController(
        plan, domains=None, domain_names=DOMAINS, global_batch=BATCH, seed=1, lag=1, stream_steps=steps
    )
    streams.hold_rows(ctl.stream_rows)  # as a steered Trainer does
    ctl.begin(steps)
    assert ctl.sampler is not None
    loader = torch.utils.data.DataLoader(
        _IndexedDataset(streams),
        batch_sampler=torch.utils.data.BatchSampler(ctl.sampler, BATCH, drop_last=False),
        collate_fn=IndexCollator(DataCollatorWithPadding(tokenizer)),
    )
    start = time.perf_counter()
    batches = iter(loader)
    trained = 0
    trace = []  # peak RSS (MiB) after each tenth of the steps
    for step in range(1, steps + 1):
        if step % max(1, steps // 10) == 0:
            trace.append(round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
        batch = next(batches)
        trained += len(batch[INDEX_KEY])
        ctl.observe(batch[INDEX_KEY])
        ctl.step_end(step)
    seconds = time.perf_counter() - start
    state = ctl.sampler.state_dict(steps)
    return {
        "rows": rows,
        "trained": trained,
        "kept_per_stream": ctl.stream_rows,
        "seconds": seconds,
        "rows_per_s": int(np.sum(state["stream_positions"].numpy())) / seconds,  # rows read from the streams
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "positions": np.asarray(state["stream_positions"]).tolist(),
        "peak_trace_mib": trace,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path("outputs/bench/stream_memory"))
    parser.add_argument("--select", action="store_true", help="also select from candidate windows")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(generate(args.data_dir, args.child), args.child, args.select)))
        return 0
    for rows in args.sizes:
        print(f"corpus of {rows} rows: {generate(args.data_dir, rows)}", flush=True)
    results: dict[int, list[dict[str, Any]]] = {rows: [] for rows in args.sizes}
    for repeat in range(args.repeats):
        for rows in args.sizes:
            cmd = [sys.executable, __file__, "--child", str(rows), "--data-dir", str(args.data_dir)]
            cmd += ["--select"] if args.select else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[rows].append(json.loads(out))
            r = results[rows][-1]
            print(
                f"repeat {repeat + 1}: {rows:>9} rows  {r['seconds']:7.1f} s  peak {r['peak_mib']:7.1f} MiB  "
                f"(at each tenth: {r['peak_trace_mib']})",
                flush=True,
            )
    base = statistics.median(r["peak_mib"] for r in results[args.sizes[0]])
    print(f"\n{'rows':>9}  {'trained':>9}  {'read/s':>8}  {'peak MiB':>9}  {'vs smallest':>11}")
    for rows in args.sizes:
        peak = statistics.median(r["peak_mib"] for r in results[rows])
        speed = statistics.median(r["rows_per_s"] for r in results[rows])
        print(f"{rows:>9}  {results[rows][0]['trained']:>9}  {speed:>8.0f}  {peak:>9.1f}  {peak / base:>10.3f}x")
    largest = statistics.median(r["peak_mib"] for r in results[args.sizes[-1]])
    kind = "select" if args.select else "mix"
    print(f"RESULT stream_rss_growth={largest / base:.3f} sizes={'/'.join(map(str, args.sizes))} steering={kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
