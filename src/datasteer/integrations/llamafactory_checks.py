"""Pre-flight checks of a LLaMA-Factory run: its keys' types and values, and the inputs they name.

:func:`datasteer.integrations.llamafactory.validate` calls these around LLaMA-Factory's
own parser, before any model is loaded and before anything is written. LLaMA-Factory's
``HfArgumentParser.parse_dict`` does not check types (``learning_rate: fast`` would reach
the optimizer) and accepts values the Trainer later trips on (``cutoff_len: 0``,
``max_steps: 0``); its data loader names neither the file nor the column when a row is
bad. Each check here raises one :class:`ConfigError` naming the key or the file and the
fix. The file-level work is :mod:`datasteer.validate`'s; this module knows
LLaMA-Factory's keys and ``dataset_info.json``.

:func:`check_pool` runs later, on the tokenised rows (still before the model loads): it
ties prepared selection files to the pool and warns about budgets larger than the pool.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

from datasteer import validate
from datasteer.config import EXPONENT_FLOAT
from datasteer.errors import ConfigError
from datasteer.integrations.hf import STATE_FILE
from datasteer.ops.prepared import MODEL_KEYS, embedding_settings, pool_fingerprint, row_token_ids
from datasteer.plan import SteeringPlan

logger = logging.getLogger(__name__)

#: (paradigm, algorithm) pairs that compare the pool with target (evaluation) rows. A class
#: attribute on the algorithms would say this better; until they declare it, it is listed here.
NEEDS_TARGETS = frozenset(
    {
        ("select", "less"),
        ("select", "greats"),
        ("select", "cluster_less"),
        ("select", "nice"),
        ("select", "near"),
        ("select", "tsds"),
        ("weight", "adapt"),
    }
)


# --------------------------------------------------------------------------- keys


def _framework_fields() -> dict[str, tuple[Any, Any]]:
    """LLaMA-Factory's training keys: name -> (annotation, default)."""
    from llamafactory.hparams import (
        DataArguments,
        FinetuningArguments,
        GeneratingArguments,
        ModelArguments,
        TrainingArguments,
    )

    fields: dict[str, tuple[Any, Any]] = {}
    for cls in (ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, (hints[f.name], f.default))
    return fields


def coerce_arg_types(args: Mapping[str, Any]) -> dict[str, Any]:
    """The keys whose annotation is a bool, int, float or a Literal, checked against it.

    Returns the checked values; a float written ``1e-3`` (a string to YAML 1.1, a float
    to LLaMA-Factory's own OmegaConf reader) comes back as a float. Keys of other types
    are left to LLaMA-Factory's parser.

    Raises:
        ConfigError: a value of the wrong type, or not among a Literal's choices.
    """
    fields = _framework_fields()
    return {key: _coerce(key, value, *fields[key]) for key, value in args.items() if key in fields}


def _coerce(key: str, value: Any, annotation: Any, default: Any) -> Any:
    optional = default is None
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members = typing.get_args(annotation)
        rest = [m for m in members if m is not type(None)]
        optional = optional or len(rest) < len(members)
        if len(rest) != 1:
            return value
        annotation = rest[0]
    if value is None:
        if optional or annotation not in (bool, int, float):
            return value
        raise ConfigError(f"{key}: expected {_expected(annotation)}, got null")
    if typing.get_origin(annotation) is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            choices = ", ".join(str(a) for a in allowed)
            raise ConfigError(f"{key}: {value!r} is not allowed{hint}; choose one of {choices}")
        return value
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, str) and EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
    return value


def _expected(annotation: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number"}[annotation]


def check_values(model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any) -> None:
    """Values LLaMA-Factory's parser accepts but training cannot use (ZeroDivisionError,
    an empty batch, a run that trains when told 0 steps)."""
    ta = training_args
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(ta, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {getattr(ta, key)}")
    if ta.learning_rate < 0:
        raise ConfigError(f"learning_rate: must be >= 0, got {ta.learning_rate}")
    if data_args.cutoff_len < 1:
        raise ConfigError(f"cutoff_len: must be >= 1 (tokens per training row), got {data_args.cutoff_len}")
    if ta.do_train and ta.max_steps == 0:
        raise ConfigError(
            "max_steps: 0 would still train (the Trainer reads 0 as unset and trains num_train_epochs); "
            "give max_steps >= 1, or -1 to train by epochs"
        )
    if ta.do_train and ta.max_steps < 0 and ta.num_train_epochs <= 0:
        raise ConfigError(f"num_train_epochs: must be > 0 when max_steps is not set, got {ta.num_train_epochs}")
    if data_args.max_samples is not None and data_args.max_samples < 1:
        raise ConfigError(f"max_samples: must be >= 1 or null, got {data_args.max_samples}")
    if data_args.val_size < 0:
        raise ConfigError(f"val_size: must be >= 0 (a fraction, or a number of rows above 1), got {data_args.val_size}")
    if ta.do_train and ta.save_strategy == "steps" and ta.save_steps <= 0:
        raise ConfigError(f"save_steps: must be > 0 with save_strategy: steps, got {ta.save_steps}")
    if data_args.template is not None:
        from llamafactory.data.template import TEMPLATES

        if data_args.template not in TEMPLATES:
            close = difflib.get_close_matches(data_args.template, list(TEMPLATES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"template: {data_args.template!r} is not a LLaMA-Factory template{hint}")


# --------------------------------------------------------------------------- inputs


def check_inputs(parsed: Any, steering: SteeringPlan | None, *, training: bool, resume_key: str) -> None:
    """The models, data files, target sets, prepared files and checkpoint a run names.

    Args:
        parsed: LLaMA-Factory's parsed argument tuple.
        steering: the run's plan, if steered.
        training: False for ``datasteer prepare`` (no prepared file or checkpoint is read).
        resume_key: how the config names the checkpoint it resumes from (the key, or the
            output_dir whose last checkpoint LLaMA-Factory resumes).
    """
    model_args, data_args, training_args, finetuning_args, _ = parsed
    cache = model_args.cache_dir
    model_config = validate.check_model(
        "model_name_or_path", str(model_args.model_name_or_path), cache_dir=cache, weights=True, tokenizer=True
    )
    for adapter in model_args.adapter_name_or_path or []:
        validate.check_model("adapter_name_or_path", str(adapter), cache_dir=cache, weights=True)
    check_datasets(data_args, finetuning_args.stage, steered=steering is not None)
    if steering is not None:
        _check_steering_inputs(steering, parsed, model_config, training=training)
    resume = training_args.resume_from_checkpoint
    if training and isinstance(resume, str) and resume:
        fix = None
        if resume_key == "output_dir":
            fix = (
                "LLaMA-Factory resumes the last checkpoint in output_dir; remove that checkpoint, set "
                "overwrite_output_dir: true, or choose another output_dir"
            )
        state = STATE_FILE if steering is not None else None
        validate.check_checkpoint(resume_key, resume, state_file=state, fix=fix)


def check_datasets(data_args: Any, stage: str, *, steered: bool) -> None:
    """``dataset`` and ``eval_dataset``: listed once each, in ``dataset_info.json``, their files readable."""
    listed = {"dataset": list(data_args.dataset or []), "eval_dataset": list(data_args.eval_dataset or [])}
    for key, names in listed.items():
        if any(not n for n in names):
            raise ConfigError(f"{key}: an empty name in {','.join(names)!r}; remove the extra comma")
        twice = [n for i, n in enumerate(names) if n in names[:i]]
        if twice:
            why = "each dataset is one domain; name it once (a mixer's proportions weight domains)"
            raise ConfigError(f"{key}: {twice[0]!r} is listed twice; " + (why if key == "dataset" else "name it once"))
    directory = str(data_args.dataset_dir)
    if directory == "ONLINE" or directory.startswith("REMOTE:"):
        return  # the hub's datasets: nothing on disk to check
    info_file = Path(directory) / "dataset_info.json"
    fix = "set dataset_dir to the folder holding dataset_info.json and the data files (e.g. builtin:corpus)"
    if not Path(directory).is_dir():
        raise ConfigError(f"dataset_dir: {directory} is not a folder (LLaMA-Factory's default is ./data); {fix}")
    try:
        info = json.loads(info_file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"dataset_dir: {directory} has no dataset_info.json; {fix}") from None
    except ValueError as err:
        raise ConfigError(f"dataset_dir: {info_file} is not valid JSON ({validate.first_line(err)})") from None
    if not isinstance(info, dict):
        raise ConfigError(f"dataset_dir: {info_file} is not a JSON object of dataset names")
    for key, names in listed.items():
        for name in names:
            _check_dataset(key, name, info, info_file, stage)


def _check_dataset(key: str, name: str, info: Mapping[str, Any], info_file: Path, stage: str) -> None:
    from llamafactory.data.parser import get_dataset_list

    if name not in info:
        close = difflib.get_close_matches(name, list(info), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        known = ", ".join(list(info)[:8]) + (", ..." if len(info) > 8 else "")
        raise ConfigError(f"{key}: {name!r} is not in {info_file}{hint}; known: {known}")
    if not isinstance(info[name], dict):
        raise ConfigError(f"{key}: {name!r} in {info_file} is not an object with file_name and columns")
    sources = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
    if not any(k in info[name] for k in sources):
        raise ConfigError(f"{key}: {name!r} in {info_file} names no file_name (nor a hub or script url); add file_name")
    try:
        attr = get_dataset_list([name], dict(info))[0]
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"{key}: {name!r} in {info_file} is incomplete ({validate.first_line(err)})") from None
    if attr.ranking and stage in ("pt", "sft"):
        raise ConfigError(f"{key}: {name!r} is a ranking dataset (ranking: true), not one for stage {stage}")
    if attr.load_from != "file":
        return
    if stage == "sft" and attr.formatting == "alpaca" and not attr.response:
        raise ConfigError(
            f"{key}: {name!r} names no response column (columns.response in {info_file}), which stage sft "
            "trains on; use an sft dataset or stage: pt"
        )
    roles = ["prompt", "query", "response", "history"] if attr.formatting == "alpaca" else ["messages"]
    roles += ["system", "tools", "images", "videos", "audios", "kto_tag"]
    roles += ["chosen", "rejected"] if attr.ranking else []
    columns = {role: getattr(attr, role) for role in roles if getattr(attr, role)}
    tags = (attr.role_tag, attr.content_tag) if attr.formatting != "alpaca" else None
    path = info_file.parent / attr.dataset_name
    validate.check_data_source(key, name, path, columns=columns, message_tags=tags)


def _stage_key(steering: SteeringPlan, paradigm: str) -> str:
    return "datasteer" if len(steering.paradigms) == 1 else f"datasteer.{paradigm}"


def _check_steering_inputs(
    steering: SteeringPlan, parsed: Any, model_config: Mapping[str, Any] | None, *, training: bool
) -> None:
    model_args, data_args, _, finetuning_args, _ = parsed
    has_targets = bool(data_args.eval_dataset) or data_args.val_size > 0
    for paradigm, stage in steering.config.stages.items():
        where, params = _stage_key(steering, paradigm), stage.params
        if (paradigm, stage.algorithm) in NEEDS_TARGETS and not has_targets:
            raise ConfigError(
                f"eval_dataset: {paradigm}/{stage.algorithm} compares the pool with target samples (the evaluation "
                "rows); set eval_dataset (e.g. arithmetic_eval) or val_size"
            )
        if stage.algorithm == "nice" and finetuning_args.stage != "sft":
            raise ConfigError(
                "stage: nice samples responses to the target prompts and pre-training rows have no prompt; "
                "use stage: sft with sft eval sets"
            )
        if stage.algorithm == "dynamic_moe" and params.source == "eval":
            _check_eval_per_domain(where, data_args)
        encoder = getattr(params, "encoder", None)
        if encoder:
            validate.check_model(f"{where}.params.encoder", str(encoder))
        prepared = getattr(params, "prepared", None) if stage.algorithm in ("near", "tsds") else None
        if training and prepared:
            validate.check_prepared_file(f"{where}.params.prepared", prepared, stage.algorithm, params.settings())
            _check_prepared_model(f"{where}.params.prepared", prepared, stage.algorithm, model_config, model_args)
    ours = validate.vocab_size("model_name_or_path", model_config) if model_config is not None else None
    for paradigm, stage in steering.config.stages.items():
        path = getattr(stage.params, "reference_model", None)
        if not path:
            continue
        key = f"{_stage_key(steering, paradigm)}.params.reference_model"
        if not Path(path).is_dir():
            raise ConfigError(
                f"{key}: {path} does not exist; train the reference model first (DoReMi step 1, RHO-LOSS step 1)"
            )
        theirs = validate.vocab_size(key, validate.check_model(key, str(path), weights=True) or {})
        if ours is not None and theirs is not None and ours != theirs:
            raise ConfigError(
                f"{key}: {path} has a vocabulary of {theirs} tokens, the trained model {ours}; "
                "the reference must use the same tokenizer"
            )


def _check_eval_per_domain(where: str, data_args: Any) -> None:
    """dynamic_moe's ``source: eval``: an evaluation set named like each domain."""
    if data_args.val_size > 0:
        return  # the per-domain splits carry the domains' names
    names = set(data_args.eval_dataset or []) if data_args.eval_on_each_dataset else set()
    missing = [d for d in data_args.dataset if d not in names and f"{d}_eval" not in names]
    if missing:
        raise ConfigError(
            f"{where}.params.source: 'eval' needs an evaluation set per domain; {missing[0]!r} has none "
            "(give val_size, or eval_dataset: <domain>_eval,... with eval_on_each_dataset: true)"
        )


def _check_prepared_model(
    key: str, directory: str, kind: str, model_config: Mapping[str, Any] | None, model_args: Any
) -> None:
    """A prepared file embedded with the training model is tied to its architecture."""
    made = json.loads((Path(directory) / f"{kind}.json").read_text()).get("settings", {}).get("model")
    if not isinstance(made, dict) or model_config is None:
        return
    keys = [k for k in MODEL_KEYS if not (k == "vocab_size" and model_args.resize_vocab)]
    for name in keys:
        if name in made and name in model_config and made[name] != model_config[name]:
            raise ConfigError(
                f"{key}: {directory} was prepared with another model ({name} {made[name]}, this model "
                f"{model_config[name]}); run `datasteer prepare {kind} CONFIG` with this run's config"
            )


# --------------------------------------------------------------------------- the loaded pool


def check_pool(
    steering: SteeringPlan,
    module: Mapping[str, Any],
    domain_ids: np.ndarray,
    domain_names: Sequence[str],
    model_args: Any,
) -> None:
    """Checks that need the tokenised rows, run before the model loads.

    Args:
        steering: the run's plan.
        module: what the per-domain loader returns (``train_dataset``, maybe ``eval_dataset``).
        domain_ids: the domain of each training row.
        domain_names: the domains' names.
        model_args: LLaMA-Factory's model arguments (its config ties prepared files to the model).
    """
    pool = module["train_dataset"]
    evals = module.get("eval_dataset")
    targets = list(evals.values()) if isinstance(evals, Mapping) else ([evals] if evals is not None else [])
    sizes = [int((domain_ids == d).sum()) for d in range(len(domain_names))]
    for paradigm, stage in steering.config.stages.items():
        where, params = _stage_key(steering, paradigm), stage.params
        if (paradigm, stage.algorithm) in NEEDS_TARGETS and (not targets or any(len(t) == 0 for t in targets)):
            raise ConfigError(
                f"eval_dataset: {paradigm}/{stage.algorithm} needs target rows, and an evaluation set has none "
                "after preprocessing (is cutoff_len too short, or the set empty?)"
            )
        candidates = getattr(params, "candidates", None)
        budget = max(sizes) if "mix" in steering.paradigms and paradigm == "select" else len(pool)
        if isinstance(candidates, int) and candidates > budget:
            scope = "the largest domain" if budget != len(pool) else "the pool"
            logger.warning(
                "%s.params.candidates: %d is more than %s (%d rows); every update scores all of them "
                "(candidates: null says so)",
                where,
                candidates,
                scope,
                budget,
            )
        prepared = getattr(params, "prepared", None) if stage.algorithm in ("near", "tsds") else None
        if prepared:
            _check_prepared_pool(
                f"{where}.params.prepared", stage.algorithm, params, pool, targets, domain_ids, domain_names, model_args
            )


def _check_prepared_pool(
    key: str,
    kind: str,
    params: Any,
    pool: Any,
    targets: Sequence[Any],
    domain_ids: np.ndarray,
    domain_names: Sequence[str],
    model_args: Any,
) -> None:
    tensors = validate.check_prepared_file(key, params.prepared, kind, params.settings())
    digest = None
    if not model_args.resize_vocab:  # else the model's vocabulary is only known once it is loaded
        from llamafactory.model.loader import load_config

        config = load_config(model_args)
        digest = pool_fingerprint(
            pool_ids=row_token_ids(pool),
            domains=domain_ids,
            domain_names=domain_names,
            target_ids=[row_token_ids(t) for t in targets],
            settings=embedding_settings(params.settings(), types.SimpleNamespace(config=config)),
        )
    validate.check_prepared_against_pool(key, params.prepared, kind, tensors, len(pool), digest)
