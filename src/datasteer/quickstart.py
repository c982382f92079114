"""``datasteer quickstart``: train the tiny model twice, with a dynamic and with the uniform
mixture of the built-in corpus, then print each domain's held-out loss side by side.

Both runs are ``datasteer train`` on the example configs (in subprocesses, one after the
other), with the same seed, steps and data; only the ``datasteer:`` block differs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from datasteer.assets import BUILTIN_DOMAINS
from datasteer.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _overrides(output_dir: Path, steps: int) -> list[str]:
    evals = ",".join(f"{d}_eval" for d in BUILTIN_DOMAINS)
    return [
        f"output_dir={output_dir}",
        f"max_steps={steps}",
        "do_eval=true",
        f"eval_dataset={evals}",
        "eval_on_each_dataset=true",
        "per_device_eval_batch_size=32",
        "save_strategy=no",
        "logging_steps=25",
    ]


def train_run(config: Path, output_dir: Path, steps: int, extra: list[str] | None = None) -> dict[str, float]:
    """``datasteer train CONFIG`` in a subprocess with per-domain evaluation; its eval metrics."""
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir.parent / f"{output_dir.name}.log"
    cmd = [sys.executable, "-m", "datasteer", "train", str(config), *_overrides(output_dir, steps), *(extra or [])]
    started = time.perf_counter()
    print(f"  training {config.name} -> {output_dir} (log: {log}) ...", flush=True)
    with log.open("w") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}; see {log}")
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    metrics: dict[str, float] = json.loads((output_dir / "eval_results.json").read_text())
    return metrics


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Per-domain held-out loss (and perplexity) of each run, side by side."""
    runs = list(results)
    width = max(12, *(len(r) for r in runs))
    lines = [f"{'domain':<12}" + "".join(f"{r:>{width + 2}}" for r in runs) + f"{'difference':>14}"]
    means = {r: 0.0 for r in runs}
    for domain in BUILTIN_DOMAINS:
        losses = [results[r][f"eval_{domain}_eval_loss"] for r in runs]
        for r, value in zip(runs, losses, strict=True):
            means[r] += value / len(BUILTIN_DOMAINS)
        cells = "".join(f"{v:>{width + 2}.4f}" for v in losses)
        lines.append(f"{domain:<12}{cells}{losses[0] - losses[-1]:>+14.4f}")
    mean_cells = "".join(f"{means[r]:>{width + 2}.4f}" for r in runs)
    lines.append(f"{'mean':<12}{mean_cells}{means[runs[0]] - means[runs[-1]]:>+14.4f}")
    ppl = "".join(f"{math.exp(means[r]):>{width + 2}.1f}" for r in runs)
    lines.append(f"{'(ppl of mean)':<12}{ppl}")
    return "\n".join(lines)


def run_quickstart(output_dir: Path, steps: int, mixer: str) -> int:
    """Train with ``examples/mix_<mixer>.yaml`` and ``examples/mix_static.yaml``; print the table."""
    dynamic = EXAMPLES / f"mix_{mixer}.yaml"
    static = EXAMPLES / "mix_static.yaml"
    for path in (dynamic, static):
        if not path.is_file():
            raise ConfigError(f"--mixer {mixer}: no example config {path}")
    if steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {steps}")
    print(f"datasteer quickstart: {steps} steps each, tiny Llama on the built-in corpus")
    results = {
        mixer: train_run(dynamic, output_dir / f"mix_{mixer}", steps),
        "static uniform": train_run(static, output_dir / "mix_static", steps),
    }
    print("\nHeld-out loss per domain (lower is better; difference = dynamic - static):")
    print(format_table(results))
    print(f"\nSteering records: {output_dir}/mix_{mixer}/steering.jsonl")
    return 0
