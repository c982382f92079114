"""datasteer plot: a PNG of each paradigm's run record, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from datasteer.cli import main
from datasteer.plot import plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

MIX = [
    {
        "step": 0,
        "paradigm": "mix",
        "algorithm": "doremi",
        "update": 0,
        "first_step": 1,
        "last_step": 5,
        "proportions": {"a": 0.5, "b": 0.5},
        "alpha": {"a": 0.5, "b": 0.5},
        "served": {"a": 0, "b": 0},
    },
    {
        "step": 4,
        "paradigm": "mix",
        "algorithm": "doremi",
        "update": 1,
        "first_step": 6,
        "last_step": 10,
        "proportions": {"a": 0.7, "b": 0.3},
        "alpha": {"a": 0.9, "b": 0.1},
        "excess_loss": {"a": 1.5, "b": "nan"},
        "expert_loads": [[0.5, 0.5]],
        "served": {"a": 5, "b": 5},
    },
]
SELECT = [
    {
        "step": 4,
        "paradigm": "select",
        "algorithm": "less",
        "update": 0,
        "first_step": 6,
        "last_step": 15,
        "selected": 4,
        "unique": 4,
        "digest": "x",
        "domain_counts": {"a": 3, "b": 1},
        "served": {"a": 2, "b": 3},
    },
    {
        "step": 14,
        "paradigm": "select",
        "algorithm": "less",
        "update": 1,
        "first_step": 16,
        "last_step": 20,
        "selected": 4,
        "unique": 4,
        "digest": "y",
        "domain_counts": {"a": 0, "b": 4},
        "served": {"a": 8, "b": 2},
    },
]
WEIGHT = [
    {"step": s, "paradigm": "weight", "algorithm": "loss", "weight_mean": 1.0, "weight_min": 0.5 - s / 10,
     "weight_max": 1.5 + s / 10, "served": {"a": 2}}
    for s in range(1, 4)
]  # fmt: skip


def write_run(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    (out / "steering.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


@pytest.mark.parametrize("records", [MIX, SELECT, WEIGHT], ids=["mix", "select", "weight"])
def test_plot_writes_png_next_to_the_record(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    out = write_run(tmp_path, records)
    path = plot_run(out)
    assert path == out / "steering.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_mix_gets_one_panel_per_statistic(tmp_path: Path) -> None:
    """proportions + alpha + excess_loss; served and the nested expert_loads are no panels."""
    from PIL import Image

    one = write_run(tmp_path, MIX[:1])  # proportions + alpha
    (tmp_path / "two").mkdir()
    two = plot_run(write_run(tmp_path / "two", MIX))
    height_one = Image.open(plot_run(one)).size[1]
    height_two = Image.open(two).size[1]
    assert height_two - height_one == 240  # one more 2.4-inch panel at 100 dpi


def test_cli_plot_to_chosen_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = write_run(tmp_path, SELECT)
    target = tmp_path / "figs" / "sel.png"
    assert main(["plot", str(out), "--output", str(target)]) == 0
    assert target.read_bytes().startswith(PNG_MAGIC)
    assert not (out / "steering.png").exists()
    assert str(target) in capsys.readouterr().out


def test_cli_plot_missing_record_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("datasteer: error:") and "steering.jsonl" in err and "\n" not in err
    assert not (tmp_path / "steering.png").exists()


def test_cli_plot_empty_record_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = write_run(tmp_path, [])
    (out / "steering.jsonl").write_text("\n")
    assert main(["plot", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "empty" in err and "\n" not in err
    assert not (out / "steering.png").exists()


def test_cli_plot_without_matplotlib_is_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = write_run(tmp_path, WEIGHT)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes "import matplotlib..." raise ImportError
    assert main(["plot", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "matplotlib" in err and "datasteer[plot]" in err and "\n" not in err
    assert not (out / "steering.png").exists()
