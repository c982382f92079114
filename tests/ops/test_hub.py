"""Offline by default: every model datasteer loads itself is read locally unless the user opts in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError
from datasteer.ops.embeddings import LocalEncoder
from datasteer.ops.hub import ALLOW_DOWNLOADS
from datasteer.ops.reference import load_reference_model
from datasteer.selectors.nice import NiceParams
from tests.factories import make_model

HUB_ID = "some-org/some-model"


class Asked(Exception):
    """Raised by a stand-in ``from_pretrained`` once it has recorded its arguments."""


@pytest.fixture
def from_pretrained_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Record the arguments of ``AutoModel*`` / ``AutoTokenizer`` ``from_pretrained`` calls (which then load as usual,
    or, for a Hub id, stop with :class:`Asked` instead of reaching the network)."""
    calls: list[tuple[str, dict[str, Any]]] = []
    for auto in (AutoModelForCausalLM, AutoModel, AutoTokenizer):
        real = auto.from_pretrained

        def record(path: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            calls.append((str(path), kwargs))
            if str(path) == HUB_ID:
                raise Asked
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", record)
    monkeypatch.delenv(ALLOW_DOWNLOADS, raising=False)
    return calls


def adapter(folder: Path, base: str) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    return folder


def test_a_reference_model_is_loaded_offline(tmp_path: Path, from_pretrained_calls: list) -> None:
    make_model(seed=1).save_pretrained(tmp_path / "ref")
    load_reference_model(str(tmp_path / "ref"), make_model())
    ((_, kwargs),) = from_pretrained_calls
    assert kwargs["local_files_only"] is True


def test_an_adapters_hub_base_is_refused_with_one_line(tmp_path: Path, from_pretrained_calls: list) -> None:
    folder = adapter(tmp_path / "lora", HUB_ID)
    with pytest.raises(ConfigError) as err:
        load_reference_model(str(folder), make_model())
    message = str(err.value)
    assert "\n" not in message and HUB_ID in message and str(folder) in message and ALLOW_DOWNLOADS in message
    assert from_pretrained_calls == []  # refused before any load


def test_downloads_are_an_opt_in(tmp_path: Path, from_pretrained_calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOW_DOWNLOADS, "1")
    with pytest.raises(Asked):
        load_reference_model(str(adapter(tmp_path / "lora", HUB_ID)), make_model())
    with pytest.raises(Asked):
        LocalEncoder(HUB_ID)
    assert [(path, kwargs["local_files_only"]) for path, kwargs in from_pretrained_calls] == [(HUB_ID, False)] * 2
    assert parse_dataclass(NiceParams, {"policy": HUB_ID}, "p").policy == HUB_ID


def test_nice_models_and_encoders_must_be_local_by_default(from_pretrained_calls: list) -> None:
    for key in ("policy", "reward_model"):
        raw = {key: HUB_ID, **({"reward": "model"} if key == "reward_model" else {})}
        with pytest.raises(
            ConfigError, match=rf"^p\.{key}: '{HUB_ID}' is not a local model directory .*{ALLOW_DOWNLOADS}=1"
        ):
            parse_dataclass(NiceParams, raw, "p")
    with pytest.raises(FileNotFoundError, match=ALLOW_DOWNLOADS):
        LocalEncoder(HUB_ID)
    assert from_pretrained_calls == []
