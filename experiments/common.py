"""What every experiment script shares: run arms of ``datasteer train``, evaluate them, tabulate.

An experiment compares arms (one ``datasteer train`` each, from an example config plus
overrides) against a baseline arm over several seeds: same model, data, steps, batch size
and learning rate; only the ``datasteer:`` block differs. Each run is a subprocess, so the
numbers are what a user of the CLI gets. Runs are cached: a run whose output directory
already holds ``metrics.json`` is not trained again (``--force`` retrains), so an
interrupted experiment continues where it stopped.

Evaluation is done after training on the saved model, on the built-in corpus's held-out
splits (``<domain>_eval.jsonl``, 100 rows per domain, never trained on), with
:mod:`datasteer.evaluate`. For a targeted selector, the arithmetic rows are also its
targets (the training-time ``eval_dataset``, as the target set is the validation set in
LESS's setup): it sees their features, never trains on them.

- ``pt`` runs: the token-mean loss of each domain's held-out ``text``;
- ``sft`` runs: the response-token loss of each domain's held-out prompt/response rows,
  formatted by the run's own LLaMA-Factory template;
- both: the exact-match accuracy of the held-out arithmetic equations (teacher-forced: an
  equation is right when every answer token is the model's top prediction).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasteer.assets import BUILTIN_DOMAINS, LEARNABLE_DOMAINS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DOMAINS = BUILTIN_DOMAINS
LEARNABLE = LEARNABLE_DOMAINS
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class Arm:
    """One row of an experiment: a run config, its overrides, and what it waits for.

    ``overrides`` may name another arm's output directory of the same seed as
    ``{run:NAME}`` (e.g. a reference model); ``after`` lists the arms that must finish
    first. ``prepare`` runs ``datasteer prepare KIND`` on the same config first.
    ``evaluate: False`` marks a helper run (e.g. DoReMi's proxy) that is not a row.
    """

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    prepare: str | None = None
    evaluate: bool = True
    stage: str = "pt"
    datasteer: dict[str, Any] | None = None
    """Replaces the config's ``datasteer:`` block (e.g. a baseline on another arm's config)."""


@dataclass
class Experiment:
    """Arms compared against ``baseline`` over ``seeds``, ``steps`` optimizer steps each."""

    name: str
    title: str
    baseline: str
    arms: list[Arm]
    seeds: list[int]
    steps: int
    output: Path
    common: tuple[str, ...] = ()
    target: str | None = None  # the target domain of targeted selectors
    eval_length: int = 128  # tokens of each held-out text scored
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.output / f"seed{seed}" / arm

    @property
    def report_dir(self) -> Path:
        return self.output / self.name


def parse_args(
    description: str, *, steps: int, seeds: Sequence[int] = (1, 2, 3), output: str = "outputs/experiments/tiny"
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (one CPU thread each)")
    parser.add_argument("--output-dir", default=output, help="where the runs go (shared by the experiments)")
    parser.add_argument("--only", nargs="+", default=None, help="train only these arms (and what they need)")
    parser.add_argument("--force", action="store_true", help="retrain runs that are already done")
    return parser.parse_args()


# -- running ----------------------------------------------------------------------------------


def _fill(text: str, exp: Experiment, seed: int) -> str:
    """``{seed}`` and ``{run:NAME}`` (arm NAME's output directory of this seed) filled in."""
    text = text.replace("{seed}", str(seed))
    for other in exp.arms:
        text = text.replace(f"{{run:{other.name}}}", str(exp.run_dir(other.name, seed)))
    return text


def _config(exp: Experiment, arm: Arm, seed: int) -> str:
    """The arm's run config: the example itself, or a copy with its ``datasteer:`` block replaced."""
    path = EXAMPLES / arm.config
    if arm.datasteer is None:
        return str(path)
    import yaml

    raw = yaml.safe_load(path.read_text())
    raw["datasteer"] = arm.datasteer
    derived = exp.run_dir(arm.name, seed).parent / f"{arm.name}.yaml"
    derived.parent.mkdir(parents=True, exist_ok=True)
    block = _fill(yaml.safe_dump(raw, sort_keys=False), exp, seed)
    derived.write_text(f"# {path.name} with another datasteer: block\n" + block)
    return str(derived)


def _command(exp: Experiment, arm: Arm, seed: int) -> list[str]:
    out = exp.run_dir(arm.name, seed)
    overrides = [_fill(o, exp, seed) for o in arm.overrides]
    return [
        _config(exp, arm, seed),
        f"output_dir={out}",
        f"max_steps={exp.steps}",
        f"seed={seed}",
        "save_strategy=no",
        "do_eval=false",
        "report_to=none",
        "logging_steps=25",
        *exp.common,
        *overrides,
    ]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def _train(exp: Experiment, arm: Arm, seed: int, force: bool) -> float:
    """Train one run (and its preparation) unless done; its wall time in seconds."""
    out = exp.run_dir(arm.name, seed)
    done = out / "train_results.json"
    if done.is_file() and not force:
        return float(json.loads((out / "wall.json").read_text())["seconds"]) if (out / "wall.json").is_file() else 0.0
    out.mkdir(parents=True, exist_ok=True)
    args = _command(exp, arm, seed)
    started = time.perf_counter()
    log = out.parent / f"{arm.name}.log"
    with log.open("w") as fh:
        if arm.prepare:
            prepared = out.parent / f"{arm.name}.prepared"
            cmd = [sys.executable, "-m", "datasteer", "prepare", arm.prepare, *args]
            cmd.append(f"datasteer.params.prepared={prepared}")
            if subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_environment(), cwd=ROOT) != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")
            args.append(f"datasteer.params.prepared={prepared}")
        cmd = [sys.executable, "-m", "datasteer", "train", *args]
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        if subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_environment(), cwd=ROOT) != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")
    seconds = time.perf_counter() - started
    (out / "wall.json").write_text(json.dumps({"seconds": seconds}) + "\n")
    (out / METRICS_FILE).unlink(missing_ok=True)
    print(f"  trained {arm.name} seed {seed} in {seconds:.0f} s", flush=True)
    return seconds


def run_all(exp: Experiment, jobs: int, only: Sequence[str] | None, force: bool) -> None:
    """Train every (arm, seed), ``jobs`` at a time, each after the arms it waits for."""
    wanted = set(only or (a.name for a in exp.arms)) | {exp.baseline}  # the table needs its baseline
    changed = True
    while changed:  # what the wanted arms wait for
        changed = False
        for arm in exp.arms:
            if arm.name in wanted and not set(arm.after) <= wanted:
                wanted |= set(arm.after)
                changed = True
    futures: dict[tuple[str, int], Future[float]] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:

        def submit(arm: Arm, seed: int) -> Future[float]:
            key = (arm.name, seed)
            if key not in futures:
                deps = [submit(exp.arm(d), seed) for d in arm.after]

                def task(arm: Arm = arm, deps: list[Future[float]] = deps) -> float:
                    for d in deps:
                        d.result()
                    seconds = _train(exp, arm, seed, force)
                    if arm.evaluate:  # here, while the other worker trains, not after all runs
                        evaluate_run(exp, arm, seed)
                    return seconds

                futures[key] = pool.submit(task) if not deps else _chain(pool, deps, task)
            return futures[key]

        for seed in exp.seeds:  # seeds interleaved: every arm's first seed comes first
            for arm in exp.arms:
                if arm.name in wanted:
                    submit(arm, seed)
        errors = [f.exception() for f in futures.values() if f.exception() is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} run(s) failed: {errors[0]}")


def _chain(pool: ThreadPoolExecutor, deps: list[Future[float]], task: Callable[[], float]) -> Future[float]:
    """A future for ``task`` started once ``deps`` are done, without holding a worker while waiting."""
    result: Future[float] = Future()
    remaining = [len(deps)]

    def ready(_: Future[float]) -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            inner = pool.submit(task)
            inner.add_done_callback(lambda f: _copy(f, result))

    for d in deps:
        d.add_done_callback(ready)
    return result


def _copy(source: Future[float], target: Future[float]) -> None:
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


# -- evaluating ---------------------------------------------------------------------------------


#: Serialises model loading across the experiment's worker threads: transformers' loading is
#: not thread-safe (two SmolLM2 adapters loaded at once gave an untied, uniform lm_head).
_LOADING = threading.Lock()


def evaluate_run(exp: Experiment, arm: Arm, seed: int) -> dict[str, Any]:
    """Held-out loss per domain and arithmetic accuracy of a trained run (cached in metrics.json)."""
    out = exp.run_dir(arm.name, seed)
    cached = out / METRICS_FILE
    if cached.is_file():
        result: dict[str, Any] = json.loads(cached.read_text())
        return result
    import torch

    from datasteer.assets import resolve_builtin
    from datasteer.evaluate import (
        evaluate_corpus,
        find_model,
        find_run_config,
        load_model,
        load_run_eval_sets,
        load_tokenizer,
        read_corpus_texts,
        read_run_args,
    )
    from datasteer.evaluate import (
        evaluate_run as score_eval_sets,
    )

    torch.set_num_threads(1)  # one thread per worker, as the training subprocesses
    source = find_model(str(out))
    with _LOADING:  # two models loaded at once in threads of one process can come out untied
        model, tokenizer = load_model(source), load_tokenizer(source)
    texts = read_corpus_texts(Path(resolve_builtin("builtin:corpus")), DOMAINS)
    on_text = evaluate_corpus(model, tokenizer, texts, max_length=exp.eval_length)
    losses = {d: r.loss for d, r in on_text.items()}
    if arm.stage == "sft":  # response tokens of the held-out rows, through the run's own template
        config = find_run_config(out)
        if config is None:
            raise FileNotFoundError(f"{out}: no training_args.yaml to rebuild the run's eval sets from")
        names = {f"{d}_sft_eval": d for d in DOMAINS}
        args = read_run_args(config, [f"eval_dataset={','.join(names)}"])
        sets = load_run_eval_sets(args, tokenizer)
        losses = {names[n]: r.loss for n, r in score_eval_sets(model, sets).items()}
    accuracy = on_text["arithmetic"].accuracy
    assert accuracy is not None
    wall = json.loads((out / "wall.json").read_text())["seconds"] if (out / "wall.json").is_file() else math.nan
    result = {
        "loss": losses,
        "arithmetic_accuracy": accuracy.accuracy,
        "arithmetic_equations": accuracy.total,
        "seconds": wall,
    }
    cached.write_text(json.dumps(result, indent=2) + "\n")
    return result


def collect(exp: Experiment) -> None:
    """Evaluate every arm whose runs are all trained (the others are left out of the table)."""
    for arm in exp.arms:
        trained = all((exp.run_dir(arm.name, s) / "train_results.json").is_file() for s in exp.seeds)
        if arm.evaluate and trained:
            exp.results[arm.name] = [evaluate_run(exp, arm, seed) for seed in exp.seeds]
        elif arm.evaluate:
            print(f"  {arm.name}: not trained for every seed; left out", flush=True)
    if exp.baseline not in exp.results:
        raise RuntimeError(f"the baseline {exp.baseline!r} is not trained; train it first")


# -- tables ---------------------------------------------------------------------------------------


def _summary(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {spread:.4f}"


def learnable_mean(result: dict[str, Any]) -> float:
    return statistics.fmean(result["loss"][d] for d in LEARNABLE)


def worst(result: dict[str, Any]) -> float:
    return max(result["loss"][d] for d in LEARNABLE)


def table(exp: Experiment) -> str:
    """A markdown table: per-domain loss, learnable mean, worst learnable domain, arithmetic
    accuracy (each mean ± sample std over seeds), and the paired difference from the baseline."""
    base = exp.results[exp.baseline]
    goal = (lambda r: r["loss"][exp.target], f"{exp.target} loss") if exp.target else (learnable_mean, "learnable mean")
    metric, metric_name = goal
    head = [
        "arm",
        *DOMAINS,
        "learnable mean",
        "worst learnable",
        "arith. accuracy",
        f"Δ {metric_name} vs {exp.baseline}",
        "better on seeds",
        "s / run",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in exp.results.items():
        diffs = [metric(r) - metric(b) for r, b in zip(runs, base, strict=True)]
        wins = sum(d < 0 for d in diffs)
        cells = [
            f"**{name}**" if name == exp.baseline else name,
            *(_summary([r["loss"][d] for r in runs]) for d in DOMAINS),
            _summary([learnable_mean(r) for r in runs]),
            _summary([worst(r) for r in runs]),
            _summary([r["arithmetic_accuracy"] for r in runs]),
            "—" if name == exp.baseline else f"{statistics.fmean(diffs):+.4f}",
            "—" if name == exp.baseline else f"{wins}/{len(runs)}",
            f"{statistics.fmean(r['seconds'] for r in runs):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(exp: Experiment, seed: int) -> list[Path]:
    """``datasteer plot`` of every steered arm's run of ``seed``."""
    from datasteer.plot import plot_run

    drawn = []
    for arm in exp.arms:
        out = exp.run_dir(arm.name, seed)
        if (out / "steering.jsonl").is_file():
            try:
                drawn.append(plot_run(out, exp.report_dir / f"{arm.name}.png"))
            except ValueError:
                continue  # nothing to draw (e.g. only a closing record)
    return drawn


def run_experiment(
    name: str,
    title: str,
    baseline: str,
    arms: list[Arm],
    *,
    doc: str,
    steps: int = 150,
    seeds: Sequence[int] = (1, 2, 3),
    output: str = "outputs/experiments/tiny",
    target: str | None = None,
    eval_length: int = 128,
) -> int:
    """Parse the command line (defaults from the arguments) and run the experiment."""
    ns = parse_args(doc.splitlines()[0], steps=steps, seeds=seeds, output=output)
    exp = Experiment(
        name, title, baseline, arms, ns.seeds, ns.steps, Path(ns.output_dir), target=target, eval_length=eval_length
    )
    return main(exp, ns)


def main(exp: Experiment, ns: argparse.Namespace) -> int:
    started = time.perf_counter()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the evaluation passes are short; keep the log readable
    print(f"{exp.title}: {len(exp.arms)} arms x seeds {exp.seeds}, {exp.steps} steps -> {exp.output}", flush=True)
    run_all(exp, ns.jobs, ns.only, ns.force)
    collect(exp)
    text = table(exp)
    exp.report_dir.mkdir(parents=True, exist_ok=True)
    (exp.report_dir / "table.md").write_text(text + "\n")
    (exp.report_dir / "results.json").write_text(json.dumps(exp.results, indent=2) + "\n")
    drawn = plots(exp, exp.seeds[0])
    print(f"\n{exp.title} (mean ± std over seeds {exp.seeds}; Δ is paired by seed, negative is better):\n")
    print(text)
    print(f"\nplots: {', '.join(str(p) for p in drawn)}")
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 0
