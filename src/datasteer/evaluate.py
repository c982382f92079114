"""Per-domain held-out evaluation: token-mean loss, perplexity and, where a domain has
reference answers, exact-match accuracy.

``datasteer eval OUTPUT_DIR`` scores what a run trained: a full model directory, a LoRA
(peft) adapter directory applied to its base model, or ``builtin:tiny-llama``. Two
sources of held-out data:

* a run config (``--config RUN.yaml``, or ``OUTPUT_DIR/training_args.yaml`` when there):
  the run's own ``eval_dataset`` (each dataset one domain; or the ``val_size`` split of
  each training dataset), loaded through LLaMA-Factory's own loader and template, so the
  columns, chat template, ``cutoff_len`` and labels are exactly those of training: an
  ``sft`` run is scored on its response tokens only. ``--exact-match`` adds the share of
  greedy responses equal to the reference;
* otherwise the built-in corpus's ``<domain>_eval`` texts, each scored whole; its
  ``arithmetic`` domain also gets :func:`equation_accuracy`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from datasteer.errors import ConfigError
from datasteer.ops.losses import IGNORE_INDEX, per_token_loss

logger = logging.getLogger(__name__)

EQUATION_DOMAINS = ("arithmetic",)
"""Domains of the built-in corpus whose texts are equations (``346 - 23 = 323`` per line)."""

RUN_CONFIG_FILE = "training_args.yaml"
"""The run arguments LLaMA-Factory's web UI writes into the output directory."""

_ANSWER = re.compile(r" = (\d+)")


@dataclass(frozen=True)
class MatchResult:
    """``correct`` of ``total`` items matched their reference."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        """``correct / total`` (0.0 when there is nothing to score)."""
        return self.correct / self.total if self.total else 0.0


EquationResult = MatchResult
"""What :func:`equation_accuracy` returns: equations answered right of equations scored."""


@dataclass(frozen=True)
class DomainResult:
    """Held-out result of one domain; ``accuracy`` only where the domain has reference answers."""

    loss: float
    tokens: int
    accuracy: MatchResult | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad)


def _right_padded(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` of rows padded on the right with ``value``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def labelled_loss(
    model: Any,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    desc: str = "eval",
) -> DomainResult:
    """Token-mean next-token loss over the labelled tokens of ``(input_ids, labels)`` rows.

    Labels ``-100`` (prompt tokens of an sft row, padding) are not scored; ``tokens``
    counts the scored ones.
    """
    total, count = 0.0, 0
    with _eval_mode(model):
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
            chunk = rows[start : start + batch_size]
            ids, mask = _right_padded([r[0] for r in chunk], pad_token_id)
            labels, _ = _right_padded([r[1] for r in chunk], IGNORE_INDEX)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            losses, keep = per_token_loss(logits, labels.to(device))
            total += float(losses.sum())
            count += int(keep.sum())
    return DomainResult(loss=total / max(count, 1), tokens=count)


def _equations_right(text: str, offsets: Sequence[tuple[int, int]], hits: Sequence[bool]) -> tuple[int, int]:
    """``(correct, scored)`` equations of one text; ``hits[p - 1]``: token ``p`` predicted right."""
    covered = max((end for _, end in offsets), default=0)
    correct = scored = 0
    for match in _ANSWER.finditer(text):
        lo, hi = match.span(1)
        if hi > covered:
            break  # truncated: this answer and every later one lie beyond max_length
        positions = [p for p, (s, e) in enumerate(offsets) if s < hi and e > lo and p > 0]
        scored += 1
        correct += bool(positions) and all(hits[p - 1] for p in positions)
    return correct, scored


@torch.no_grad()
def _score_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    equations: bool,
    batch_size: int,
    max_length: int,
    device: str | torch.device,
    desc: str,
) -> tuple[DomainResult, MatchResult]:
    """One pass over ``texts``: the loss of every token after the first and, when
    ``equations``, the teacher-forced equation matches (else ``MatchResult(0, 0)``)."""
    if equations and not tokenizer.is_fast:
        raise TypeError("equation accuracy needs a fast tokenizer (its offsets mapping locates the answers)")
    total, count, correct, scored = 0.0, 0, 0, 0
    with _eval_mode(model):
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False):
            chunk = texts[start : start + batch_size]
            enc = [
                tokenizer(t, truncation=True, max_length=max_length, return_offsets_mapping=equations) for t in chunk
            ]
            ids, mask = _right_padded([e["input_ids"] for e in enc], _pad_id(tokenizer))
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            losses, keep = per_token_loss(logits, ids.masked_fill(mask == 0, IGNORE_INDEX).to(device))
            total += float(losses.sum())
            count += int(keep.sum())
            if equations:
                hits = (logits[:, :-1].argmax(-1).cpu() == ids[:, 1:]).tolist()
                for text, e, row in zip(chunk, enc, hits, strict=True):
                    right, n = _equations_right(text, e["offset_mapping"], row)
                    correct, scored = correct + right, scored + n
    return DomainResult(loss=total / max(count, 1), tokens=count), MatchResult(correct, scored)


def domain_losses(
    model: Any,
    tokenizer: Any,
    texts: Mapping[str, Sequence[str]],
    *,
    batch_size: int = 16,
    max_length: int = 128,
    device: str | torch.device = "cpu",
) -> dict[str, DomainResult]:
    """Token-mean next-token loss of each domain's texts (eval mode, no gradient).

    Each text is truncated to ``max_length`` tokens and every token after the first is
    scored; the loss of a domain averages over all its predicted tokens (as the Trainer's
    ``eval_loss`` does).
    """
    return {
        d: _score_texts(
            model,
            tokenizer,
            rows,
            equations=False,
            desc=f"eval {d}",
            batch_size=batch_size,
            max_length=max_length,
            device=device,
        )[0]
        for d, rows in texts.items()
    }


def equation_accuracy(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 128,
    device: str | torch.device = "cpu",
) -> EquationResult:
    """Teacher-forced exact match of the equations (``a op b = c``, one per line) in ``texts``.

    Each text is run once, truncated to ``max_length`` tokens as in :func:`domain_losses`;
    an equation is correct when the model's argmax prediction of every token of its answer
    (the digits after ``" = "``, located with the fast tokenizer's offsets mapping) is the
    text's token. An equation whose answer does not lie wholly within the first
    ``max_length`` tokens is not counted.

    Raises:
        TypeError: the tokenizer is not a fast one (no offsets mapping).
    """
    return _score_texts(
        model,
        tokenizer,
        texts,
        equations=True,
        desc="equations",
        batch_size=batch_size,
        max_length=max_length,
        device=device,
    )[1]


@torch.no_grad()
def response_exact_match(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    references: Sequence[str],
    *,
    max_new_tokens: int = 64,
    stop_token_ids: Sequence[int] = (),
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> MatchResult:
    """Share of greedy decodes of ``prompts`` (token ids) equal to ``references``.

    Decodes stop at the tokenizer's end-of-sequence token or one of ``stop_token_ids`` (a
    chat template's stop words); both sides are compared without special tokens and
    surrounding whitespace.
    """
    pad = _pad_id(tokenizer)
    stop = list(dict.fromkeys([tokenizer.eos_token_id, *stop_token_ids]))
    targets = [r.strip() for r in references]
    longer = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) > max_new_tokens for t in targets)
    if longer:
        logger.warning(
            "%d of %d references are longer than max_new_tokens=%d tokens and cannot match; raise it",
            longer,
            len(targets),
            max_new_tokens,
        )
    correct = 0
    with _eval_mode(model):
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            # Left padding, so that every row's continuation starts at the same column.
            ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], dtype=torch.long)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], dtype=torch.long)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=stop,
            )
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            correct += sum(t.strip() == r for t, r in zip(texts, targets[start : start + batch_size], strict=True))
    return MatchResult(correct=correct, total=len(prompts))


@dataclass(frozen=True)
class ModelSource:
    """Where a model to evaluate lives: a full model directory, or an adapter on ``base``."""

    path: Path
    base: str | None = None
    tokenizer_dir: str = ""


def find_model(name: str, *, base_model: str | None = None) -> ModelSource:
    """Locate a full model directory, a LoRA adapter directory or ``builtin:<name>`` (nothing is loaded).

    An adapter (``adapter_config.json``) is applied to ``base_model``, else the base model
    it names (``builtin:`` names resolve). The tokenizer comes from the directory when it
    holds one, else from the base model.

    Raises:
        FileNotFoundError: ``name`` is not a directory, or neither kind of model directory.
        ValueError: an unknown ``builtin:`` name.
    """
    from datasteer.assets import resolve_builtin

    path = Path(resolve_builtin(name))
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: no such directory")
    has_tokenizer = (path / "tokenizer_config.json").is_file()
    if (path / "adapter_config.json").is_file():
        base = base_model or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise FileNotFoundError(f"{path}: the adapter names no base model; pass --base-model")
        base = resolve_builtin(base)
        return ModelSource(path, base, str(path) if has_tokenizer else base)
    if (path / "config.json").is_file():
        return ModelSource(path, None, str(path))
    hint = "pass a run's output_dir, one of its checkpoint-N directories or builtin:tiny-llama"
    steps = sorted(int(p.name[11:]) for p in path.glob("checkpoint-*") if p.name[11:].isdigit())
    if steps:
        hint = f"did the run finish? its last checkpoint is {path / f'checkpoint-{steps[-1]}'}"
    raise FileNotFoundError(
        f"{path}: neither a model (no config.json) nor a LoRA adapter (no adapter_config.json); {hint}"
    )


def load_tokenizer(source: ModelSource) -> Any:
    """The tokenizer of :func:`find_model`'s ``source``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.tokenizer_dir, local_files_only=True)
    except (OSError, ValueError):
        if source.tokenizer_dir == source.base:
            message = f"its base model {source.base} (which holds the tokenizer) is not found; pass --base-model"
        else:
            message = f"no tokenizer in {source.tokenizer_dir}"
        raise FileNotFoundError(f"{source.path}: {message}") from None


def load_model(source: ModelSource) -> Any:
    """The model of :func:`find_model`'s ``source``; an adapter is merged into its base model."""
    from transformers import AutoModelForCausalLM

    if source.base is None:
        try:
            return AutoModelForCausalLM.from_pretrained(source.path, local_files_only=True)
        except OSError as err:
            raise FileNotFoundError(f"{source.path}: {str(err).splitlines()[0]}") from None
    try:
        from peft import PeftModel
    except ImportError:
        raise FileNotFoundError(
            f"{source.path} is a LoRA adapter; evaluating it needs peft (pip install peft)"
        ) from None
    try:
        base = AutoModelForCausalLM.from_pretrained(source.base, local_files_only=True)
    except (OSError, ValueError):
        raise FileNotFoundError(
            f"{source.path}: its base model {source.base} is not found; pass --base-model"
        ) from None
    return PeftModel.from_pretrained(base, str(source.path)).merge_and_unload()


def read_run_args(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A run config's LLaMA-Factory keys with ``key=value`` overrides, ``builtin:`` values resolved
    (its ``datasteer:`` block is not needed to evaluate and is dropped). Raises ConfigError."""
    from datasteer.assets import resolve_builtin
    from datasteer.config import apply_overrides, read_yaml

    args = apply_overrides(read_yaml(path), overrides)
    args.pop("datasteer", None)
    for key, value in args.items():
        if isinstance(value, str):
            try:
                args[key] = resolve_builtin(value)
            except ValueError as err:
                raise ConfigError(f"{key}: {err}") from None
    return args


def read_corpus_texts(
    corpus_dir: Path, domains: Sequence[str] | None = None, split: str = "eval"
) -> dict[str, list[str]]:
    """``text`` of each ``<domain>_<split>.jsonl`` in a built-in-format corpus directory."""
    files = sorted(corpus_dir.glob(f"*_{split}.jsonl"))
    available = {f.name[: -len(f"_{split}.jsonl")]: f for f in files}
    chosen = list(domains) if domains else list(available)
    missing = [d for d in chosen if d not in available]
    if missing:
        raise FileNotFoundError(f"no {split} file for domains {missing} in {corpus_dir} (have {sorted(available)})")
    return {d: [json.loads(line)["text"] for line in available[d].read_text().splitlines() if line] for d in chosen}


def evaluate_corpus(
    model: Any,
    tokenizer: Any,
    texts: Mapping[str, Sequence[str]],
    *,
    batch_size: int = 16,
    max_length: int = 128,
    device: str | torch.device = "cpu",
) -> dict[str, DomainResult]:
    """:func:`domain_losses`, with :func:`equation_accuracy` (from the same pass) for the
    :data:`EQUATION_DOMAINS`."""
    results = {}
    for domain, rows in texts.items():
        equations = domain in EQUATION_DOMAINS and tokenizer.is_fast
        result, acc = _score_texts(
            model,
            tokenizer,
            rows,
            equations=equations,
            desc=f"eval {domain}",
            batch_size=batch_size,
            max_length=max_length,
            device=device,
        )
        results[domain] = DomainResult(result.loss, result.tokens, acc) if equations else result
    return results


@dataclass(frozen=True)
class EvalSet:
    """One domain's held-out rows as training tokenised them, with the tokenizer that did.

    ``rows``: ``(input_ids, labels)``; ``prompts``/``references``: the prompt ids and the
    reference response of each row, when asked for (sft); ``stop_token_ids``: where the
    chat template ends a response.
    """

    rows: list[tuple[list[int], list[int]]]
    tokenizer: Any
    prompts: list[list[int]] | None = None
    references: list[str] | None = None
    stop_token_ids: tuple[int, ...] = ()


def find_run_config(output_dir: str | Path) -> Path | None:
    """``OUTPUT_DIR/training_args.yaml`` (the run's config, which ``datasteer train`` keeps),
    if it is there and names held-out sets (``eval_dataset``, or ``val_size`` with a dataset);
    otherwise ``None``: the evaluation falls back to the built-in corpus."""
    path = Path(output_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        args = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(args, dict):
        return None
    names_sets = bool(args.get("eval_dataset")) or bool(args.get("val_size") and args.get("dataset"))
    return path if names_sets else None


def load_run_eval_sets(
    args: Mapping[str, Any],
    fallback_tokenizer: Any = None,
    *,
    domains: Sequence[str] | None = None,
    with_responses: bool = False,
) -> dict[str, EvalSet]:
    """The held-out sets of a run, tokenised by LLaMA-Factory as its training did.

    ``args``: the run's LLaMA-Factory keys (``builtin:`` values resolved). Each dataset of
    ``eval_dataset`` is one domain; without it, the ``val_size`` split of each training
    dataset (the split training made: same seed). The tokenizer is training's (LLaMA-Factory's
    ``load_tokenizer`` of the run's ``model_name_or_path``, then its template's fix-up), or
    ``fallback_tokenizer`` when that one cannot be loaded (e.g. a hub model not cached here).
    ``with_responses`` (sft) also loads each row's prompt and reference as LLaMA-Factory's
    ``predict_with_generate`` does.

    Raises:
        ConfigError: no held-out set is named, an unknown domain, or LLaMA-Factory refuses the arguments.
    """
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    # Checked before LLaMA-Factory parses (and logs) anything.
    stage = str(args.get("stage") or "sft")
    if stage not in ("pt", "sft"):
        raise ConfigError(f"stage: datasteer eval scores stages pt and sft, got {stage!r}")
    if with_responses and stage != "sft":
        raise ConfigError(f"stage: a {stage} run's eval sets have no responses to match; exact match needs sft")
    if not args.get("eval_dataset") and not (args.get("val_size") and args.get("dataset")):
        raise ConfigError(
            "the run names no eval_dataset (nor val_size); name some: --config RUN.yaml eval_dataset=A[,B...]"
        )
    settings = dict(args)
    settings.pop("datasteer", None)
    settings.pop("deepspeed", None)  # evaluation runs in this one process
    # Only the held-out sets are built; tokenized_path would load a saved dataset instead of them.
    settings.update(do_train=False, do_eval=False, do_predict=False, predict_with_generate=False)
    settings.update(streaming=False, tokenized_path=None, report_to="none")
    settings["eval_on_each_dataset"] = False  # one set at a time below: LLaMA-Factory would return a dict
    try:
        model_args, data_args, training_args, _, _ = get_train_args(settings)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"LLaMA-Factory config: {str(err).splitlines()[0]}") from None
    from_train = not data_args.eval_dataset
    names = list(data_args.dataset if from_train else data_args.eval_dataset)
    if domains:
        unknown = [d for d in domains if d not in names]
        if unknown:
            raise ConfigError(f"--domains: {unknown} are not eval sets of the run (have {names})")
        names = [n for n in names if n in domains]
    try:
        # Training's own tokenizer: a saved output dir's may carry a chat template that
        # LLaMA-Factory wrote and cannot parse back when the run named no template.
        tokenizer = load_tokenizer(model_args)["tokenizer"]
    except (OSError, ValueError):
        if fallback_tokenizer is None:
            raise ConfigError(f"model_name_or_path: no tokenizer at {model_args.model_name_or_path}") from None
        logger.info("no tokenizer at %s; tokenising with the model's", model_args.model_name_or_path)
        tokenizer = fallback_tokenizer
    try:
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
    except ValueError as err:  # e.g. a chat template LLaMA-Factory wrote but cannot parse back
        raise ConfigError(
            f"template: none named and the tokenizer's chat template fails ({err}); add template=NAME"
        ) from None

    def load(name: str, generate: bool) -> Any:
        sub = copy.copy(data_args)
        sub.dataset, sub.eval_dataset = ([name], None) if from_train else (None, [name])
        if not from_train:
            sub.val_size = 0.0
        train_args = copy.copy(training_args)
        train_args.predict_with_generate = generate
        # LLaMA-Factory prints an example row to stdout; keep stdout for the results.
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            try:
                module = get_dataset(template, model_args, sub, train_args, stage, tokenizer)
            except (ValueError, RuntimeError) as err:  # an unknown dataset, too few rows for one pt block
                raise ConfigError(f"eval set {name}: {str(err).splitlines()[0]}") from None
        logger.debug("%s", printed.getvalue())
        return module["eval_dataset"]

    pad = _pad_id(tokenizer)
    sets = {}
    for name in names:
        data = load(name, generate=False)
        if "labels" in data.column_names:
            rows = [(list(i), list(lab)) for i, lab in zip(data["input_ids"], data["labels"], strict=True)]
        else:  # pt: labels are the inputs with padding ids masked (DataCollatorForLanguageModeling, mlm=False)
            rows = [(list(i), [IGNORE_INDEX if t == pad else t for t in i]) for i in data["input_ids"]]
        prompts = references = None
        if with_responses:
            gen = load(name, generate=True)
            prompts = [list(i) for i in gen["input_ids"]]
            references = tokenizer.batch_decode([list(r) for r in gen["labels"]], skip_special_tokens=True)
        sets[name] = EvalSet(rows, tokenizer, prompts, references, tuple(template.get_stop_token_ids(tokenizer)))
    return sets


def evaluate_run(
    model: Any,
    sets: Mapping[str, EvalSet],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, DomainResult]:
    """Loss of each set's labelled tokens, and exact match where the set has references."""
    results = {}
    for name, data in sets.items():
        result = labelled_loss(
            model,
            data.rows,
            pad_token_id=_pad_id(data.tokenizer),
            batch_size=batch_size,
            device=device,
            desc=f"eval {name}",
        )
        if data.prompts is not None and data.references is not None:
            acc = response_exact_match(
                model,
                data.tokenizer,
                data.prompts,
                data.references,
                max_new_tokens=max_new_tokens,
                stop_token_ids=data.stop_token_ids,
                batch_size=batch_size,
                device=device,
            )
            result = DomainResult(result.loss, result.tokens, acc)
        results[name] = result
    return results


def format_results(results: Mapping[str, DomainResult]) -> str:
    """A table of loss, perplexity, token count and accuracy (blank where none) per domain,
    with the mean over domains (of accuracy only when every domain has one)."""
    width = max([len("domain"), *(len(d) for d in results)]) + 2

    def acc(value: float | None) -> str:
        return f"{value:>10.4f}" if value is not None else " " * 10

    lines = [f"{'domain':<{width}}{'loss':>10}{'ppl':>12}{'tokens':>10}{'accuracy':>10}"]
    for domain, r in results.items():
        score = r.accuracy.accuracy if r.accuracy is not None else None
        lines.append(f"{domain:<{width}}{r.loss:>10.4f}{r.perplexity:>12.4f}{r.tokens:>10d}{acc(score)}".rstrip())
    mean = sum(r.loss for r in results.values()) / max(len(results), 1)
    scores = [r.accuracy.accuracy for r in results.values() if r.accuracy is not None]
    mean_acc = sum(scores) / len(scores) if results and len(scores) == len(results) else None
    ppl = math.exp(mean) if mean < 700 else float("inf")
    lines.append(f"{'mean':<{width}}{mean:>10.4f}{ppl:>12.4f}{'':>10}{acc(mean_acc)}".rstrip())
    return "\n".join(lines)


def results_to_json(results: Mapping[str, DomainResult]) -> dict[str, dict[str, Any]]:
    """The numbers of :func:`format_results` per domain; ``accuracy`` is null where none."""
    payload: dict[str, dict[str, Any]] = {}
    for domain, r in results.items():
        entry: dict[str, Any] = {"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens, "accuracy": None}
        if r.accuracy is not None:
            entry.update(accuracy=r.accuracy.accuracy, correct=r.accuracy.correct, total=r.accuracy.total)
        payload[domain] = entry
    return payload
