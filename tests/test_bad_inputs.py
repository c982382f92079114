"""Every bad input is one line on stderr, the right exit code, no traceback, nothing written.

Table-driven: a case is an example config (on the built-in corpus and tiny model), the
overrides that break it, an optional setup that writes a damaged file (a copy of the
corpus, a prepared file, a checkpoint), the expected message (a regex) and exit code.
The cases run through ``datasteer.cli.main`` in process, and stop before a model loads;
the few that need the tokenised pool are marked slow.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from datasteer.cli import main
from datasteer.errors import SteeringStateError

pytest.importorskip("llamafactory")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Built-in corpus and tiny model in a private home, built once for the module."""
    from datasteer.assets import ensure_builtin

    root = tmp_path_factory.mktemp("datasteer-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("DATASTEER_HOME", str(root))
    ensure_builtin("tiny-llama")
    yield root
    patch.undo()


@pytest.fixture(autouse=True)
def framework_log_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLaMA-Factory's log handler keeps the stdout it was created with; under ``capsys`` that
    is one test's stream, closed after it, and logging to it prints "--- Logging error ---"
    (with a traceback) on the next test's stderr. Point it at the stream open now."""
    from llamafactory.extras import logging as framework_logging

    handler = framework_logging._default_handler
    if isinstance(handler, logging.StreamHandler):
        monkeypatch.setattr(handler, "stream", sys.stdout)


@dataclass
class Workspace:
    """Where a case writes its damaged inputs; ``home`` holds the built-in assets."""

    root: Path
    home: Path

    def corpus(self, edit: Callable[[Path], object]) -> list[str]:
        """A copy of the built-in corpus, changed by ``edit``; the override that uses it."""
        copy = self.root / "corpus"
        shutil.copytree(self.home / "corpus", copy)
        edit(copy)
        return [f"dataset_dir={copy}"]

    def folder(self, name: str, files: dict[str, object]) -> Path:
        """A folder of files: JSON for dicts, bytes and text as they are."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        for file, content in files.items():
            target = path / file
            if isinstance(content, bytes):
                target.write_bytes(content)
            elif isinstance(content, str):
                target.write_text(content)
            else:
                target.write_text(json.dumps(content))
        return path


@dataclass(frozen=True)
class Case:
    id: str
    message: str  # a regex searched in the one error line
    overrides: tuple[str, ...] = ()
    example: str = "mix_random.yaml"
    setup: Callable[[Workspace], list[str]] | None = None
    drop: tuple[str, ...] = ()  # keys removed from the example
    code: int = 2
    command: tuple[str, ...] = ("train",)


# --------------------------------------------------------------------------- setups


def edit_info(name: str, entry: object) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        info = json.loads((root / "dataset_info.json").read_text())
        info[name] = entry
        (root / "dataset_info.json").write_text(json.dumps(info))

    return edit


def write_file(name: str, content: str | bytes) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            (root / name).write_text(content)

    return edit


def corpus(*edits: Callable[[Path], object]) -> Callable[[Workspace], list[str]]:
    return lambda ws: ws.corpus(lambda root: [edit(root) for edit in edits])


def prose_line(line: int, text: str) -> Callable[[Path], None]:
    """Replace line ``line`` (1-based) of prose.jsonl."""

    def edit(root: Path) -> None:
        lines = (root / "prose.jsonl").read_text().splitlines()
        lines[line - 1] = text
        (root / "prose.jsonl").write_text("\n".join(lines) + "\n")

    return edit


def model_dir(config: dict[str, object] | None, key: str) -> Callable[[Workspace], list[str]]:
    """A folder standing for a saved model (only its config.json, or nothing)."""

    def setup(ws: Workspace) -> list[str]:
        path = ws.folder("model", {"config.json": config} if config is not None else {})
        return [f"{key}={path}"]

    return setup


def prepared(
    kind: str, *, tensor: torch.Tensor | None = None, settings: dict[str, object] | None = None, damage: str = ""
) -> Callable[[Workspace], list[str]]:
    """A prepared file of ``kind`` with the example's settings (``settings`` changed), then damaged."""

    def setup(ws: Workspace) -> list[str]:
        from datasteer.ops.prepared import write_prepared

        path = ws.root / "prep"
        made = {**example_settings(kind), **(settings or {})}
        default = torch.zeros(3, 4, dtype=torch.long) if kind == "near" else torch.full((10,), 0.1, dtype=torch.float64)
        name = "neighbours" if kind == "near" else "probabilities"
        value = default if tensor is None else tensor
        write_prepared(path, kind, {name: value}, fingerprint="0" * 64, settings=made)
        data, meta = path / f"{kind}.safetensors", path / f"{kind}.json"
        if damage == "truncate":
            data.write_bytes(data.read_bytes()[:-5])
        elif damage == "no-tensors":
            data.unlink()
        elif damage == "bad-json":
            meta.write_text("{not json")
        elif damage == "other-kind":
            meta.write_text(meta.read_text().replace(f'"kind": "{kind}"', '"kind": "other"'))
        return [f"datasteer.params.prepared={path}"]

    return setup


def example_settings(kind: str) -> dict[str, object]:
    """The preparation settings of the example's params (what `datasteer prepare` records)."""
    from datasteer.cli import prepare_run

    example = "select_near_prepared.yaml" if kind == "near" else "select_tsds.yaml"
    _, steering = prepare_run(str(EXAMPLES / example), [])
    settings: dict[str, object] = steering.config.stages["select"].params.settings()
    return settings


def checkpoint(damage: str) -> Callable[[Workspace], list[str]]:
    """A checkpoint-N folder (trainer state, the tiny model's weights, a steering state), damaged."""

    def setup(ws: Workspace) -> list[str]:
        path = ws.root / "ckpt" / "checkpoint-2"
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
        shutil.copy(ws.home / "tiny-llama" / "model.safetensors", path / "model.safetensors")
        torch.save({"step": 2}, path / "steering_state.pt")
        torch.save({"lr": 1.0}, path / "optimizer.pt")
        if damage == "no-state":
            (path / "trainer_state.json").unlink()
        elif damage == "bad-state":
            (path / "trainer_state.json").write_text('{"global_step": ')
        elif damage == "no-weights":
            (path / "model.safetensors").unlink()
        elif damage == "truncated-weights":
            data = (path / "model.safetensors").read_bytes()
            (path / "model.safetensors").write_bytes(data[: len(data) // 2])
        elif damage == "no-steering":
            (path / "steering_state.pt").unlink()
        elif damage == "truncated-optimizer":
            data = (path / "optimizer.pt").read_bytes()
            (path / "optimizer.pt").write_bytes(data[: len(data) - 40])
        return [f"resume_from_checkpoint={path}"]

    return setup


def auto_resume(ws: Workspace) -> list[str]:
    """An output_dir whose last checkpoint is truncated: LLaMA-Factory would resume it."""
    out = ws.root / "out"
    path = out / "checkpoint-3"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    data = (ws.home / "tiny-llama" / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:100])
    torch.save({"step": 3}, path / "steering_state.pt")
    return ["overwrite_output_dir=false"]


def config_file(content: bytes) -> Callable[[Workspace], list[str]]:
    def setup(ws: Workspace) -> list[str]:
        (ws.root / "run.yaml").write_bytes(content)
        return []

    return setup


def reference_with_vocab(size: int) -> Callable[[Workspace], list[str]]:
    def setup(ws: Workspace) -> list[str]:
        path = ws.folder("reference", {"config.json": {"model_type": "llama", "vocab_size": size}})
        save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
        return [f"datasteer.params.reference_model={path}"]

    return setup


def tiny_llama_without(*names: str, truncate: bool = False) -> Callable[[Workspace], list[str]]:
    """A copy of the tiny model without some of its files (or with them cut in half)."""

    def setup(ws: Workspace) -> list[str]:
        path = ws.root / "tiny"
        shutil.copytree(ws.home / "tiny-llama", path)
        for name in names:
            if truncate:
                data = (path / name).read_bytes()
                (path / name).write_bytes(data[: len(data) // 2])
            else:
                (path / name).unlink()
        return [f"model_name_or_path={path}"]

    return setup


SHAREGPT = {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "conversations"}}


# --------------------------------------------------------------------------- the table

CASES = [
    # -- the config file and its overrides
    Case("config-not-yaml", r"run\.yaml: not valid YAML", setup=config_file(b"a: [1,\n")),
    Case("config-not-utf8", r"run\.yaml: not valid YAML \(UnicodeDecodeError\)", setup=config_file(b"a: \xff\xfe\n")),
    Case("config-a-list", r"the config must be a mapping", setup=config_file(b"- 1\n- 2\n")),
    Case("override-without-equals", r"novalue: overrides are written key=value", ("novalue",)),
    Case(
        "override-unclosed-list",
        r"datasteer\.params\.concentration: '\[0\.5,' is not a YAML value",
        ("datasteer.params.concentration=[0.5,",),
    ),
    Case(
        "override-proportions-unclosed",
        r"datasteer\.params\.proportions: '\[0\.5,' is not a YAML value",
        ("datasteer.params.proportions=[0.5,",),
        example="mix_static.yaml",
    ),
    Case("override-into-a-value", r"max_steps\.x: 'max_steps' is not a block", ("max_steps.x=1",)),
    Case(
        "unknown-builtin",
        r"model_name_or_path: unknown built-in asset 'nosuch'",
        ("model_name_or_path=builtin:nosuch",),
    ),
    # -- the datasteer: block
    Case(
        "steering-unknown-key",
        r"datasteer\.update_evry: unknown key \(did you mean 'update_every'\?\)",
        ("datasteer.update_evry=3",),
    ),
    Case(
        "steering-unknown-algorithm",
        r"unknown mix algorithm 'randm' \(did you mean 'random'\?\)",
        ("datasteer.algorithm=randm",),
    ),
    Case("steering-bad-paradigm", r"datasteer\.paradigm: 'mixx' is not allowed", ("datasteer.paradigm=mixx",)),
    Case("steering-update-every-0", r"datasteer\.update_every: must be >= 1", ("datasteer.update_every=0",)),
    Case(
        "steering-update-every-text",
        r"datasteer\.update_every: expected an integer, got 'ten'",
        ("datasteer.update_every=ten",),
    ),
    Case("steering-warmup-negative", r"datasteer\.warmup_steps: must be >= 0", ("datasteer.warmup_steps=-1",)),
    Case("steering-max-updates-0", r"datasteer\.max_updates: must be >= 1 or null", ("datasteer.max_updates=0",)),
    Case("steering-lag-0", r"datasteer\.lag: must be >= 1", ("datasteer.lag=0",)),
    Case(
        "steering-log-file-escapes",
        r"datasteer\.log_file: '\.\./x\.jsonl' must be a file name relative",
        ("datasteer.log_file=../x.jsonl",),
    ),
    Case("steering-not-a-mapping", r"datasteer: expected a mapping", ("datasteer=3",)),
    Case(
        "steering-params-unknown", r"datasteer\.params\.concentrate: unknown key", ("datasteer.params.concentrate=2",)
    ),
    Case(
        "proportions-wrong-length",
        r"expected 4 proportions \(one per domain\), got 2",
        ("datasteer.params.proportions=[0.5,0.5]",),
        example="mix_static.yaml",
    ),
    Case(
        "proportions-sum",
        r"proportions must sum to 1",
        ("datasteer.params.proportions=[0.5,0.5,0.5,0.5]",),
        example="mix_static.yaml",
    ),
    Case(
        "proportions-file-missing",
        r"proportions_file: .*nosuch\.json does not exist",
        ("datasteer.params={proportions_file: nosuch.json}",),
        example="mix_static.yaml",
    ),
    Case(
        "loss-candidates-0",
        r"datasteer\.params\.candidates: must be >= 1 or null",
        ("datasteer.params.candidates=0",),
        example="select_loss.yaml",
    ),
    Case(
        "weight-with-update-every",
        r"weighting acts at every step",
        ("datasteer.update_every=5",),
        example="weight_loss.yaml",
    ),
    Case(
        "staged-with-flat-key",
        r"datasteer\.warmup_steps: the staged form",
        ("datasteer.warmup_steps=2",),
        example="compose_odm_select_loss.yaml",
    ),
    Case(
        "doremi-with-weight-stage",
        r"datasteer\.weight: doremi trains on its own domain-weighted loss",
        ("datasteer={mix: {algorithm: doremi, params: {reference_model: x}}, weight: {algorithm: uniform}}",),
    ),
    Case(
        "tsds-under-a-mixer",
        r"tsds draws from probabilities prepared over the whole pool",
        ("datasteer={mix: {algorithm: random}, select: {algorithm: tsds, params: {prepared: p}}}",),
    ),
    # -- LLaMA-Factory's keys
    Case("misspelled-key", r"LLaMA-Factory config: .*learnig_rate", ("learnig_rate=0.1",)),
    Case("learning-rate-word", r"learning_rate: expected a number, got 'fast'", ("learning_rate=fast",)),
    Case("learning-rate-negative", r"learning_rate: must be >= 0, got -0\.1", ("learning_rate=-0.1",)),
    Case("batch-size-0", r"per_device_train_batch_size: must be >= 1, got 0", ("per_device_train_batch_size=0",)),
    Case("accumulation-0", r"gradient_accumulation_steps: must be >= 1, got 0", ("gradient_accumulation_steps=0",)),
    Case("cutoff-len-0", r"cutoff_len: must be >= 1 \(tokens per training row\), got 0", ("cutoff_len=0",)),
    Case("max-steps-0", r"max_steps: 0 would still train", ("max_steps=0",)),
    Case("max-steps-fraction", r"max_steps: expected an integer, got 1\.5", ("max_steps=1.5",)),
    Case(
        "epochs-0", r"num_train_epochs: must be > 0 when max_steps is not set", ("max_steps=-1", "num_train_epochs=0")
    ),
    Case("save-steps-0", r"save_steps: must be > 0 with save_strategy: steps", ("save_steps=0",)),
    Case("bool-as-word", r"overwrite_output_dir: expected true or false, got 'no'", ("overwrite_output_dir=no",)),
    Case("seed-text", r"seed: expected an integer, got 'abc'", ("seed=abc",)),
    Case(
        "finetuning-type-typo",
        r"finetuning_type: 'fulll' is not allowed \(did you mean 'full'\?\)",
        ("finetuning_type=fulll",),
    ),
    Case("stage-typo", r"stage: 'ptt' is not allowed \(did you mean 'pt'\?\)", ("stage=ptt",)),
    Case("stage-not-steerable", r"stage: datasteer steers stages pt, sft, got 'kto'", ("stage=kto",)),
    Case("scheduler-typo", r"LLaMA-Factory config: cosin is not a valid SchedulerType", ("lr_scheduler_type=cosin",)),
    Case(
        "template-unknown",
        r"template: 'chatmll' is not a LLaMA-Factory template \(did you mean 'chatml'\?\)",
        ("template=chatmll",),
    ),
    Case("val-size-negative", r"val_size: must be >= 0", ("val_size=-0.1",)),
    Case("max-samples-0", r"max_samples: must be >= 1 or null, got 0", ("max_samples=0",)),
    Case("no-training", r"do_train: a steered run must train", ("do_train=false",)),
    Case(
        "streaming-select",
        r"select/loss: streamed domains need a mix stage .* use mix: \{algorithm: static\}",
        ("streaming=true",),
        example="select_loss.yaml",
    ),
    Case(
        "streaming-no-workers",
        r"dataloader_num_workers: LLaMA-Factory streams a local dataset file in dataloader_num_workers shards",
        ("streaming=true", "dataloader_num_workers=0"),
    ),
    Case(
        "streaming-moe",
        r"datasteer.params.source: dynamic_moe with source .auto. may measure training rows .* set source: eval",
        ("streaming=true",),
        example="mix_dynamic_moe.yaml",
    ),
    Case("mix-strategy", r"mix_strategy: datasteer mixes the datasets itself", ("mix_strategy=interleave_under",)),
    Case("ignore-data-skip", r"ignore_data_skip: datasteer resumes exactly", ("ignore_data_skip=true",)),
    Case(
        "group-by-length",
        r"train_sampling_strategy: group_by_length cannot be combined",
        ("train_sampling_strategy=group_by_length",),
    ),
    Case(
        "liger-kernel",
        r"enable_liger_kernel: its fused loss returns no logits",
        ("enable_liger_kernel=true",),
        example="mix_odm.yaml",
    ),
    # -- models
    Case(
        "model-missing",
        r"model_name_or_path: .*/nomodel is not a local model directory",
        ("model_name_or_path=/nonexistent/nomodel",),
    ),
    Case(
        "model-not-cached",
        r"model_name_or_path: org/nomodel is not a local model directory nor a model in the Hugging Face cache",
        ("model_name_or_path=org/nomodel",),
    ),
    Case(
        "model-dir-empty",
        r"model_name_or_path: .*model holds no saved model \(no config\.json",
        setup=model_dir(None, "model_name_or_path"),
    ),
    Case(
        "model-config-not-json",
        r"model_name_or_path: .*config\.json is not valid JSON",
        setup=lambda ws: [f"model_name_or_path={ws.folder('m', {'config.json': '{'})}"],
    ),
    Case(
        "model-no-weights",
        r"model_name_or_path: .*tiny holds no weights \(\*\.safetensors or \*\.bin\)",
        setup=tiny_llama_without("model.safetensors"),
    ),
    Case(
        "model-truncated-weights",
        r"model_name_or_path: .*tiny/model\.safetensors is truncated",
        setup=tiny_llama_without("model.safetensors", truncate=True),
    ),
    Case(
        "model-no-tokenizer",
        r"model_name_or_path: .*tiny holds no tokenizer",
        setup=tiny_llama_without("tokenizer.json", "tokenizer_config.json"),
    ),
    Case(
        "doremi-reference-not-given",
        r"datasteer\.params\.reference_model: required key is missing",
        ("datasteer.params={eta: 1.0}",),
        example="mix_doremi_2_proxy.yaml",
    ),
    Case(
        "adapter-missing",
        r"adapter_name_or_path: .*/noadapter is not a local model directory",
        ("adapter_name_or_path=/nonexistent/noadapter",),
        example="sft_lora_select_random.yaml",
    ),
    Case(
        "doremi-reference-missing",
        r"datasteer\.params\.reference_model: .*noref does not exist; train the reference model first",
        ("datasteer.params.reference_model=noref",),
        example="mix_doremi_2_proxy.yaml",
    ),
    Case(
        "rho-loss-il-model-missing",
        r"datasteer\.params\.reference_model: .*noref does not exist; train the reference model first",
        ("datasteer.params.reference_model=noref",),
        example="select_rho_loss_2_main.yaml",
    ),
    Case(
        "doremi-reference-not-a-model",
        r"datasteer\.params\.reference_model: .*model holds no saved model",
        setup=model_dir(None, "datasteer.params.reference_model"),
        example="mix_doremi_2_proxy.yaml",
    ),
    Case(
        "reference-other-vocabulary",
        r"reference_model: .* has a vocabulary of 7 tokens, the trained model \d+",
        setup=reference_with_vocab(7),
        example="weight_reducible.yaml",
    ),
    # -- data: dataset_info.json and the files it names
    Case(
        "dataset-unknown",
        r"dataset: 'prosee' is not in .*dataset_info\.json \(did you mean 'prose'\?\)",
        ("dataset=prosee,code",),
    ),
    Case("dataset-twice", r"dataset: 'prose' is listed twice; each dataset is one domain", ("dataset=prose,prose",)),
    Case("dataset-empty-name", r"dataset: an empty name in 'prose,,code'", ("dataset=prose,,code",)),
    Case(
        "eval-dataset-unknown",
        r"eval_dataset: 'arithmetic_evl' is not in .*\(did you mean 'arithmetic_eval'\?\)",
        ("eval_dataset=arithmetic_evl",),
        example="select_less.yaml",
    ),
    Case("eval-dataset-twice", r"eval_dataset: 'prose_eval' is listed twice", ("eval_dataset=prose_eval,prose_eval",)),
    Case("dataset-dir-missing", r"dataset_dir: .*nowhere is not a folder", ("dataset_dir=/nonexistent/nowhere",)),
    Case(
        "dataset-dir-not-set",
        r"dataset_dir: data is not a folder \(LLaMA-Factory's default is \./data\)",
        drop=("dataset_dir",),
    ),
    Case(
        "dataset-info-missing",
        r"dataset_dir: .* has no dataset_info\.json",
        setup=lambda ws: [f"dataset_dir={ws.folder('d', {})}"],
    ),
    Case(
        "dataset-info-malformed",
        r"dataset_dir: .*dataset_info\.json is not valid JSON",
        setup=corpus(write_file("dataset_info.json", "{")),
    ),
    Case(
        "dataset-info-no-file-name",
        r"dataset: 'prose' in .*dataset_info\.json names no file_name",
        setup=corpus(edit_info("prose", {"columns": {"prompt": "text"}})),
    ),
    Case(
        "data-file-missing",
        r"dataset: 'prose': .*prose\.jsonl does not exist",
        setup=corpus(lambda root: (root / "prose.jsonl").unlink()),
    ),
    Case("data-file-empty", r"dataset: 'prose': .*prose\.jsonl is empty", setup=corpus(write_file("prose.jsonl", ""))),
    Case(
        "data-file-blank-lines",
        r"dataset: 'prose': .*prose\.jsonl has no rows",
        setup=corpus(write_file("prose.jsonl", "\n\n")),
    ),
    Case(
        "data-line-malformed",
        r"dataset: 'prose': .*prose\.jsonl line 7 is not valid JSON",
        setup=corpus(prose_line(7, '{"text": "unclosed')),
    ),
    Case(
        "data-line-not-object",
        r"dataset: 'prose': .*prose\.jsonl line 3 is not a JSON object \(a list\)",
        setup=corpus(prose_line(3, "[1, 2]")),
    ),
    Case(
        "data-wrong-column",
        r"dataset: 'prose': .*prose\.jsonl has no column 'content' \(dataset_info\.json columns\.prompt\); its rows have: domain, prompt, response, text",
        setup=corpus(edit_info("prose", {"file_name": "prose.jsonl", "columns": {"prompt": "content"}})),
    ),
    Case(
        "data-default-columns",
        r"has no column 'instruction' \(dataset_info\.json columns\.prompt\)",
        setup=corpus(edit_info("prose", {"file_name": "prose.jsonl"})),
    ),
    Case(
        "data-unsupported-type",
        r"dataset: 'prose': .*prose\.xml has an unsupported type",
        setup=corpus(write_file("prose.xml", "<a/>"), edit_info("prose", {"file_name": "prose.xml"})),
    ),
    Case(
        "data-json-array-item",
        r"dataset: 'prose': .*prose\.json item 1 is not a JSON object \(an int\)",
        setup=corpus(
            write_file("prose.json", '[{"text": "a"}, 3]'),
            edit_info("prose", {"file_name": "prose.json", "columns": {"prompt": "text"}}),
        ),
    ),
    Case(
        "data-folder-empty",
        r"dataset: 'prose': the folder .*shards holds no data files",
        setup=corpus(
            lambda root: (root / "shards").mkdir(),
            edit_info("prose", {"file_name": "shards", "columns": {"prompt": "text"}}),
        ),
    ),
    Case(
        "data-message-tag",
        r"dataset: 'chat': .*chat\.jsonl row 1: a message has no 'value' key",
        ("dataset=chat", "stage=sft", "template=default"),
        setup=corpus(
            write_file("chat.jsonl", '{"conversations": [{"from": "human", "text": "hi"}]}\n'),
            edit_info("chat", SHAREGPT),
        ),
    ),
    Case(
        "sft-on-pt-rows",
        r"dataset: 'prose' names no response column .* which stage sft trains on",
        ("stage=sft", "template=default"),
    ),
    Case(
        "ranking-dataset",
        r"dataset: 'prose' is a ranking dataset",
        setup=corpus(edit_info("prose", {"file_name": "prose.jsonl", "ranking": True, "columns": {"prompt": "text"}})),
    ),
    Case(
        "eval-data-malformed",
        r"eval_dataset: 'arithmetic_eval': .*arithmetic_eval\.jsonl line 1 is not valid JSON",
        example="select_less.yaml",
        setup=corpus(write_file("arithmetic_eval.jsonl", "nope\n")),
    ),
    # -- what the steering needs: targets, prepared files, eval sets per domain
    Case(
        "less-without-targets",
        r"eval_dataset: select/less compares the pool with target samples",
        ("eval_dataset=null",),
        example="select_less.yaml",
    ),
    Case(
        "near-without-targets",
        r"eval_dataset: select/near compares the pool with target samples",
        ("eval_dataset=null",),
        example="select_near.yaml",
    ),
    Case(
        "greats-without-targets",
        r"eval_dataset: select/greats compares the pool with target samples",
        ("eval_dataset=null",),
        example="select_greats.yaml",
    ),
    Case(
        "cluster-less-without-targets",
        r"eval_dataset: select/cluster_less compares",
        ("eval_dataset=null",),
        example="select_cluster_less.yaml",
    ),
    Case(
        "adapt-without-targets",
        r"eval_dataset: weight/adapt compares the pool with target samples",
        ("eval_dataset=null",),
        example="weight_adapt.yaml",
    ),
    Case(
        "nice-on-pt",
        r"stage: nice samples responses to the target prompts",
        ("stage=pt", "dataset=prose,code", "eval_dataset=arithmetic_eval"),
        example="select_nice.yaml",
    ),
    Case(
        "dynamic-moe-eval-per-domain",
        r"datasteer\.params\.source: 'eval' needs an evaluation set per domain; 'prose' has none",
        ("datasteer.algorithm=dynamic_moe", "datasteer.params={source: eval}"),
    ),
    Case(
        "tsds-not-prepared",
        r"datasteer\.params\.prepared: no prepared tsds file at .*nothing/tsds\.json; run `datasteer prepare tsds CONFIG`",
        ("datasteer.params.prepared=nothing",),
        example="select_tsds.yaml",
    ),
    Case(
        "near-not-prepared",
        r"datasteer\.params\.prepared: no prepared near file at .*nothing/near\.json",
        ("datasteer.params.prepared=nothing",),
        example="select_near_prepared.yaml",
    ),
    Case(
        "tsds-truncated",
        r"datasteer\.params\.prepared: .*tsds\.safetensors is truncated .*; run `datasteer prepare tsds CONFIG`",
        example="select_tsds.yaml",
        setup=prepared("tsds", damage="truncate"),
    ),
    Case(
        "near-truncated",
        r"datasteer\.params\.prepared: .*near\.safetensors is truncated",
        example="select_near_prepared.yaml",
        setup=prepared("near", damage="truncate"),
    ),
    Case(
        "tsds-tensors-missing",
        r"datasteer\.params\.prepared: .*tsds\.safetensors is missing",
        example="select_tsds.yaml",
        setup=prepared("tsds", damage="no-tensors"),
    ),
    Case(
        "near-record-malformed",
        r"datasteer\.params\.prepared: .*near\.json is not valid JSON",
        example="select_near_prepared.yaml",
        setup=prepared("near", damage="bad-json"),
    ),
    Case(
        "near-record-other-kind",
        r"datasteer\.params\.prepared: .*near\.json is not a prepared near file",
        example="select_near_prepared.yaml",
        setup=prepared("near", damage="other-kind"),
    ),
    Case(
        "tsds-other-settings",
        r"datasteer\.params\.neighbours: .*tsds\.json was prepared with neighbours=128, the config says 256",
        example="select_tsds.yaml",
        setup=prepared("tsds", settings={"neighbours": 128}),
    ),
    Case(
        "tsds-probabilities-nan",
        r"datasteer\.params\.prepared: .* holds no valid probabilities",
        example="select_tsds.yaml",
        setup=prepared("tsds", tensor=torch.tensor([0.5, float("nan")], dtype=torch.float64)),
    ),
    Case(
        "tsds-probabilities-negative",
        r"holds no valid probabilities",
        example="select_tsds.yaml",
        setup=prepared("tsds", tensor=torch.tensor([1.5, -0.5], dtype=torch.float64)),
    ),
    Case(
        "tsds-probabilities-zero",
        r"holds no valid probabilities \(finite, >= 0, with a positive sum\)",
        example="select_tsds.yaml",
        setup=prepared("tsds", tensor=torch.zeros(5, dtype=torch.float64)),
    ),
    Case(
        "near-negative-ids",
        r"datasteer\.params\.prepared: .* holds no valid neighbour lists",
        example="select_near_prepared.yaml",
        setup=prepared("near", tensor=torch.tensor([[3, -7]])),
    ),
    Case(
        "near-float-ids",
        r"holds no valid neighbour lists",
        example="select_near_prepared.yaml",
        setup=prepared("near", tensor=torch.tensor([[3.0, 1.0]])),
    ),
    Case(
        "prepared-other-model",
        r"datasteer\.params\.prepared: .*prep was prepared with another model \(model_type gpt2",
        example="select_near_prepared.yaml",
        setup=prepared("near", settings={"model": {"model_type": "gpt2"}}),
    ),
    # -- the checkpoint a run resumes from
    Case(
        "resume-missing",
        r"resume_from_checkpoint: .*checkpoint-9 does not exist",
        ("resume_from_checkpoint=runs/checkpoint-9",),
    ),
    Case(
        "resume-no-trainer-state",
        r"resume_from_checkpoint: .*checkpoint-2 has no trainer_state\.json",
        setup=checkpoint("no-state"),
    ),
    Case(
        "resume-bad-trainer-state",
        r"resume_from_checkpoint: .*trainer_state\.json is not valid JSON",
        setup=checkpoint("bad-state"),
    ),
    Case(
        "resume-no-weights",
        r"resume_from_checkpoint: .*checkpoint-2 holds no model weights",
        setup=checkpoint("no-weights"),
    ),
    Case(
        "resume-truncated-weights",
        r"resume_from_checkpoint: .*model\.safetensors is truncated",
        setup=checkpoint("truncated-weights"),
    ),
    Case(
        "resume-truncated-optimizer",
        r"resume_from_checkpoint: .*optimizer\.pt is truncated or corrupt",
        setup=checkpoint("truncated-optimizer"),
    ),
    Case(
        "resume-not-steered",
        r"resume_from_checkpoint: .*checkpoint-2 has no steering_state\.pt: it was not saved by a steered run",
        setup=checkpoint("no-steering"),
    ),
    Case(
        "resume-last-checkpoint-truncated",
        r"output_dir: .*checkpoint-3/model\.safetensors is truncated .*LLaMA-Factory resumes the last checkpoint",
        setup=auto_resume,
    ),
    # -- datasteer prepare: the same checks, one line
    Case(
        "prepare-without-targets",
        r"eval_dataset: select/near compares",
        ("eval_dataset=null",),
        example="select_near_prepared.yaml",
        command=("prepare", "near"),
    ),
    Case(
        "prepare-data-malformed",
        r"dataset: 'prose': .*prose\.jsonl line 2 is not valid JSON",
        example="select_tsds.yaml",
        command=("prepare", "tsds"),
        setup=corpus(prose_line(2, "{")),
    ),
    Case(
        "prepare-wrong-kind",
        r"`datasteer prepare near` needs paradigm: select and algorithm: near",
        example="select_tsds.yaml",
        command=("prepare", "near"),
    ),
]


def write_run(ws: Workspace, case: Case) -> tuple[Path, list[str]]:
    extra = case.setup(ws) if case.setup is not None else []
    config = ws.root / "run.yaml"
    if not config.exists():  # a setup may have written its own (bad) config file
        data = yaml.safe_load((EXAMPLES / case.example).read_text())
        for key in case.drop:
            data.pop(key)
        config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config, [f"output_dir={ws.root / 'out'}", *case.overrides, *extra]


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("datasteer: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(
    case: Case, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths in a case resolve here, never in the repository
    ws = Workspace(tmp_path, home)
    config, overrides = write_run(ws, case)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main([*case.command, str(config), *overrides])
    line = one_error_line(capsys.readouterr().err)
    assert code == case.code, line
    assert re.search(case.message, line), line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_the_table_covers_at_least_sixty_bad_inputs() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def test_a_float_written_without_a_dot_is_a_float(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """YAML 1.1 reads ``1e-3`` as a string; LLaMA-Factory's own reader as a float: so does validate."""
    from datasteer.cli import prepare_run
    from datasteer.integrations import llamafactory

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(
        (EXAMPLES / "mix_random.yaml").read_text().replace("learning_rate: 1.0e-3", "learning_rate: 1e-3")
    )
    args, steering = prepare_run(str(config), [f"output_dir={tmp_path / 'out'}"])
    assert args["learning_rate"] == "1e-3"
    parsed = llamafactory.validate(args, steering)
    assert args["learning_rate"] == parsed[2].learning_rate == 1e-3


# --------------------------------------------------------------------------- errors during a run


def test_an_error_raised_on_purpose_during_the_run_is_one_line_exit_1(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A steering error after the run started (a checkpoint from another run, a late plan):
    one line, exit 1, and an output_dir the run created but left empty is removed."""
    from datasteer.integrations import llamafactory

    out = tmp_path / "out"

    def fail(*args: object, **kwargs: object) -> None:
        (out / "logs").mkdir(parents=True)
        raise SteeringStateError("checkpoint steering state has seed=1, this run has 2; resume with the same seed")

    monkeypatch.setattr(llamafactory, "run", fail)
    assert main(["train", str(EXAMPLES / "mix_random.yaml"), f"output_dir={out}"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == "datasteer: error: checkpoint steering state has seed=1, this run has 2; resume with the same seed"
    assert not out.exists()


def test_a_bug_during_the_run_keeps_its_traceback(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datasteer.integrations import llamafactory

    def fail(*args: object, **kwargs: object) -> None:
        raise IndexError("index 100017 is out of bounds")

    monkeypatch.setattr(llamafactory, "run", fail)
    with pytest.raises(IndexError, match="100017"):
        main(["train", str(EXAMPLES / "mix_random.yaml"), f"output_dir={tmp_path / 'out'}"])


def test_a_run_keeps_an_output_dir_with_files_in_it(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from datasteer.integrations import llamafactory

    out = tmp_path / "out"

    def fail(*args: object, **kwargs: object) -> None:
        out.mkdir()
        (out / "steering.jsonl").write_text("{}\n")
        raise SteeringStateError("diverged")

    monkeypatch.setattr(llamafactory, "run", fail)
    assert main(["train", str(EXAMPLES / "mix_random.yaml"), f"output_dir={out}"]) == 1
    assert one_error_line(capsys.readouterr().err) == "datasteer: error: diverged"
    assert (out / "steering.jsonl").is_file()


@pytest.mark.parametrize("steered", [True, False], ids=["steered", "plain"])
def test_a_bad_row_past_the_checked_rows_is_one_line_naming_the_dataset(
    steered: bool,
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A large file is checked on its first rows only; a bad row further down is LLaMA-Factory's
    loader's DatasetGenerationError, which still comes out as one line (before the model loads)."""
    from datasteer import validate

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(validate, "FULL_PARSE_BYTES", 0)
    monkeypatch.setattr(validate, "HEAD_ROWS", 2)
    overrides = Workspace(tmp_path, home).corpus(prose_line(40, '{"text": '))
    if not steered:
        data = yaml.safe_load((EXAMPLES / "mix_random.yaml").read_text())
        data.pop("datasteer")
        config = tmp_path / "plain.yaml"
        config.write_text(yaml.safe_dump(data))
    else:
        config = EXAMPLES / "mix_random.yaml"
    argv = ["train", str(config), f"output_dir={tmp_path / 'out'}", "dataset=prose", *overrides]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "could not be read" in line
    if steered:
        assert line.startswith("datasteer: error: dataset: 'prose' (dataset_dir ")
    assert not (tmp_path / "out").exists()


def test_a_selection_budget_larger_than_the_pool_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """candidates above the pool (or, under a mixer, the largest domain) has a clear meaning
    (score everything, as null does), so it is a warning, not an error: a value that fits one
    pool may exceed a smaller one."""
    from datasteer.integrations.llamafactory_checks import check_pool
    from datasteer.plan import build_plan
    from tests.factories import make_dataset

    pool = make_dataset((40, 24, 16))
    ids = np.repeat(np.arange(3), [40, 24, 16])
    names = ("alpha", "beta", "gamma")
    huge = build_plan({"paradigm": "select", "algorithm": "loss", "params": {"candidates": 10_000_000}})
    with caplog.at_level(logging.WARNING):
        check_pool(huge, {"train_dataset": pool}, ids, names, model_args=None)
    assert "datasteer.params.candidates: 10000000 is more than the pool (80 rows)" in caplog.text
    caplog.clear()
    composed = build_plan(
        {"mix": {"algorithm": "random"}, "select": {"algorithm": "loss", "params": {"candidates": 30}}}
    )
    with caplog.at_level(logging.WARNING):
        check_pool(composed, {"train_dataset": pool}, ids, names, model_args=None)
    assert "datasteer.select.params.candidates: 30 is more than the largest domain (40 rows)" not in caplog.text
    composed = build_plan(
        {"mix": {"algorithm": "random"}, "select": {"algorithm": "loss", "params": {"candidates": 41}}}
    )
    with caplog.at_level(logging.WARNING):
        check_pool(composed, {"train_dataset": pool}, ids, names, model_args=None)
    assert "datasteer.select.params.candidates: 41 is more than the largest domain (40 rows)" in caplog.text


# --------------------------------------------------------------------------- prepared files against the pool

SMALL_POOL = ["max_samples=16", "cutoff_len=32", "dataset=arithmetic,noise", "report_to=none", "max_steps=2"]


@pytest.fixture(scope="module")
def prepared_files(home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real `datasteer prepare near` and `tsds` outputs for a small pool (16 rows per domain)."""
    root = tmp_path_factory.mktemp("prepared")
    out: dict[str, Path] = {}
    for kind, example in (("near", "select_near_prepared.yaml"), ("tsds", "select_tsds.yaml")):
        argv = [str(EXAMPLES / example), f"datasteer.params.prepared={root / kind}", "datasteer.params.neighbours=8"]
        assert main(["prepare", kind, *argv, f"output_dir={root / 'unused'}", *SMALL_POOL]) == 0
        out[kind] = root / kind
    return out


def tamper(source: Path, target: Path, kind: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Path:
    """A copy of a prepared file whose tensor is changed and whose record (fingerprint) is not."""
    shutil.copytree(source, target)
    name = "neighbours" if kind == "near" else "probabilities"
    tensors = load_file(str(target / f"{kind}.safetensors"))
    save_file({name: change(tensors[name])}, str(target / f"{kind}.safetensors"))
    return target


def out_of_range(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, 0] = 100017
    return t


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "change", "extra", "message"),
    [
        ("near", out_of_range, [], r"near\.json's neighbour lists name pool row 100017, the pool has \d+"),
        ("tsds", lambda t: t[:-3], [], r"tsds\.json has \d+ probabilities, the pool has \d+ rows"),
        ("near", None, ["max_samples=15"], r"near\.json was prepared for another pool, targets or model"),
        ("tsds", None, ["eval_dataset=code_eval"], r"tsds\.json was prepared for another pool, targets or model"),
    ],
    ids=["near-tampered-index", "tsds-tampered-length", "near-other-pool", "tsds-other-targets"],
)
def test_a_prepared_file_that_does_not_fit_the_pool_is_one_line_before_the_model_loads(
    kind: str,
    change: Callable[[torch.Tensor], torch.Tensor] | None,
    extra: list[str],
    message: str,
    prepared_files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from llamafactory.train.pt import workflow

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(workflow, "load_model", no_model)
    directory = prepared_files[kind]
    if change is not None:
        directory = tamper(directory, tmp_path / "tampered", kind, change)
    example = "select_near_prepared.yaml" if kind == "near" else "select_tsds.yaml"
    argv = [str(EXAMPLES / example), f"datasteer.params.prepared={directory}", "datasteer.params.neighbours=8"]
    assert main(["train", *argv, f"output_dir={tmp_path / 'out'}", *SMALL_POOL, *extra]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert re.search(message, line), line
    assert line.startswith("datasteer: error: datasteer.params.prepared: ")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- what the checks accept


@pytest.mark.parametrize(
    ("name", "content", "rows"),
    [
        ("rows.jsonl", '{"text": "a"}\n\n{"text": "b", "extra": 1}\n', 2),
        ("array.json", '[\n  {"text": "a"},\n  {"text": "b"}\n]\n', 2),
        ("columns.json", '{\n  "text": ["a", "b", "c"]\n}\n', 3),
        ("one.json", '{"text": "a"}', 1),
        ("table.csv", "text,label\na,1\nb,2\n", 2),
        ("lines.txt", "a\n\nb\n", 2),
    ],
)
def test_the_data_formats_the_loader_reads_pass_the_checks(tmp_path: Path, name: str, content: str, rows: int) -> None:
    """No false alarms: JSON lines, a JSON array (also over several lines), an object of columns,
    csv and plain text are what LLaMA-Factory's loader (the datasets json/csv/text builders) reads."""
    from datasteer.validate import check_data_source

    (tmp_path / name).write_text(content)
    assert check_data_source("dataset", "d", tmp_path / name, columns={"prompt": "text"}) == rows


def test_a_large_file_is_checked_on_its_first_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datasteer import validate
    from datasteer.errors import ConfigError

    monkeypatch.setattr(validate, "FULL_PARSE_BYTES", 10)
    monkeypatch.setattr(validate, "HEAD_ROWS", 2)
    file = tmp_path / "big.jsonl"
    file.write_text('{"text": "a"}\n{"text": "b"}\n{"broken\n')
    assert validate.check_data_source("dataset", "d", file, columns={"prompt": "text"}) == 2
    file.write_text('{"text": "a"}\n{"broken\n')
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        validate.check_data_source("dataset", "d", file, columns={"prompt": "text"})
    (tmp_path / "big.json").write_text('[\n{"text": "a"}\n]\n')  # one large document: the loader's
    assert validate.check_data_source("dataset", "d", tmp_path / "big.json", columns={"prompt": "text"}) == 1
