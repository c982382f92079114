"""Wall time that datasteer and the reference implementation (DataFlex) add to a LLaMA-Factory run.

Every arm trains the same tiny LoRA SFT run as a separate subprocess, and the arms are
interleaved (plain, reference, datasteer, ... then again) ``--repeats`` times so that load
from other jobs on the machine falls on every arm alike. Each arm's median wall time is
compared with plain ``llamafactory-cli train``; the figures that matter are, per algorithm::

    added_time_ratio_<name> = (datasteer wall - plain wall) / (reference wall - plain wall)
    speedup_<name>          = reference wall / datasteer wall

The goal is ``added_time_ratio <= 0.1`` for ``loss`` and ``less`` (datasteer adds at most a
tenth of what the reference adds).

Run (the reference is a benchmark baseline only, never a dependency of datasteer)::

    .venv/bin/pip install --no-deps dataflex==1.1.0 traker==0.3.2   # traker: the reference's LESS
    PYTHONPATH=. .venv/bin/python benchmarks/vs_reference.py --quick
    PYTHONPATH=. .venv/bin/python benchmarks/vs_reference.py              # full, 2 repeats
    PYTHONPATH=. .venv/bin/python benchmarks/vs_reference.py --only loss less

Without ``dataflex`` importable the script says it skipped and exits 0.

The shared run (one LLaMA-Factory YAML; every arm adds only its own keys):

* model: datasteer's ``builtin:tiny-llama`` materialised as a local directory (Llama, hidden
  128, 4 layers, 1.9 M parameters, byte-level BPE tokenizer), LoRA r8 on every linear layer
  (78,848 trainable parameters); nothing is downloaded (``HF_HUB_OFFLINE=1``);
* data: datasteer's built-in corpus materialised as a ``dataset_dir`` with its
  ``dataset_info.json``: the alpaca views ``prose_sft,code_sft,arithmetic_sft,noise_sft``,
  ``max_samples`` rows each (``--rows-per-domain``: 80 full, i.e. a 320-row pool; 25 quick),
  ``cutoff_len`` 128, ``template: default``; ``eval_dataset: arithmetic_sft_eval`` (LESS's
  target set: its 100 rows, or ``max_samples`` if fewer: 80 full; no arm evaluates, every arm loads it).
  The pool is small because the reference's LESS takes about one second per pool sample on
  two busy CPU cores (one backward pass per sample, then TRAK's CPU projector, which draws
  its random matrix again for every chunk of 16 gradients): a 2,000-row pool would take
  over an hour per run;
* training: batch 8, no accumulation, ``max_steps`` = warm-up 4 + 2 updates x 6 steps = 16,
  ``num_train_epochs: 1``, ``dataloader_num_workers: 0``, no checkpoints (``save_strategy:
  no``; the final adapter is saved), seed 42.

How the settings map (reference key -> datasteer key):

* schedule: ``warmup_step: 4, update_step: 6, update_times: 2, train_step: 16`` ->
  ``warmup_steps: 4, update_every: 6`` (``max_steps`` 16 gives 2 updates): both update after
  optimizer steps 4 and 10. The reference trains its warm-up steps on 32 random draws (with
  replacement) of the pool; datasteer trains them on the whole pool, shuffled.
* samples per update: the reference selects ``batch x update_step`` = 48 samples per update;
  datasteer selects ``global batch x update_every`` = 48.
* ``random``: ``replacement: false`` -> ``replacement: false``.
* ``loss``: both score the **whole pool** at every update (the reference has no candidate
  subset; datasteer ``candidates: null``), ``focus: high`` -> ``focus: high`` (focus weight 5,
  quantiles 0.33/0.66, temperature 1 in both). The reference scores with its shipped
  ``score_batch_size: 8`` and ``score_num_workers: 2``; datasteer with its own batched pass.
* ``less``: both compute Adam-preconditioned projected gradient features of the **whole
  pool** and plain projected features of every target row at every update;
  ``proj_dim: 512`` -> ``proj_dim: 512`` (``--proj-dim``); ``gradient_type: adam`` ->
  ``adam: true``. The reference takes one backward pass per sample and projects with TRAK's
  ``BasicProjector`` (no CUDA here), fp16, ``save_interval`` 16; datasteer uses its default
  ``method: vmap``.
* ``odm`` (mix; each dataset is a domain): ``train_type: dynamic_mix``,
  ``mixture_sample_rule: mixture``, ``init_mixture_proportions`` uniform, mixer ``alpha 0.9,
  reward_scale 15, min_exploration_rate 0.03, warmup_steps 0`` (the shipped 2000 would
  never update) -> ``alpha: 0.9, reward_scale: 15, min_exploration: 0.03, estimator:
  importance`` (the reference's Exp3 rule), same schedule as above.

The reference caches its selections keyed by step alone in ``cache_dir``, so a second run
would reuse the first's; every run here gets a fresh output directory with its own
``components.yaml`` and ``cache_dir``, cleared before the run. Logs of every run stay under
``--output-dir`` (``logs/<arm>_r<k>.log``), with ``results.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ALGORITHMS = ("random", "loss", "less", "odm")
GOAL_ALGORITHMS = ("loss", "less")
GOAL_RATIO = 0.1
BIN = Path(sys.executable).parent
DOMAINS = ("prose", "code", "arithmetic", "noise")


@dataclass(frozen=True)
class Settings:
    """The shared run's size."""

    rows_per_domain: int
    proj_dim: int
    batch_size: int = 8
    warmup_steps: int = 4
    update_every: int = 6
    updates: int = 2

    @property
    def max_steps(self) -> int:
        return self.warmup_steps + self.update_every * self.updates


@dataclass(frozen=True)
class Arm:
    """One subprocess configuration: ``tool`` is plain, dataflex or datasteer."""

    tool: str
    algorithm: str | None = None

    @property
    def name(self) -> str:
        return self.tool if self.algorithm is None else f"{self.tool}/{self.algorithm}"


def base_config(s: Settings, model_dir: Path, corpus_dir: Path, output_dir: Path) -> dict[str, Any]:
    """The LLaMA-Factory keys every arm shares."""
    return {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 8,
        "dataset_dir": str(corpus_dir),
        "dataset": ",".join(f"{d}_sft" for d in DOMAINS),
        "eval_dataset": "arithmetic_sft_eval",
        "max_samples": s.rows_per_domain,
        "template": "default",
        "cutoff_len": 128,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": "none",
        "per_device_train_batch_size": s.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": 5.0e-3,
        "lr_scheduler_type": "cosine",
        "max_steps": s.max_steps,
        "num_train_epochs": 1.0,
        "dataloader_num_workers": 0,
        "seed": 42,
    }


def dataflex_components(s: Settings, algorithm: str, cache_dir: Path) -> dict[str, Any]:
    """The reference's ``components.yaml`` with the one component this run uses."""
    if algorithm == "odm":
        params = {
            "alpha": 0.9,
            "warmup_steps": 0,
            "reward_scale": 15.0,
            "min_exploration_rate": 0.03,
            "initial_proportions": [1.0 / len(DOMAINS)] * len(DOMAINS),
        }
        return {"mixers": {"odm": {"name": "odm", "params": params}}}
    params = {
        "random": {"seed": 42, "replacement": False},
        "loss": {"focus": "high", "score_batch_size": 8},
        "less": {"gradient_type": "adam", "proj_dim": s.proj_dim, "seed": 123, "save_interval": 16},
    }[algorithm]
    return {"selectors": {algorithm: {"name": algorithm, "params": {"cache_dir": str(cache_dir), **params}}}}


def dataflex_keys(s: Settings, algorithm: str, components: Path) -> dict[str, Any]:
    """The reference's keys added to the shared YAML."""
    keys: dict[str, Any] = {
        "train_type": "dynamic_mix" if algorithm == "odm" else "dynamic_select",
        "components_cfg_file": str(components),
        "component_name": algorithm,
        "warmup_step": s.warmup_steps,
        "update_step": s.update_every,
        "update_times": s.updates,
        "train_step": s.max_steps,
    }
    if algorithm == "odm":
        keys["mixture_sample_rule"] = "mixture"
        keys["init_mixture_proportions"] = [1.0 / len(DOMAINS)] * len(DOMAINS)
    return keys


def datasteer_block(s: Settings, algorithm: str) -> dict[str, Any]:
    """The ``datasteer:`` block of a datasteer arm."""
    params: dict[str, Any] = {
        "random": {"replacement": False},
        "loss": {"focus": "high", "candidates": None},
        "less": {"proj_dim": s.proj_dim, "method": "vmap", "adam": True, "candidates": None},
        "odm": {"estimator": "importance", "alpha": 0.9, "reward_scale": 15.0, "min_exploration": 0.03},
    }[algorithm]
    return {
        "paradigm": "mix" if algorithm == "odm" else "select",
        "algorithm": algorithm,
        "warmup_steps": s.warmup_steps,
        "update_every": s.update_every,
        "params": params,
    }


def prepare_run(arm: Arm, s: Settings, assets: tuple[Path, Path], run_dir: Path) -> list[str]:
    """Write the run's config(s) into a fresh ``run_dir``; return the command."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # also the reference's cache_dir: never reuse another run's losses
    run_dir.mkdir(parents=True)
    config = base_config(s, *assets, run_dir / "output")
    if arm.tool == "plain":
        command = [str(BIN / "llamafactory-cli"), "train"]
    elif arm.tool == "dataflex":
        assert arm.algorithm is not None
        components = run_dir / "components.yaml"
        components.write_text(yaml.safe_dump(dataflex_components(s, arm.algorithm, run_dir / "dataflex_cache")))
        config.update(dataflex_keys(s, arm.algorithm, components))
        command = [str(BIN / "dataflex-cli"), "train"]
    else:
        assert arm.algorithm is not None
        config["datasteer"] = datasteer_block(s, arm.algorithm)
        command = [str(BIN / "datasteer"), "train"]
    path = run_dir / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return [*command, str(path)]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        DISABLE_VERSION_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class RunResult:
    wall_s: float
    train_s: float | None
    update_s: float | None


def read_train_runtime(log: str) -> float | None:
    """The Trainer's ``train_runtime`` (the training loop alone), from the run's log."""
    found = re.findall(r"'train_runtime': '?([0-9.]+)", log)
    return float(found[-1]) if found else None


def read_update_seconds(run_dir: Path) -> float | None:
    """Seconds datasteer's run record says its updates took (None for other tools)."""
    path = run_dir / "output" / "steering.jsonl"
    if not path.is_file():
        return None
    total = 0.0
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for key in ("seconds", "time_s", "elapsed_s", "duration_s"):
            if isinstance(record.get(key), int | float):
                total += float(record[key])
                break
    return total


def run_arm(arm: Arm, s: Settings, assets: tuple[Path, Path], out: Path, tag: str) -> RunResult:
    """Run one arm as a subprocess and time it; exit loudly with the log's tail if it fails."""
    slug = arm.name.replace("/", "_")
    run_dir = out / "runs" / f"{slug}_{tag}"
    command = prepare_run(arm, s, assets, run_dir)
    log_path = out / "logs" / f"{slug}_{tag}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        start = time.perf_counter()
        rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(), check=False).returncode
        wall = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    if rc != 0:
        tail = "\n".join(text.splitlines()[-40:])
        sys.exit(f"{arm.name} ({tag}) failed with exit code {rc}: {' '.join(command)}\n--- {log_path} (tail)\n{tail}")
    result = RunResult(wall, read_train_runtime(text), read_update_seconds(run_dir))
    print(f"  {arm.name:<18} {tag:<6} {wall:8.1f} s (train loop {result.train_s or float('nan'):.1f} s)", flush=True)
    return result


def materialise_assets() -> tuple[Path, Path]:
    """Local directories of the tiny Llama and the corpus (built once, then reused)."""
    from datasteer.assets import ensure_builtin

    return ensure_builtin("tiny-llama"), ensure_builtin("corpus")


def fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3g}"


def summarise(results: dict[str, list[RunResult]], algorithms: list[str], s: Settings, repeats: int) -> str:
    """Print the table and return the RESULT line."""
    median = {name: statistics.median(r.wall_s for r in runs) for name, runs in results.items()}
    plain = median["plain"]
    print(
        f"\n{s.rows_per_domain * len(DOMAINS)} pool rows, {s.max_steps} steps, batch {s.batch_size}, "
        f"{s.updates} updates, proj_dim {s.proj_dim}, median of {repeats}"
    )
    print(f"{'arm':<20}{'median s':>10}{'added s':>10}{'train s':>10}{'steer s':>10}  runs (wall s)")
    for name, runs in results.items():
        train, steer = (
            statistics.median(xs) if (xs := [x for x in values if x is not None]) else float("nan")
            for values in ([r.train_s for r in runs], [r.update_s for r in runs])
        )
        walls = " ".join(f"{r.wall_s:.1f}" for r in runs)
        print(f"{name:<20}{median[name]:>10.1f}{median[name] - plain:>10.1f}{train:>10.1f}{fmt(steer):>10}  {walls}")
    print("(train s: the Trainer's train_runtime; steer s: update time in datasteer's run record)")
    print(f"\n{'algorithm':<10}{'ref added':>11}{'ours added':>12}{'added ratio':>13}{'speedup':>9}  goal")
    parts = []
    for algorithm in algorithms:
        ref, ours = median[f"dataflex/{algorithm}"], median[f"datasteer/{algorithm}"]
        ref_added, ours_added = ref - plain, ours - plain
        ratio = ours_added / ref_added if ref_added > 0 else float("nan")
        speedup = ref / ours
        if algorithm in GOAL_ALGORITHMS:
            goal = f"added ratio <= {GOAL_RATIO}: {'met' if ratio <= GOAL_RATIO else 'NOT met'}"
        else:
            goal = "(no goal)"
        print(f"{algorithm:<10}{ref_added:>11.1f}{ours_added:>12.1f}{fmt(ratio):>13}{speedup:>9.2f}  {goal}")
        parts += [f"added_time_ratio_{algorithm}={fmt(ratio)}", f"speedup_{algorithm}={speedup:.2f}"]
    return "RESULT " + " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="25 rows per domain and 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 2; quick 1)")
    parser.add_argument("--only", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS), metavar="NAME")
    parser.add_argument("--rows-per-domain", type=int, default=None, help="max_samples (default 80; quick 25)")
    parser.add_argument("--proj-dim", type=int, default=512, help="LESS projection dimension of both tools")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/bench_vs_reference"))
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed plain run that warms caches")
    args = parser.parse_args(argv)

    if importlib.util.find_spec("dataflex") is None:
        print("skipped: the reference (dataflex) is not importable; pip install --no-deps dataflex==1.1.0")
        return 0
    if "less" in args.only and importlib.util.find_spec("trak") is None:
        print("skipped: the reference's LESS needs TRAK; pip install --no-deps traker==0.3.2")
        return 0

    repeats = args.repeats or (1 if args.quick else 2)
    rows = args.rows_per_domain or (25 if args.quick else 80)
    s = Settings(rows_per_domain=rows, proj_dim=args.proj_dim)
    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    assets = materialise_assets()

    algorithms = [a for a in ALGORITHMS if a in args.only]
    arms = [Arm("plain")]
    for algorithm in algorithms:
        arms += [Arm("dataflex", algorithm), Arm("datasteer", algorithm)]
    print(f"arms: {', '.join(a.name for a in arms)}; logs in {out / 'logs'}", flush=True)

    if not args.no_warmup:  # the first run pays the datasets cache and cold file reads: untimed
        run_arm(Arm("plain"), s, assets, out, "warmup")
    results: dict[str, list[RunResult]] = {a.name: [] for a in arms}
    for k in range(repeats):
        # Alternate the order of each pair between rounds, so neither tool always runs first.
        order = (
            arms if k % 2 == 0 else [arms[0]] + [a for pair in zip(arms[2::2], arms[1::2], strict=True) for a in pair]
        )
        for arm in order:
            results[arm.name].append(run_arm(arm, s, assets, out, f"r{k + 1}"))

    line = summarise(results, algorithms, s, repeats)
    (out / "results.json").write_text(
        json.dumps(
            {
                "settings": s.__dict__,
                "repeats": repeats,
                "runs": {n: [r.__dict__ for r in rs] for n, rs in results.items()},
                "result": line,
            },
            indent=2,
        )
    )
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
