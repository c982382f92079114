"""Checks of a run's inputs before anything heavy: the files a config names exist and parse.

``datasteer train`` runs these before a model is loaded or anything is written (see
:func:`datasteer.integrations.llamafactory.validate`, which knows LLaMA-Factory's keys
and calls them). Each failed check raises one :class:`ConfigError` whose message names
the key or the file and says how to fix it; the CLI prints it as one line, exit code 2.

The checks read only what is cheap: a data file's rows (up to :data:`FULL_PARSE_BYTES`,
beyond that its first :data:`HEAD_ROWS` rows), a safetensors header and its size, a zip
archive's directory (and CRCs up to :data:`CRC_CHECK_BYTES`), a prepared file's JSON and
tensors. What depends on the tokenised rows (a prepared file against the pool) is checked
once the rows exist, before the model loads (:func:`check_prepared_against_pool`).
"""

from __future__ import annotations

import csv
import json
import os
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from datasteer.errors import ConfigError

#: Data files up to this size are parsed whole; larger ones only their first HEAD_ROWS rows
#: (the loader's own error for a later bad row is still turned into one line naming the dataset).
FULL_PARSE_BYTES = 64 << 20
HEAD_ROWS = 1000
#: Zip archives (``torch.save`` files) up to this size have their CRCs checked, not only their directory.
CRC_CHECK_BYTES = 1 << 30
#: LLaMA-Factory's file types by extension (``llamafactory.extras.constants.FILEEXT2TYPE``).
DATA_FILE_TYPES = {"arrow": "arrow", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet", "txt": "text"}
#: Files of which a model folder holds at least one when it has a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
#: Files whose presence makes a checkpoint folder hold model weights (full, sharded or an adapter).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


# --------------------------------------------------------------------------- models


def offline() -> bool:
    """Whether the Hugging Face hub may not be reached (then a model must be on disk)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def check_model(
    key: str, path: str, *, cache_dir: str | None = None, weights: bool = False, tokenizer: bool = False
) -> dict[str, Any] | None:
    """The ``config.json`` (or ``adapter_config.json``) of the model at ``path``, as a dict.

    ``path`` is a local directory, or a hub id found in the local Hugging Face cache when
    offline. Online, a hub id that is not cached is not checked (returns None).

    Args:
        key: the config key that names the model.
        path: its directory or hub id.
        cache_dir: the Hugging Face cache to look a hub id up in.
        weights: a local directory must hold weights (safetensors headers checked against
            their files' sizes).
        tokenizer: a local directory must hold tokenizer files.

    Raises:
        ConfigError: the directory holds no saved model (or lacks what is asked for), or an
            offline hub id is not cached.
    """
    folder = Path(path).expanduser()
    if folder.is_dir():
        found = [folder / n for n in ("config.json", "adapter_config.json") if (folder / n).is_file()]
        if not found:
            raise ConfigError(f"{key}: {path} holds no saved model (no config.json or adapter_config.json)")
        config = _read_json_config(key, found[0])
        names = {p.name for p in folder.iterdir() if p.is_file()}
        if weights:
            stored = sorted(n for n in names if n.endswith((".safetensors", ".bin")) and n != "training_args.bin")
            if not stored:
                raise ConfigError(f"{key}: {path} holds no weights (*.safetensors or *.bin); save the model again")
            for name in stored:
                if name.endswith(".safetensors"):
                    check_safetensors(key, folder / name)
        if tokenizer and not names & set(TOKENIZER_FILES):
            raise ConfigError(
                f"{key}: {path} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...); save the tokenizer with the model"
            )
        return config
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or folder.exists()
    if not looks_local:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json", cache_dir=cache_dir)
        if isinstance(cached, str):
            return _read_json_config(key, Path(cached))
        if not offline():
            return None
    raise ConfigError(
        f"{key}: {path} is not a local model directory"
        + ("" if looks_local else " nor a model in the Hugging Face cache (HF_HUB_OFFLINE=1)")
        + "; give the path of a saved model (e.g. builtin:tiny-llama)"
    )


def _read_json_config(key: str, file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: {file} is not valid JSON ({first_line(err)}); save the model again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {file} is not a JSON object; save the model again")
    return data


def vocab_size(key: str, config: Mapping[str, Any], cache_dir: str | None = None) -> int | None:
    """The vocabulary size of a model config (an adapter's: its base model's), if known."""
    if "base_model_name_or_path" in config and "vocab_size" not in config:
        base = check_model(
            f"{key} (its base_model_name_or_path)", str(config["base_model_name_or_path"]), cache_dir=cache_dir
        )
        return vocab_size(key, base, cache_dir) if base is not None else None
    value = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
    return int(value) if isinstance(value, int) else None


# --------------------------------------------------------------------------- binary files


def check_safetensors(key: str, file: Path) -> dict[str, Any]:
    """The header of a safetensors file, checked against the file's size (a truncated or
    extended file fails here, not when it is loaded).

    Raises:
        ConfigError: the file is shorter or longer than its header says, or the header is not JSON.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if length < 0 or length > size - 8:
            raise ConfigError(f"{key}: {file} is truncated ({size} bytes, no complete safetensors header)")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise ConfigError(f"{key}: {file} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{key}: {file} is not a safetensors file (its header is not a JSON object)")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        state = "truncated" if size < expected else "longer than its header says"
        raise ConfigError(f"{key}: {file} is {state} ({size} bytes, its header says {expected})")
    return header


def check_torch_file(key: str, file: Path) -> None:
    """A ``torch.save`` file (a zip archive) that opens, and whose CRCs match when small enough.

    Files in the legacy (non-zip) format are not checked.
    """
    with open(file, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip() if file.stat().st_size <= CRC_CHECK_BYTES else None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ConfigError(f"{key}: {file} is truncated or corrupt ({first_line(err)})") from None
    if bad is not None:
        raise ConfigError(f"{key}: {file} is corrupt (member {bad} fails its CRC check)")


def check_checkpoint(key: str, path: str, *, state_file: str | None, fix: str | None = None) -> None:
    """A checkpoint folder a run resumes from: complete, and readable.

    Args:
        key: the config key that names it.
        path: the ``checkpoint-N`` folder.
        state_file: a file a steered run's checkpoint must hold (None: not steered).
        fix: what to do about a bad checkpoint (default: name another, or start afresh).
    """
    folder = Path(path)
    fix = fix or "give a complete checkpoint-N folder of an earlier run, or remove the key to start afresh"
    if not folder.is_dir():
        raise ConfigError(f"{key}: {path} does not exist; {fix}")
    state = folder / "trainer_state.json"
    try:
        trainer_state = json.loads(state.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{key}: {path} has no trainer_state.json, so it is not a complete checkpoint; {fix}"
        ) from None
    except ValueError as err:
        raise ConfigError(f"{key}: {state} is not valid JSON ({first_line(err)}); {fix}") from None
    if not isinstance(trainer_state, dict) or not isinstance(trainer_state.get("global_step"), int):
        raise ConfigError(f"{key}: {state} has no global_step; {fix}")
    names = {p.name for p in folder.iterdir()}
    sharded = any(n.startswith("model-0") and n.endswith(".safetensors") for n in names)
    engine = any(n.startswith(("global_step", "pytorch_model_fsdp")) for n in names)
    if not (names & set(WEIGHT_FILES)) and not sharded and not engine:
        raise ConfigError(f"{key}: {path} holds no model weights ({', '.join(WEIGHT_FILES[:1])} or similar); {fix}")
    if state_file is not None and state_file not in names:
        raise ConfigError(
            f"{key}: {path} has no {state_file}: it was not saved by a steered run; resume it without the "
            "datasteer: block, or start afresh"
        )
    for file in sorted(folder.iterdir()):
        try:
            if file.suffix == ".safetensors":
                check_safetensors(key, file)
            elif file.suffix in (".pt", ".pth", ".bin"):
                check_torch_file(key, file)
        except ConfigError as err:
            raise ConfigError(f"{err}; {fix}") from None


# --------------------------------------------------------------------------- data files


def check_data_source(
    key: str,
    name: str,
    path: Path,
    *,
    columns: Mapping[str, str],
    message_tags: tuple[str, str] | None = None,
) -> int:
    """A dataset's file (or folder of files) exists, parses, has rows and the named columns.

    Args:
        key: the config key that lists the dataset (``dataset`` or ``eval_dataset``).
        name: the dataset's name in ``dataset_info.json``.
        path: its file or folder.
        columns: role -> column name the converter reads (e.g. ``{"prompt": "text"}``).
        message_tags: (role tag, content tag) each message of the ``messages`` column holds.

    Returns:
        The number of rows seen (all of them, unless a file is larger than FULL_PARSE_BYTES).
    """
    where = f"{key}: '{name}'"
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        if not files:
            raise ConfigError(f"{where}: the folder {path} holds no data files")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"{where}: {path} does not exist (file_name in dataset_info.json); create it or fix the name")
    kinds = {DATA_FILE_TYPES.get(f.suffix.lstrip(".").lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if f.suffix.lstrip(".").lower() not in DATA_FILE_TYPES)
        raise ConfigError(f"{where}: {bad} has an unsupported type; allowed: {', '.join(sorted(DATA_FILE_TYPES))}")
    if len(kinds) > 1:
        raise ConfigError(f"{where}: {path} mixes file types ({', '.join(sorted(str(k) for k in kinds))}); use one")
    rows = 0
    for file in files:
        seen, found = _read_columns(where, file)
        if seen == 0:
            raise ConfigError(f"{where}: {file} has no rows; add data or remove the dataset")
        rows += seen
        if found is None:
            continue
        missing = [(role, col) for role, col in columns.items() if col not in found]
        if missing:
            role, col = missing[0]
            have = ", ".join(sorted(found)) or "(none)"
            raise ConfigError(
                f"{where}: {file} has no column {col!r} (dataset_info.json columns.{role}); its rows have: {have}"
            )
        if message_tags is not None and "messages" in columns:
            _check_messages(where, file, columns["messages"], message_tags)
    return rows


def _read_columns(where: str, file: Path) -> tuple[int, set[str] | None]:
    """(rows, column names) of one data file (None: not read here, left to the loader);
    ConfigError naming the file when it does not parse."""
    kind = DATA_FILE_TYPES[file.suffix.lstrip(".").lower()]
    if file.stat().st_size == 0:
        raise ConfigError(f"{where}: {file} is empty; add rows or remove the dataset")
    if kind == "json":
        return _json_columns(where, file)
    if kind == "csv":
        with open(file, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            return sum(1 for _ in reader), set(header)
    if kind == "text":
        with open(file, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if line.strip()), {"text"}
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.read_metadata(file)
        except Exception as err:  # pyarrow raises its own error types for a bad file
            raise ConfigError(f"{where}: {file} is not a readable parquet file ({first_line(err)})") from None
        return meta.num_rows, set(meta.schema.names)
    return 1, None  # arrow: left to the loader


def _json_columns(where: str, file: Path) -> tuple[int, set[str] | None]:
    """(rows, columns) of a .json / .jsonl file, read as the datasets loader reads it: JSON
    lines first (one object per line), else one JSON document (``pandas.read_json``: an array
    of objects or of texts, or an object of columns). A file larger than FULL_PARSE_BYTES is
    read on its first HEAD_ROWS lines (and a large document is left to the loader: None)."""
    size = file.stat().st_size
    limit = None if size <= FULL_PARSE_BYTES else HEAD_ROWS
    count, found, error = 0, set[str](), ""
    with open(file, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                error = f"line {number} is not valid JSON ({first_line(err)}); fix or remove that line"
                break
            if not isinstance(row, dict):
                error = f"line {number} is not a JSON object ({_article(row)})"
                break
            count += 1
            found.update(row)
            if limit is not None and count >= limit:
                break
    if not error:
        return count, found
    if count:  # JSON lines with a bad line (a document's first line is never a whole object)
        raise ConfigError(f"{where}: {file} {error}")
    if size > FULL_PARSE_BYTES:
        return 1, None
    try:
        document = json.loads(file.read_text(encoding="utf-8", errors="replace"))
    except ValueError:
        raise ConfigError(f"{where}: {file} {error}") from None
    if isinstance(document, list):
        if all(isinstance(item, dict) for item in document):
            return len(document), {key for item in document for key in item}
        if not any(isinstance(item, dict | list) for item in document):
            return len(document), {"text"}  # what the loader names a column of plain values
        i, item = next((i, item) for i, item in enumerate(document) if not isinstance(item, dict))
        raise ConfigError(f"{where}: {file} item {i} is not a JSON object ({_article(item)})")
    if isinstance(document, dict) and document and all(isinstance(v, list | dict) for v in document.values()):
        return max(len(v) for v in document.values()), set(document)
    raise ConfigError(f"{where}: {file} {error}")


def _json_head(file: Path) -> list[dict[str, Any]]:
    """The first HEAD_ROWS objects of a JSON lines file, or of a JSON array (small files)."""
    rows: list[dict[str, Any]] = []
    with open(file, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:
                break
            if isinstance(row, dict):
                rows.append(row)
            if len(rows) >= HEAD_ROWS:
                return rows
    if not rows and file.stat().st_size <= FULL_PARSE_BYTES:
        try:
            document = json.loads(file.read_text(encoding="utf-8", errors="replace"))
        except ValueError:
            return []
        if isinstance(document, list):
            rows = [item for item in document[:HEAD_ROWS] if isinstance(item, dict)]
    return rows


def _check_messages(where: str, file: Path, column: str, tags: tuple[str, str]) -> None:
    """The first rows' messages are lists of objects holding the role and content tags."""
    if DATA_FILE_TYPES[file.suffix.lstrip(".").lower()] != "json":
        return
    for i, row in enumerate(_json_head(file)):
        messages = row.get(column)
        if messages is None:
            continue
        if not isinstance(messages, list):
            raise ConfigError(f"{where}: {file} row {i + 1}: column {column!r} is not a list of messages")
        for message in messages:
            missing = [t for t in tags if not isinstance(message, dict) or t not in message]
            if missing:
                raise ConfigError(
                    f"{where}: {file} row {i + 1}: a message has no {missing[0]!r} key (dataset_info.json tags)"
                )


# --------------------------------------------------------------------------- prepared selection files


def check_prepared_file(key: str, directory: str, kind: str, settings: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """A directory written by ``datasteer prepare KIND``: complete, of this kind and these settings.

    Returns its tensors (checked for shape and values; their range against the pool is
    :func:`check_prepared_against_pool`'s job).
    """
    from safetensors.torch import load_file

    fix = f"run `datasteer prepare {kind} CONFIG` with this run's config"
    root = Path(directory)
    meta, data = root / f"{kind}.json", root / f"{kind}.safetensors"
    if not meta.is_file():
        raise ConfigError(f"{key}: no prepared {kind} file at {meta}; {fix}")
    try:
        record = json.loads(meta.read_text())
    except ValueError as err:
        raise ConfigError(f"{key}: {meta} is not valid JSON ({first_line(err)}); {fix}") from None
    if not isinstance(record, dict) or record.get("kind") != kind or not isinstance(record.get("fingerprint"), str):
        raise ConfigError(f"{key}: {meta} is not a prepared {kind} file; {fix}")
    if not data.is_file():
        raise ConfigError(f"{key}: {data} is missing; {fix}")
    made: dict[str, Any] = record["settings"] if isinstance(record.get("settings"), dict) else {}
    for name, value in settings.items():
        if made.get(name) != value:
            raise ConfigError(
                f"{key.rsplit('.', 1)[0]}.{name}: {meta} was prepared with {name}={made.get(name)!r}, "
                f"the config says {value!r}; {fix}"
            )
    try:
        check_safetensors(key, data)
    except ConfigError as err:
        raise ConfigError(f"{err}; {fix}") from None
    try:
        tensors = load_file(str(data))
    except Exception as err:  # safetensors raises its own error type
        raise ConfigError(f"{key}: {data} cannot be read ({first_line(err)}); {fix}") from None
    name = {"near": "neighbours", "tsds": "probabilities"}[kind]
    tensor = tensors.get(name)
    if tensor is None:
        raise ConfigError(f"{key}: {data} holds no {name!r} tensor; {fix}")
    if kind == "near":
        if tensor.ndim != 2 or tensor.is_floating_point() or tensor.numel() == 0 or int(tensor.min()) < -1:
            raise ConfigError(f"{key}: {data} holds no valid neighbour lists (shape {tuple(tensor.shape)}); {fix}")
    else:
        p = tensor.double()
        if p.ndim != 1 or not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or float(p.sum()) <= 0:
            raise ConfigError(f"{key}: {data} holds no valid probabilities (finite, >= 0, with a positive sum); {fix}")
    return tensors


def check_prepared_against_pool(
    key: str, directory: str, kind: str, tensors: Mapping[str, torch.Tensor], pool_size: int, fingerprint: str | None
) -> None:
    """A prepared file fits the run's pool: its indices or length, and (when given) its fingerprint."""
    fix = f"run `datasteer prepare {kind} CONFIG` with this run's config"
    meta = Path(directory) / f"{kind}.json"
    if fingerprint is not None:
        made = json.loads(meta.read_text()).get("fingerprint")
        if made != fingerprint:
            raise ConfigError(
                f"{key}: {meta} was prepared for another pool, targets or model "
                f"(fingerprint {str(made)[:12]}, this run {fingerprint[:12]}); {fix}"
            )
    if kind == "near":
        top = int(tensors["neighbours"].max())
        if top >= pool_size:
            raise ConfigError(f"{key}: {meta}'s neighbour lists name pool row {top}, the pool has {pool_size}; {fix}")
    elif tuple(tensors["probabilities"].shape) != (pool_size,):
        shape = tuple(tensors["probabilities"].shape)
        raise ConfigError(f"{key}: {meta} has {shape[0]} probabilities, the pool has {pool_size} rows; {fix}")


def _article(value: object) -> str:
    name = {"list": "list", "int": "int", "str": "string", "float": "number", "bool": "boolean"}.get(
        type(value).__name__, type(value).__name__
    )
    if value is None:
        return "null"
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
