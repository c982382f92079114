"""The datasteer command: listing, version, and one-line errors (exit 2) for bad configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from datasteer.cli import main

GOOD = {
    "model_name_or_path": "no/such/model",
    "stage": "pt",
    "do_train": True,
    "finetuning_type": "full",
    "dataset": "a,b,c",
    "output_dir": "OUT",
    "max_steps": 3,
    "datasteer": {"paradigm": "mix", "algorithm": "static", "params": {"proportions": [0.5, 0.25, 0.25]}},
}


def write_config(tmp_path: Path, **changes: object) -> Path:
    config = yaml.safe_load(yaml.safe_dump(GOOD))
    config["output_dir"] = str(tmp_path / "out")
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_list_shows_every_first_algorithm_with_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("random", "static", "scheduled", "uniform"):
        assert f"  {name} " in out
    assert "concentration: float = 1.0" in out
    assert "proportions: list[float] | null = None" in out
    assert "schedule: list[tuple[int, list[float]]] = (required)" in out
    headers = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert headers == ["select:", "mix:", "weight:"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from datasteer import __version__

    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"datasteer {__version__}"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"datasteer.update_evry": 3}, "datasteer.update_evry: unknown key (did you mean 'update_every'?)"),
        (
            {"datasteer.algorithm": "statc"},
            "datasteer.algorithm: unknown mix algorithm 'statc' (did you mean 'static'?)",
        ),
        ({"datasteer.params.proportions": [0.5, 0.5]}, "expected 3 proportions (one per domain), got 2"),
        ({"datasteer.params.proportions": [0.5, 0.3, 0.3]}, "proportions must sum to 1"),
        ({"datasteer.update_every": 0}, "datasteer.update_every: must be >= 1"),
        ({"datasteer.params.proportion": [1, 0, 0]}, "datasteer.params.proportion: unknown key"),
        ({"datasteer.paradigm": "mixx"}, "datasteer.paradigm: 'mixx' is not allowed"),
        (
            {"datasteer": {"mix": {"algorithm": "odm"}}, "enable_liger_kernel": True},
            "enable_liger_kernel: its fused loss returns no logits, and mix/odm needs per-sample losses",
        ),
        (
            {
                "datasteer": {
                    "mix": {"algorithm": "random"},
                    "select": {"algorithm": "tsds", "params": {"prepared": "p"}},
                }
            },
            "tsds draws from probabilities prepared over the whole pool",
        ),
        ({"datasteer": {"mix": {"algorithm": "random"}, "paradigm": "mix"}}, "datasteer.paradigm: the staged form"),
    ],
)
def test_bad_config_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, object], message: str
) -> None:
    config = write_config(tmp_path, **changes)
    assert main(["train", str(config)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("datasteer: error: ")
    assert message in lines[0]
    assert not (tmp_path / "out").exists()


def test_override_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert main(["train", str(config), "datasteer.warmup_steps=-1"]) == 2
    assert "datasteer.warmup_steps: must be >= 0" in capsys.readouterr().err
    assert main(["train", str(config), "novalue"]) == 2
    assert "overrides are written key=value" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


@pytest.mark.slow
def test_misspelled_framework_key_is_one_line_from_the_real_command(tmp_path: Path) -> None:
    """The installed command, LLaMA-Factory's own parser behind it: still one line, exit 2."""
    config = write_config(tmp_path, learnig_rate=0.1)
    exe = Path(sys.executable).with_name("datasteer")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(exe), "train", str(config)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("datasteer: error:")]
    assert len(errors) == 1 and "learnig_rate" in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kind", "changes", "message"),
    [
        ("tsds", {}, "`datasteer prepare tsds` needs paradigm: select and algorithm: tsds"),
        ("near", {"datasteer": {"paradigm": "select", "algorithm": "near"}}, "datasteer.params.prepared: set"),
        (
            "tsds",
            {"datasteer": {"paradigm": "select", "algorithm": "tsds"}},
            "datasteer.params.prepared: required key is missing",
        ),
    ],
)
def test_prepare_config_errors_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, changes: dict[str, object], message: str
) -> None:
    config = write_config(tmp_path, **changes)
    assert main(["prepare", kind, str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("datasteer: error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()
