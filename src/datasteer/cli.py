"""The ``datasteer`` command: train, prepare, list, assets, quickstart, eval, plot, version.

A bad configuration prints one line saying what is wrong and how to fix it, exits with
code 2, and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasteer import __version__
from datasteer.errors import ConfigError

EXIT_CONFIG = 2
#: A run that started and then failed on purpose (a datasteer error, a data file it could not read).
EXIT_FAILED = 1


def _fail(message: str, code: int = EXIT_CONFIG) -> int:
    print(f"datasteer: error: {message}", file=sys.stderr)
    return code


def _run_failure(err: BaseException) -> tuple[str, int] | None:
    """(one line, exit code) for an error a run raises on purpose or a known data error;
    None for anything else (a bug, which keeps its traceback)."""
    from datasets.exceptions import DatasetGenerationError

    from datasteer.errors import DatasteerError
    from datasteer.validate import first_line

    if isinstance(err, ConfigError):
        return first_line(err), EXIT_CONFIG
    if isinstance(err, DatasteerError):
        return first_line(err), EXIT_FAILED
    if isinstance(err, DatasetGenerationError):
        cause = err.__cause__ or err.__context__ or err
        return f"a data file could not be read ({first_line(cause)})", EXIT_CONFIG
    if isinstance(err, RuntimeError) and str(err).startswith("Cannot find"):
        # LLaMA-Factory, when preprocessing dropped every row (too short for cutoff_len, no response)
        return f"dataset: no usable rows after preprocessing ({first_line(err)})", EXIT_CONFIG
    return None


def _remove_if_empty(path: Path) -> None:
    """Remove ``path`` if it holds no file: a failed run created it and wrote nothing in it."""
    if os.environ.get("RANK", "0") != "0" or not path.is_dir():
        return
    if any(p.is_file() or p.is_symlink() for p in path.rglob("*")):
        return
    for folder in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        folder.rmdir()
    path.rmdir()


def prepare_run(config_path: str, overrides: Sequence[str]) -> tuple[dict[str, Any], Any]:
    """Read a run YAML, apply overrides, validate the ``datasteer:`` block, resolve builtins.

    Returns ``(framework_args, steering_plan_or_None)``: the plan's algorithms are built
    here, once; raises ConfigError.
    """
    from datasteer.config import apply_overrides, read_yaml
    from datasteer.plan import build_plan

    data = apply_overrides(read_yaml(config_path), overrides)
    block = data.pop("datasteer", None)
    steering = build_plan(block) if block is not None else None
    if steering is not None:
        steering.check_domains([n.strip() for n in str(data.get("dataset") or "").split(",") if n.strip()])
    for key, value in list(data.items()):
        if isinstance(value, str) and value.startswith("builtin:"):
            from datasteer.assets import resolve_builtin

            try:
                data[key] = resolve_builtin(value)
            except ValueError as err:
                raise ConfigError(f"{key}: {err}") from None
    return data, steering


def write_run_config(config_path: str, overrides: Sequence[str], output_dir: str | None) -> Path | None:
    """Keep the run's config, overrides applied, as ``OUTPUT_DIR/training_args.yaml`` (the name
    LLaMA-Factory's web UI uses), so that ``datasteer eval OUTPUT_DIR`` finds the run's own
    eval sets and template. Only the first process of a launch writes it."""
    if not output_dir or os.environ.get("RANK", "0") != "0":
        return None
    import yaml

    from datasteer.config import apply_overrides, read_yaml

    data = apply_overrides(read_yaml(config_path), overrides)
    path = Path(output_dir) / "training_args.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cmd_train(ns: argparse.Namespace) -> int:
    from datasteer import launch

    try:
        settings = launch.launch_settings(ns.nproc, ns.nnodes, ns.node_rank, ns.master_addr, ns.master_port)
        args, steering = prepare_run(ns.config, ns.overrides)
        from datasteer.integrations import llamafactory

        if settings is not None:
            # Checked once here, so that a bad config is one line, not one per worker. LLaMA-Factory
            # refuses a deepspeed config outside a launched worker: the workers check that key.
            llamafactory.validate({k: v for k, v in args.items() if k != "deepspeed"}, steering)
        else:
            parsed = llamafactory.validate(args, steering)  # everything checkable before a model loads
    except ConfigError as err:
        return _fail(str(err))
    if settings is not None:
        return launch.launch(settings, [ns.config, *ns.overrides])
    output_dir = args.get("output_dir")
    fresh = Path(str(output_dir)) if output_dir and not Path(str(output_dir)).exists() else None
    try:
        llamafactory.run(args, steering, parsed)
    except Exception as err:
        failure = _run_failure(err)
        if failure is None:
            raise
        if fresh is not None:
            _remove_if_empty(fresh)
        return _fail(*failure)
    write_run_config(ns.config, ns.overrides, str(output_dir) if output_dir else None)
    return 0


def cmd_prepare(ns: argparse.Namespace) -> int:
    try:
        args, steering = prepare_run(ns.config, ns.overrides)
        from datasteer.prepare import prepare

        path = prepare(ns.kind, args, steering)
    except Exception as err:
        failure = _run_failure(err)
        if failure is None:
            raise
        return _fail(*failure)
    print(f"datasteer: prepared {ns.kind}: {path}")
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    from datasteer.config import field_help
    from datasteer.registry import registry_for

    paradigms = [ns.paradigm] if ns.paradigm else ["select", "mix", "weight"]
    for paradigm in paradigms:
        print(f"{paradigm}:")
        for spec in registry_for(paradigm):
            print(f"  {spec.name:<12} {spec.summary}")
            for name, type_name, default, help_text in field_help(spec.params_cls):
                print(f"      {name}: {type_name} = {default}  {help_text}")
        print()
    return 0


def cmd_assets(ns: argparse.Namespace) -> int:
    from datasteer.assets import SmolLM2UnavailableError, build_all, ensure_builtin

    for name, path in build_all(force=ns.force).items():
        print(f"{name}: {path}")
    if ns.smollm2:
        try:
            print(f"smollm2-135m: {ensure_builtin('smollm2-135m', force=ns.force)}")
        except SmolLM2UnavailableError as err:
            return _fail(str(err))
    return 0


def cmd_quickstart(ns: argparse.Namespace) -> int:
    from datasteer.quickstart import run_quickstart

    try:
        return run_quickstart(output_dir=Path(ns.output_dir), steps=ns.steps, mixer=ns.mixer)
    except ConfigError as err:
        return _fail(str(err))
    except RuntimeError as err:
        print(f"datasteer: quickstart failed: {err}", file=sys.stderr)
        return 1


def cmd_eval(ns: argparse.Namespace) -> int:
    import torch

    from datasteer import evaluate
    from datasteer.assets import resolve_builtin

    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARNING")  # its log goes to stdout, as the table does
    try:
        domains = [d for d in ns.domains.split(",") if d] if ns.domains else None
        config, *overrides = ns.config or [None if ns.corpus else evaluate.find_run_config(resolve_builtin(ns.model))]
        if ns.config and ns.corpus:
            raise ConfigError("--config and --corpus are two sources of eval data; choose one")
        if config is None and ns.exact_match:
            raise ConfigError("--exact-match scores the responses of a run's sft eval sets; add --config RUN.yaml")
        source = evaluate.find_model(ns.model, base_model=ns.base_model)
        tokenizer = evaluate.load_tokenizer(source)
        if config is not None:
            cutoff = [f"cutoff_len={ns.max_length}"] if ns.max_length else []
            args = evaluate.read_run_args(config, [*overrides, *cutoff])
            sets = evaluate.load_run_eval_sets(args, tokenizer, domains=domains, with_responses=ns.exact_match)
        else:
            texts = evaluate.read_corpus_texts(Path(resolve_builtin(ns.corpus or "builtin:corpus")), domains)
        model = evaluate.load_model(source).to(device)
    except (ValueError, OSError) as err:
        return _fail(str(err))
    if config is not None:
        print(f"datasteer: eval sets of {config}", file=sys.stderr)
        results = evaluate.evaluate_run(
            model, sets, batch_size=ns.batch_size, max_new_tokens=ns.max_new_tokens, device=device
        )
    else:
        max_length = ns.max_length or 128
        results = evaluate.evaluate_corpus(
            model, tokenizer, texts, batch_size=ns.batch_size, max_length=max_length, device=device
        )
    print(evaluate.format_results(results))
    if ns.output:
        Path(ns.output).write_text(json.dumps(evaluate.results_to_json(results), indent=2) + "\n")
    return 0


def cmd_plot(ns: argparse.Namespace) -> int:
    from datasteer.plot import plot_run

    try:
        path = plot_run(ns.output_dir, ns.output)
    except (FileNotFoundError, ValueError, ImportError) as err:
        return _fail(str(err))
    print(f"datasteer: wrote {path}")
    return 0


def cmd_version(ns: argparse.Namespace) -> int:
    print(f"datasteer {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datasteer", description="Steer which data an LLM trains on while it trains.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with LLaMA-Factory, steered by the config's datasteer: block")
    p.add_argument("config", help="run YAML: LLaMA-Factory keys plus an optional datasteer: block")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. datasteer.params.alpha=0.5")
    g = p.add_argument_group(
        "several processes",
        "start workers through torchrun (or set FORCE_TORCHRUN=1 with NPROC_PER_NODE, NNODES, NODE_RANK, "
        "MASTER_ADDR, MASTER_PORT, as for llamafactory-cli)",
    )
    g.add_argument("--nproc", type=int, default=None, help="workers on this node (torchrun --nproc-per-node)")
    g.add_argument("--nnodes", type=int, default=None, help="nodes of the run (default 1)")
    g.add_argument("--node-rank", type=int, default=None, help="this node's rank, 0..nnodes-1 (default 0)")
    g.add_argument("--master-addr", default=None, help="address of node 0 (default 127.0.0.1)")
    g.add_argument("--master-port", type=int, default=None, help="port on node 0 (default: a free port, 1 node)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="precompute a selector's neighbour lists / probabilities (near, tsds)")
    p.add_argument("kind", choices=["near", "tsds"], help="the selector to prepare for")
    p.add_argument("config", help="the run YAML that will train with it (its datasteer.params.prepared is written)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("list", help="list the algorithms of each paradigm with their parameters")
    p.add_argument("paradigm", nargs="?", choices=["select", "mix", "weight"])
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("assets", help="build the built-in corpus and tiny model (done on first use otherwise)")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.add_argument("--smollm2", action="store_true", help="also build builtin:smollm2-135m (optional packages)")
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("quickstart", help="train the tiny model with a dynamic and a uniform mixture, compare")
    p.add_argument("--output-dir", default="outputs/quickstart", help="where the two runs go")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    p.add_argument("--mixer", default="scheduled", help="the dynamic mixer's example (examples/quickstart/)")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser(
        "eval",
        help="held-out loss, perplexity and accuracy per domain of a trained model",
        usage="datasteer eval OUTPUT_DIR [--config RUN.yaml [KEY=VALUE ...]] [options]",
    )
    p.add_argument(
        "model",
        metavar="OUTPUT_DIR",
        help="a run's output_dir (full model or LoRA adapter), a checkpoint or builtin:tiny-llama",
    )
    p.add_argument(
        "--config",
        nargs="+",
        default=None,
        metavar=("RUN.yaml", "KEY=VALUE"),
        help="score the run's eval_dataset as its training tokenised it (overrides, e.g. eval_dataset=a,b, may follow)",
    )
    p.add_argument("--corpus", default=None, help="directory with <domain>_eval.jsonl (default: builtin:corpus)")
    p.add_argument("--domains", default=None, help="comma-separated domains or eval sets (default: all)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (128; with --config: cutoff_len)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--exact-match", action="store_true", help="sft: greedy responses equal to the reference")
    p.add_argument("--max-new-tokens", type=int, default=64, help="decode length for --exact-match")
    p.add_argument("--base-model", default=None, help="base model of a LoRA adapter (default: the one it names)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--output", default=None, help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", help="draw a run's steering.jsonl (proportions, selections or weights) as a PNG")
    p.add_argument("output_dir", help="the run's output_dir, holding steering.jsonl")
    p.add_argument("--output", default=None, help="PNG to write (default: OUTPUT_DIR/steering.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``datasteer`` command."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:  # overrides after an option (`train run.yaml --nproc 2 a=1`) are overrides too
        if hasattr(ns, "overrides") and not any(arg.startswith("-") for arg in extra):
            ns.overrides = [*ns.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    code: int = ns.func(ns)
    return code


if __name__ == "__main__":
    sys.exit(main())
