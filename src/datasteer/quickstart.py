"""``datasteer quickstart``: train the tiny model twice, with a dynamic and with the uniform
mixture of the built-in corpus, then print each domain's held-out loss side by side.

Both runs are ``datasteer train`` on the example configs (in subprocesses, one after the
other), with the same seed, steps and data; only the ``datasteer:`` block differs. The
verdict is on the mean over the learnable domains (``noise`` is random tokens: a mixer
that moves steps away from it is meant to lose there, and its row shows what it cost).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from datasteer.assets import BUILTIN_DOMAINS, LEARNABLE_DOMAINS
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


def _mean(metrics: dict[str, float], domains: tuple[str, ...]) -> float:
    return sum(metrics[f"eval_{d}_eval_loss"] for d in domains) / len(domains)


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Per-domain held-out loss of each run side by side, then the mean over the learnable
    domains and over all domains (with its perplexity)."""
    runs = list(results)
    width = max(12, *(len(r) for r in runs))
    lines = [f"{'domain':<16}" + "".join(f"{r:>{width + 2}}" for r in runs) + f"{'difference':>14}"]

    def row(label: str, values: list[float]) -> str:
        cells = "".join(f"{v:>{width + 2}.4f}" for v in values)
        return f"{label:<16}{cells}{values[0] - values[-1]:>+14.4f}"

    for domain in BUILTIN_DOMAINS:
        lines.append(row(domain, [results[r][f"eval_{domain}_eval_loss"] for r in runs]))
    lines.append(row("learnable mean", [_mean(results[r], LEARNABLE_DOMAINS) for r in runs]))
    means = [_mean(results[r], BUILTIN_DOMAINS) for r in runs]
    lines.append(row("mean (all)", means))
    lines.append(f"{'(ppl of mean)':<16}" + "".join(f"{math.exp(m):>{width + 2}.1f}" for m in means))
    return "\n".join(lines)


def verdict(results: dict[str, dict[str, float]]) -> str:
    """One line: how the dynamic run (first) did against the static one (last) on the
    learnable domains, and what it cost on the others."""
    runs = list(results)
    dynamic, static = results[runs[0]], results[runs[-1]]
    gain = _mean(static, LEARNABLE_DOMAINS) - _mean(dynamic, LEARNABLE_DOMAINS)
    others = [d for d in BUILTIN_DOMAINS if d not in LEARNABLE_DOMAINS]
    cost = ", ".join(f"{d} {dynamic[f'eval_{d}_eval_loss'] - static[f'eval_{d}_eval_loss']:+.4f}" for d in others)
    word = "lowers" if gain > 0 else "raises"
    return (
        f"{runs[0]} {word} the mean held-out loss of the learnable domains "
        f"({', '.join(LEARNABLE_DOMAINS)}) by {abs(gain):.4f} nats against {runs[-1]}, at equal steps"
        + (f"; {cost} (random tokens, not in that mean)" if cost else "")
        + "."
    )


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
    print(f"\n{verdict(results)}")
    print(f"\nSteering records: {output_dir}/mix_{mixer}/steering.jsonl")
    return 0
