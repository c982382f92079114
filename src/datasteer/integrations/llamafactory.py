"""LLaMA-Factory drop-in: ``datasteer train run.yaml`` runs LLaMA-Factory's own workflow.

LLaMA-Factory's ``run_exp`` builds the tokenizer, data, model and trainer and runs
training, evaluation, saving and plotting. datasteer changes exactly two names that its
``pt`` and ``sft`` workflows look up when they run, inside :func:`steered_workflow` (the
one place that touches LLaMA-Factory, checked against the supported version):

* ``get_dataset`` loads each dataset of ``dataset: a,b,c`` on its own through the
  original function and concatenates them, so each dataset is a domain whose rows are
  known (and pre-training packing never mixes domains in one row); evaluation sets from
  ``val_size`` are kept per domain, so the Trainer reports ``eval_<domain>_loss``.
* the trainer class becomes ``SteeringMixin`` + LLaMA-Factory's own trainer.

Nothing of LLaMA-Factory is copied; without a ``datasteer:`` block nothing is patched.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datasteer.controller import check_streamable
from datasteer.errors import ConfigError
from datasteer.integrations import llamafactory_checks as checks
from datasteer.integrations.hf import SteeringMixin
from datasteer.plan import SteeringPlan
from datasteer.streams import StreamedDomains
from datasteer.validate import first_line

logger = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("0.9.5",)
STAGES = ("pt", "sft")


@dataclass
class _Domains:
    """Domain labels of the concatenated training set, filled by the data loader."""

    names: tuple[str, ...] = ()
    #: None when the domains are streams (``streaming: true``)
    ids: np.ndarray | None = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def check_version() -> str:
    """LLaMA-Factory's version; ConfigError if it is not one this integration supports."""
    import llamafactory

    version: str = llamafactory.__version__
    if version not in SUPPORTED_VERSIONS:
        raise ConfigError(
            f"llamafactory {version} is installed; datasteer supports {', '.join(SUPPORTED_VERSIONS)} "
            f"(pip install llamafactory=={SUPPORTED_VERSIONS[-1]})"
        )
    return version


def validate(args: dict[str, Any], steering: SteeringPlan | None, *, training: bool = True) -> Any:
    """Check a run before anything heavy: its keys with LLaMA-Factory's own parser, the
    steering block against them, and the inputs both name (models, data files, target
    sets, prepared files, the checkpoint to resume from).

    Runs before any model or data is loaded and writes nothing. Returns LLaMA-Factory's
    parsed argument tuple (which :func:`run` hands to the workflow: the arguments are
    parsed once). A float key written as ``1e-3`` (a string to YAML 1.1) is converted in
    ``args``.

    Args:
        args: LLaMA-Factory's keys.
        steering: the run's plan (None: a plain LLaMA-Factory run, its inputs still checked).
        training: False for ``datasteer prepare``, which writes the prepared files the
            training checks and resumes nothing.

    Raises:
        ConfigError: one line naming the key or file and the fix.
    """
    check_version()
    from llamafactory.hparams import get_train_args

    if steering is not None and args.get("enable_liger_kernel") and steering.needs_sample_losses():
        raise ConfigError(
            f"enable_liger_kernel: its fused loss returns no logits, and {steering.config.describe()} needs "
            "per-sample losses from them; turn it off"
        )
    args.update(checks.coerce_arg_types(args))
    try:
        parsed = get_train_args(dict(args))
    except (ValueError, TypeError, ImportError, AssertionError) as err:
        raise ConfigError(f"LLaMA-Factory config: {first_line(err)}") from None
    model_args, data_args, training_args, finetuning_args, _ = parsed
    checks.check_values(model_args, data_args, training_args, finetuning_args)
    if steering is not None:
        _check_steerable(steering, data_args, training_args, finetuning_args)
    # Without the key, LLaMA-Factory resumes the last checkpoint it finds in output_dir.
    resume_key = "resume_from_checkpoint" if args.get("resume_from_checkpoint") else "output_dir"
    checks.check_inputs(parsed, steering, training=training, resume_key=resume_key)
    return parsed


def _check_steerable(steering: SteeringPlan, data_args: Any, training_args: Any, finetuning_args: Any) -> None:
    """The LLaMA-Factory settings a steered run needs."""
    if finetuning_args.stage not in STAGES:
        raise ConfigError(f"stage: datasteer steers stages {', '.join(STAGES)}, got {finetuning_args.stage!r}")
    if not training_args.do_train:
        raise ConfigError("do_train: a steered run must train; set do_train: true")
    if not data_args.dataset:
        raise ConfigError("dataset: name at least one training dataset")
    if data_args.streaming:  # each dataset is a domain stream (datasteer.streams)
        check_streamable(steering, training_args.max_steps)
        if training_args.dataloader_num_workers < 1:
            raise ConfigError(
                "dataloader_num_workers: LLaMA-Factory streams a local dataset file in dataloader_num_workers "
                "shards, and 0 gives an empty stream; set it to 1 or more with streaming: true"
            )
    if data_args.mix_strategy != "concat":
        raise ConfigError("mix_strategy: datasteer mixes the datasets itself; use mix_strategy: concat")
    if data_args.tokenized_path is not None:
        raise ConfigError("tokenized_path: not supported with steering (datasets are loaded per domain)")
    if "weight" in steering.paradigms and (
        finetuning_args.use_dft_loss or finetuning_args.use_eaft_loss or finetuning_args.use_asft_loss
    ):
        raise ConfigError("use_dft_loss/use_eaft_loss/use_asft_loss: cannot be combined with a weight stage")
    if getattr(training_args, "train_sampling_strategy", "random") == "group_by_length":
        raise ConfigError(
            "train_sampling_strategy: group_by_length cannot be combined with datasteer (it orders the data)"
        )
    if training_args.ignore_data_skip:
        raise ConfigError("ignore_data_skip: datasteer resumes exactly; set ignore_data_skip: false")
    steering.check_domains(list(data_args.dataset))


@contextlib.contextmanager
def _loading(key: str, names: Any, data_args: Any) -> Iterator[None]:
    """Turn LLaMA-Factory's data errors while loading ``names`` into one line naming them.

    The pre-flight checks catch these before training; this covers what they cannot see
    (a bad row past the first rows of a large file, a hub dataset, rows that preprocessing
    drops entirely). A KeyError here is a column the rows lack (the converter reads them).
    """
    from datasets.exceptions import DatasetGenerationError

    where = f"{key}: {', '.join(map(repr, names))} (dataset_dir {data_args.dataset_dir})"
    try:
        yield
    except ConfigError:
        raise
    except DatasetGenerationError as err:
        cause = err.__cause__ or err.__context__ or err
        raise ConfigError(f"{where}: a data file could not be read ({first_line(cause)})") from None
    except KeyError as err:
        raise ConfigError(f"{where}: the rows have no column {err} (check columns in dataset_info.json)") from None
    except ValueError as err:
        raise ConfigError(f"{where}: {first_line(err)}") from None
    except RuntimeError as err:
        if not str(err).startswith("Cannot find"):  # LLaMA-Factory: every row was dropped
            raise
        raise ConfigError(f"{where}: no usable rows after preprocessing ({first_line(err)})") from None


def _per_domain_loader(original: Any, domains: _Domains, check: Any = None) -> Any:
    """Wrap LLaMA-Factory's ``get_dataset``: one call per dataset, then concatenate.

    ``check(module, domains, model_args)``, if given, sees the loaded rows before they are
    returned (and before the workflow loads the model).
    """
    from datasets import concatenate_datasets

    def get_dataset(
        template: Any,
        model_args: Any,
        data_args: Any,
        training_args: Any,
        stage: str,
        tokenizer: Any,
        processor: Any = None,
    ) -> dict[str, Any]:
        names = list(data_args.dataset)
        trains, evals = [], {}
        for name in names:
            sub = copy.copy(data_args)
            sub.dataset, sub.eval_dataset = [name], None
            with _loading("dataset", [name], data_args):
                module = original(template, model_args, sub, training_args, stage, tokenizer, processor)
            trains.append(module["train_dataset"])
            if "eval_dataset" in module:
                evals[name] = module["eval_dataset"]
            if not data_args.streaming:
                logger.info("datasteer: domain %r has %d training rows", name, len(module["train_dataset"]))
        if data_args.eval_dataset:
            sub = copy.copy(data_args)
            sub.dataset = None
            with _loading("eval_dataset", data_args.eval_dataset, data_args):
                extra = original(template, model_args, sub, training_args, stage, tokenizer, processor)
            extra = extra["eval_dataset"]
            if isinstance(extra, dict):
                evals.update(extra)
            else:
                evals["eval"] = extra
        domains.names = tuple(names)
        result: dict[str, Any] = {}
        if evals:
            result["eval_dataset"] = evals if len(evals) > 1 else next(iter(evals.values()))
        if data_args.streaming:
            # Read as the mixture asks; a domain without rows fails when it is first read.
            domains.ids = None
            result["train_dataset"] = StreamedDomains(dict(zip(names, trains, strict=True)))
            logger.info("datasteer: %d domains are streamed: %s", len(names), ", ".join(names))
            return result
        empty = [n for n, ds in zip(names, trains, strict=True) if len(ds) == 0]
        if empty:
            raise ConfigError(f"dataset: domains {empty} have no training rows after preprocessing")
        domains.ids = np.concatenate([np.full(len(ds), k, dtype=np.int64) for k, ds in enumerate(trains)])
        result["train_dataset"] = concatenate_datasets(trains)
        if check is not None:
            check(result, domains, model_args)
        return result

    return get_dataset


def _steered_trainer(base: type, steering: SteeringPlan, domains: _Domains) -> type:
    """``SteeringMixin`` + LLaMA-Factory's trainer, bound to this run's steering and domains."""

    class SteeredTrainer(SteeringMixin, base):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(steering=steering, domains=domains.ids, domain_names=domains.names, **kwargs)

    SteeredTrainer.__name__ = SteeredTrainer.__qualname__ = f"Steered{base.__name__}"
    return SteeredTrainer


@contextlib.contextmanager
def steered_workflow(steering: SteeringPlan, parsed: Any = None) -> Iterator[None]:
    """Within this block, LLaMA-Factory's pt and sft workflows train with steering.

    This is the single patch of LLaMA-Factory: it swaps the ``get_dataset`` and trainer
    names that ``llamafactory.train.{pt,sft}.workflow`` look up, and, when ``parsed`` (the
    tuple :func:`validate` returned) is given, the ``get_train_args`` that
    ``llamafactory.train.tuner`` calls, so that the arguments are parsed once. Everything
    is restored on exit.
    """
    check_version()
    from llamafactory.train import tuner
    from llamafactory.train.pt import workflow as pt_workflow
    from llamafactory.train.sft import workflow as sft_workflow

    domains = _Domains()

    def check(module: dict[str, Any], loaded: _Domains, model_args: Any) -> None:
        assert loaded.ids is not None  # streamed domains are not checked row by row
        checks.check_pool(steering, module, loaded.ids, loaded.names, model_args)

    swaps = [
        (pt_workflow, "get_dataset", _per_domain_loader(pt_workflow.get_dataset, domains, check)),
        (sft_workflow, "get_dataset", _per_domain_loader(sft_workflow.get_dataset, domains, check)),
        (pt_workflow, "CustomTrainer", _steered_trainer(pt_workflow.CustomTrainer, steering, domains)),
        (sft_workflow, "CustomSeq2SeqTrainer", _steered_trainer(sft_workflow.CustomSeq2SeqTrainer, steering, domains)),
    ]
    if parsed is not None:
        swaps.append((tuner, "get_train_args", lambda args=None: parsed))
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    try:
        for module, name, value in swaps:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def run(args: dict[str, Any], steering: SteeringPlan | None, parsed: Any = None) -> None:
    """Run LLaMA-Factory's training with ``args`` (its own keys) and optional steering.

    ``parsed``: what :func:`validate` returned for these ``args`` (then they are not parsed
    again); without it, they are validated here.
    """
    check_version()
    from llamafactory.train.tuner import run_exp

    if steering is None:
        run_exp(args=dict(args))
        return
    if parsed is None:
        parsed = validate(args, steering)
    with steered_workflow(steering, parsed):
        run_exp(args=dict(args))
