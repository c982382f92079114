"""What steering costs: every registered algorithm's run against the same run without steering.

Each arm is the README's own example config (``examples/<paradigm>_<name>.yaml``: the tiny
Llama on the built-in corpus) run with ``datasteer train`` in a subprocess, as a user runs
it, at equal steps. The baseline ``plain`` is the same YAML without its ``datasteer:``
block, run with ``llamafactory-cli train``. Arms run interleaved (plain, a, b, ..., plain,
a, b, ...) ``--repeats`` times, and each figure is a median, because the machine may be
shared: compare the ratios, not the seconds.

Mixers, weighters and the composed run: **overhead** = (median train time of the arm /
median train time of ``plain``) - 1, where the train time is the Trainer's own
``train_runtime`` (from the first step to the last, steering updates included; process
start-up and data loading excluded, since they do not grow with the run). ``dynamic_moe``
runs on the built-in MoE model and is compared with its own plain run.

Selectors (one run each; their cost is in their updates, which ``steering.jsonl`` times):
**s / update** (median over updates after the first; the first, which for ``near``/
``cluster_less`` embeds the whole pool, is shown apart), **ms / candidate** (for
selectors with a ``candidates`` setting), **update / step** (one update over one training
step of the same run, the updates' time taken out), and for the forward-only ``loss``
selector the **scoring throughput**: samples scored per second over samples trained per
second.

Goals (issue 13): mixers <= 3%, ``loss`` weighting <= 5%, ``adapt`` <= 10%, a forward-only
scoring pass >= 3x the samples/s of training.

Run: ``.venv/bin/python benchmarks/overhead.py [--quick] [--repeats N] [--steps N] [--only NAME ...]``
The last line is ``RESULT overhead_<name>=<fraction> ... scoring_vs_training=<x>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent

GOALS = {"mix": 0.03, "weight/loss_weight": 0.05, "weight/adapt": 0.10}


@dataclass
class Arm:
    """One run: an example config, with extra ``key=value`` overrides."""

    name: str
    kind: str  # plain | mix | weight | compose | select
    config: str
    overrides: list[str] = field(default_factory=list)
    baseline: str = "plain"  # the plain arm it is compared with
    candidates: int | None = None  # candidates scored per update (selectors), when fixed

    @property
    def goal(self) -> float | None:
        return GOALS.get(f"{self.kind}/{self.name}", GOALS.get(self.kind))


def arms(tiny_llama: str) -> list[Arm]:
    """Every registered mixer, weighter and selector, one composed run, and the plain runs."""
    reference = [f"datasteer.params.reference_model={tiny_llama}"]
    return [
        Arm("plain", "plain", "mix_static.yaml"),
        Arm("plain_moe", "plain", "mix_dynamic_moe.yaml"),
        *(Arm(n, "mix", f"mix_{n}.yaml") for n in ("static", "random", "scheduled", "odm", "aioli", "ado")),
        Arm("doremi", "mix", "mix_doremi_2_proxy.yaml", reference),
        Arm("dynamic_moe", "mix", "mix_dynamic_moe.yaml", baseline="plain_moe"),
        Arm("uniform", "weight", "weight_uniform.yaml"),
        Arm("loss_weight", "weight", "weight_loss.yaml"),
        Arm("adapt", "weight", "weight_adapt.yaml"),
        Arm("custom_weight", "weight", "weight_custom.yaml"),
        Arm("reducible", "weight", "weight_reducible.yaml", reference),
        Arm("odm+loss+loss", "compose", "compose_mix_select_weight.yaml"),
        Arm("random_select", "select", "select_random.yaml"),
        Arm("loss_select", "select", "select_loss.yaml", candidates=512),
        Arm("delta_loss", "select", "select_delta_loss.yaml"),
        Arm("custom_select", "select", "select_custom.yaml"),
        Arm("less", "select", "select_less.yaml", candidates=512),
        Arm("cluster_less", "select", "select_cluster_less.yaml"),
        Arm("near", "select", "select_near.yaml"),
        Arm("tsds", "select", "select_tsds.yaml"),
        Arm("nice", "select", "select_nice.yaml", candidates=128),
    ]


QUICK = ("plain", "static", "odm", "loss_weight", "adapt", "odm+loss+loss", "loss_select", "less")


def _key(arm: Arm) -> str:
    return arm.name


def _plain_config(example: Path, out: Path, overrides: list[str]) -> Path:
    """The example without its ``datasteer:`` block, built-ins resolved and ``overrides``
    applied (``llamafactory-cli`` would read ``save_strategy=no`` as false)."""
    from datasteer.assets import resolve_builtin
    from datasteer.config import apply_overrides

    data = apply_overrides(yaml.safe_load(example.read_text()), overrides)
    data.pop("datasteer")
    for key in ("model_name_or_path", "dataset_dir"):
        if isinstance(data.get(key), str):
            data[key] = resolve_builtin(data[key])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _run(arm: Arm, out: Path, common: list[str], log: Path) -> dict[str, Any]:
    """Train one arm in a subprocess; its train time, wall time and steering records."""
    if out.exists():
        shutil.rmtree(out)
    overrides = [f"output_dir={out}", *common, *arm.overrides]
    if arm.kind == "plain":
        config = _plain_config(EXAMPLES / arm.config, out.parent / f"{arm.name}.yaml", overrides)
        cmd = [str(BIN / "llamafactory-cli"), "train", str(config)]
    else:
        cmd = [sys.executable, "-m", "datasteer", "train", str(EXAMPLES / arm.config), *overrides]
    started = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - started
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"{arm.name}: `{' '.join(cmd)}` failed with exit code {code}:\n{tail}")
    metrics = json.loads((out / "train_results.json").read_text())
    records = []
    if (out / "steering.jsonl").exists():
        records = [json.loads(line) for line in (out / "steering.jsonl").read_text().splitlines() if line]
    return {"train": float(metrics["train_runtime"]), "wall": wall, "records": records}


def _prepare_tsds(out: Path, common: list[str], log: Path) -> str:
    """``datasteer prepare tsds`` once (not timed): the tsds arm reads what it writes."""
    prepared = out / "prepared_tsds"
    if not prepared.is_dir():
        cmd = [
            sys.executable,
            "-m",
            "datasteer",
            "prepare",
            "tsds",
            str(EXAMPLES / "select_tsds.yaml"),
            f"datasteer.params.prepared={prepared}",
            *common,
        ]
        with log.open("w") as fh:
            if subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT) != 0:
                raise SystemExit(f"datasteer prepare tsds failed; see {log}")
    return f"datasteer.params.prepared={prepared}"


def _select_figures(arm: Arm, runs: list[dict[str, Any]], steps: int, batch: int) -> dict[str, float]:
    run = runs[0]
    updates = [r["seconds"] for r in run["records"] if r.get("paradigm") == "select"]
    if not updates:
        raise SystemExit(f"{arm.name}: the run made no selection update; give it more --steps")
    later = updates[1:] or updates
    per_update = statistics.median(later)
    step = (run["train"] - sum(updates)) / steps
    figures = {"first_s": updates[0], "update_s": per_update, "update_vs_step": per_update / step, "step_s": step}
    if arm.candidates:
        figures["ms_per_candidate"] = 1000 * per_update / arm.candidates
        figures["scoring_vs_training"] = (arm.candidates / per_update) / (batch / step)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the timed arms (default 3)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}; 2 repeats, 30 steps")
    parser.add_argument("--only", nargs="+", default=None, help="arms to run (plain is always run)")
    parser.add_argument("--output-dir", default=str(ROOT / "outputs" / "bench" / "overhead"))
    ns = parser.parse_args(argv)
    if ns.quick:
        ns.steps, ns.repeats, ns.only = min(ns.steps, 30), min(ns.repeats, 2), ns.only or list(QUICK)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasteer.assets import ensure_builtin

    tiny = str(ensure_builtin("tiny-llama"))
    every = arms(tiny)
    wanted = set(ns.only or [_key(a) for a in every])
    unknown = wanted - {_key(a) for a in every}
    if unknown:
        raise SystemExit(f"--only: unknown arm(s) {sorted(unknown)}; choose from {[_key(a) for a in every]}")
    chosen = [a for a in every if _key(a) in wanted or a.kind == "plain"]
    if not any(a.baseline == "plain_moe" for a in chosen):
        chosen = [a for a in chosen if a.name != "plain_moe"]
    out = Path(ns.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = ["save_strategy=no", "logging_steps=1000", "report_to=none", f"max_steps={ns.steps}", "do_eval=false"]
    batch = int(yaml.safe_load((EXAMPLES / "mix_static.yaml").read_text())["per_device_train_batch_size"])
    if any(a.name == "tsds" for a in chosen):
        prepared = _prepare_tsds(out, common, out / "prepare_tsds.log")
        for a in chosen:
            if a.name == "tsds":
                a.overrides.append(prepared)
    timed = [a for a in chosen if a.kind != "select"]
    print(
        f"overhead: {len(chosen)} arms, {ns.steps} steps each, timed arms x{ns.repeats} interleaved -> {out}",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {_key(a): [] for a in chosen}
    for repeat in range(ns.repeats):
        for arm in chosen if repeat == 0 else timed:
            key = _key(arm)
            result = _run(arm, out / key, common, out / f"{key}.log")
            results[key].append(result)
            print(
                f"  [{repeat + 1}/{ns.repeats}] {key:<14} train {result['train']:7.2f} s  wall {result['wall']:6.1f} s",
                flush=True,
            )

    (out / "results.json").write_text(json.dumps(results, indent=1))
    summary: dict[str, float] = {}
    print("\nMixers, weighters, composed: train time (median) over the plain run's")
    print(f"{'arm':<16}{'kind':<9}{'train s':>9}{'plain s':>9}{'overhead':>10}{'goal':>8}  met")
    for arm in timed:
        if arm.kind == "plain":
            continue
        mine = statistics.median(r["train"] for r in results[_key(arm)])
        base = statistics.median(r["train"] for r in results[arm.baseline])
        overhead = mine / base - 1
        summary[f"overhead_{_key(arm)}"] = overhead
        goal = arm.goal
        met = "" if goal is None else ("yes" if overhead <= goal else "NO")
        goal_text = "" if goal is None else f"{goal:.0%}"
        print(f"{_key(arm):<16}{arm.kind:<9}{mine:9.2f}{base:9.2f}{overhead:+10.1%}{goal_text:>8}  {met}")

    selectors = [a for a in chosen if a.kind == "select"]
    if selectors:
        print("\nSelectors: cost of one update (one run each; the first update apart)")
        print(
            f"{'selector':<14}{'first s':>9}{'s/update':>10}{'ms/cand.':>10}{'step s':>8}{'update/step':>13}{'scoring/train':>15}"
        )
        for arm in selectors:
            f = _select_figures(arm, results[_key(arm)], ns.steps, batch)
            per_cand = f"{f['ms_per_candidate']:10.2f}" if "ms_per_candidate" in f else f"{'-':>10}"
            ratio = (
                f"{f['scoring_vs_training']:14.1f}x"
                if arm.name == "loss_select" and "scoring_vs_training" in f
                else f"{'-':>15}"
            )
            print(
                f"{arm.name:<14}{f['first_s']:9.2f}{f['update_s']:10.2f}{per_cand}{f['step_s']:8.3f}{f['update_vs_step']:12.1f}x{ratio}"
            )
            summary[f"update_vs_step_{arm.name}"] = f["update_vs_step"]
            if arm.name == "loss_select" and "scoring_vs_training" in f:
                summary["scoring_vs_training"] = f["scoring_vs_training"]
        print("goal: the loss selector's forward-only scoring >= 3x the samples/s of training")
    print("RESULT " + " ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
