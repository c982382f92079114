"""What a rank pays to read its rows of a stream: a transform on every row read, or only on those asked for.

A rank of a streamed run reads each stream forward past rows it does not train: with W
ranks it trains one row in W, and under a selector with candidate windows of ratio R the
training loader asks for one window row in R. ``StreamedDomains.from_paths(...,
transform=...)`` transforms (tokenizes) a row when it is first asked for; the eager arm
maps the transform over the stream (``open_stream(path, transform)``), so every row read
is tokenized, as a LLaMA-Factory stream is.

One domain of ``--rows`` generated jsonl rows (``benchmarks/stream_memory.py``'s corpus,
built-in tiny tokenizer). Each arm asks for every ``k``-th row, for ``k`` in 1 (one
process), 2 (one rank of two) and 4 (a window of ratio 4), and reads the whole stream.
Arms run interleaved, ``--repeats`` times; the table gives the median seconds and the
ratio lazy / eager of each ``k``.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/stream_reads.py [--rows 40000] [--repeats 3]``.
The last line is ``RESULT stream_reads lazy/eager k=1:<r> k=2:<r> k=4:<r>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stream_memory import MAX_TOKENS, generate

STRIDES = (1, 2, 4)


def read(folder: Path, lazy: bool, stride: int, tokenizer: Any) -> float:
    """Seconds to read the domain's stream, asking for every ``stride``-th row."""
    from datasteer.streams import StreamedDomains, open_stream

    def tokenize(row: dict[str, Any]) -> dict[str, Any]:
        return dict(tokenizer(row["text"], truncation=True, max_length=MAX_TOKENS))

    if lazy:
        streams = StreamedDomains.from_paths({"prose": folder / "prose"}, transform=tokenize)
    else:
        streams = StreamedDomains({"prose": open_stream(folder / "prose", tokenize)})
    start = time.perf_counter()
    position = 0
    while streams.lengths()[0] is None:  # until the stream has been read to its end
        streams[position]
        position += stride
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000, help="rows of the generated 4-domain corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path("outputs/bench/stream_memory"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from datasteer.assets import resolve_builtin

    tokenizer = AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    folder = generate(args.data_dir, args.rows)
    times: dict[tuple[bool, int], list[float]] = {(lazy, k): [] for lazy in (False, True) for k in STRIDES}
    for repeat in range(args.repeats):
        for k in STRIDES:
            for lazy in (False, True):
                times[(lazy, k)].append(read(folder, lazy, k, tokenizer))
        last = "  ".join(f"{'lazy' if a else 'eager'} k={k} {t[-1]:.2f}s" for (a, k), t in times.items())
        print(f"repeat {repeat + 1}: {last}", flush=True)
    print(f"\n{'asks for':>12}  {'eager s':>8}  {'lazy s':>8}  {'lazy/eager':>10}")
    ratios = {}
    for k in STRIDES:
        eager, lazy = statistics.median(times[(False, k)]), statistics.median(times[(True, k)])
        ratios[k] = lazy / eager
        print(f"{'1 row in ' + str(k):>12}  {eager:>8.2f}  {lazy:>8.2f}  {ratios[k]:>9.2f}x")
    print("RESULT stream_reads lazy/eager " + " ".join(f"k={k}:{r:.2f}" for k, r in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
