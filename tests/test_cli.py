"""The datasteer command: listing, version, and one-line errors (exit 2) for bad configs."""

from __future__ import annotations

import json
import os
import shutil
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


# --- datasteer eval


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.test_evaluate import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("tiny-run"))


def table_of(out: str) -> dict[str, list[str]]:
    """The rows of `datasteer eval`'s table by their first column (header included)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["domain", "loss"])
    return {line.split()[0]: line.split()[1:] for line in lines[start:]}


def test_eval_lora_output_on_its_run_eval_sets(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("llamafactory")
    from datasteer.evaluate import evaluate_run, find_model, load_model, load_run_eval_sets, load_tokenizer
    from tests.test_evaluate import QA, response_ids

    report = tmp_path / "eval.json"
    argv = ["eval", str(tiny_run["lora"]), "--config", str(tiny_run["run"]), "eval_dataset=qa_eval"]
    assert main([*argv, "--exact-match", "--max-new-tokens", "8", "--output", str(report)]) == 0
    table = table_of(capsys.readouterr().out)
    assert list(table) == ["domain", "qa_eval", "mean"]
    assert table["domain"] == ["loss", "ppl", "tokens", "accuracy"] and len(table["qa_eval"]) == 4
    scores = json.loads(report.read_text())
    # The same numbers in process: the adapter merged into its base, the sft rows' response tokens only.
    source = find_model(str(tiny_run["lora"]))
    tok = load_tokenizer(source)
    sets = load_run_eval_sets(json.loads(tiny_run["run"].read_text()), tok, with_responses=True)
    expected = evaluate_run(load_model(source), sets, max_new_tokens=8)["qa_eval"]
    assert scores["qa_eval"]["tokens"] == expected.tokens == sum(len(response_ids(tok, r["response"])) for r in QA)
    assert scores["qa_eval"]["loss"] == pytest.approx(expected.loss, rel=1e-5)
    assert table["qa_eval"][0] == f"{expected.loss:.4f}"
    assert expected.accuracy is not None
    assert (scores["qa_eval"]["correct"], scores["qa_eval"]["total"]) == (expected.accuracy.correct, len(QA))


def test_eval_reads_the_run_arguments_saved_in_the_output_dir(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """LLaMA-Factory's web UI saves them as OUTPUT_DIR/training_args.yaml; --corpus still overrides."""
    pytest.importorskip("llamafactory")
    out = tmp_path / "out"
    shutil.copytree(tiny_run["lora"], out)
    shutil.copy(tiny_run["run"], out / "training_args.yaml")
    assert main(["eval", str(out)]) == 0
    assert list(table_of(capsys.readouterr().out)) == ["domain", "qa_eval", "mean"]
    assert main(["eval", str(out), "--corpus", str(tiny_run["data"]), "--domains", "prose"]) == 0
    assert list(table_of(capsys.readouterr().out)) == ["domain", "prose", "mean"]


def test_eval_of_a_run_that_evaluated_each_dataset_apart(
    tiny_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """eval_on_each_dataset: true made LLaMA-Factory hand back a dict of sets (an AttributeError)."""
    pytest.importorskip("llamafactory")
    argv = ["eval", str(tiny_run["lora"]), "--config", str(tiny_run["run"]), "eval_dataset=qa_eval"]
    assert main([*argv, "eval_on_each_dataset=true"]) == 0
    assert list(table_of(capsys.readouterr().out)) == ["domain", "qa_eval", "mean"]


def test_eval_of_a_run_whose_config_names_no_eval_sets_scores_the_corpus(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """datasteer train keeps every run's config; one without eval sets falls back to the corpus."""
    out = tmp_path / "out"
    shutil.copytree(tiny_run["lora"], out)
    config = yaml.safe_load(tiny_run["run"].read_text())
    config.pop("eval_dataset", None)
    config.pop("val_size", None)
    (out / "training_args.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", str(out), "--domains", "prose"]) == 0
    assert list(table_of(capsys.readouterr().out)) == ["domain", "prose", "mean"]


def test_eval_without_a_config_scores_the_corpus_with_equation_accuracy(
    tiny_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", str(tiny_run["lora"]), "--corpus", str(tiny_run["data"]), "--domains", "arithmetic,prose"]
    assert main(argv) == 0
    table = table_of(capsys.readouterr().out)
    assert list(table) == ["domain", "arithmetic", "prose", "mean"]
    assert len(table["arithmetic"]) == 4 and 0.0 <= float(table["arithmetic"][3]) <= 1.0  # accuracy column
    assert len(table["prose"]) == 3 and len(table["mean"]) == 2  # blank accuracy


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{tmp}"], "neither a model (no config.json) nor a LoRA adapter (no adapter_config.json)"),
        (["{tmp}/missing"], "no such directory"),
        (["builtin:nope"], "unknown built-in asset 'nope'"),
        (["{model}", "--exact-match"], "--exact-match scores the responses of a run's sft eval sets"),
        (["{model}", "--config", "{run}", "eval_dataset="], "the run names no eval_dataset"),
        (["{model}", "--config", "{run}", "stage=rm"], "stage: datasteer eval scores stages pt and sft"),
        (["{model}", "--config", "{tmp}/none.yaml"], "no such config file"),
        (["{lora}", "--base-model", "{tmp}/gone"], "its base model"),
        (["{model}", "--config", "{run}", "--corpus", "{tmp}"], "--config and --corpus are two sources"),
    ],
)
def test_eval_errors_are_one_line_exit_2(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    names = {"tmp": str(tmp_path), "model": str(tiny_run["model"]), "run": str(tiny_run["run"])}
    names["lora"] = str(tiny_run["lora"])
    corpus = [] if "--config" in argv else ["--corpus", str(tiny_run["data"])]
    assert main(["eval", *(a.format(**names) for a in argv), *corpus]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("datasteer: error: ") and message in lines[0], lines


@pytest.mark.slow
def test_eval_of_a_trained_lora_run_with_its_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a user: train the LoRA example for 2 steps, then evaluate its output on held-out sft sets."""
    pytest.importorskip("llamafactory")
    monkeypatch.setenv("DATASTEER_HOME", str(tmp_path / "home"))
    config = Path(__file__).resolve().parents[1] / "examples" / "sft_lora_select_random.yaml"
    out = tmp_path / "out"
    assert main(["train", str(config), f"output_dir={out}", "max_steps=2", "report_to=none"]) == 0
    assert (out / "adapter_config.json").is_file()
    capsys.readouterr()
    sets = "eval_dataset=arithmetic_sft_eval,noise_sft_eval"
    argv = ["eval", str(out), "--config", str(config), sets, "max_samples=8", "--exact-match", "--max-new-tokens", "4"]
    assert main(argv) == 0
    table = table_of(capsys.readouterr().out)
    assert list(table) == ["domain", "arithmetic_sft_eval", "noise_sft_eval", "mean"]
    assert all(len(table[d]) == 4 and float(table[d][0]) > 0 for d in ("arithmetic_sft_eval", "noise_sft_eval"))


def test_train_keeps_the_run_config_with_its_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datasteer.cli import write_run_config

    config = tmp_path / "run.yaml"
    config.write_text("stage: pt\nmax_steps: 40\ndatasteer:\n  paradigm: mix\n  algorithm: static\n")
    path = write_run_config(str(config), ["max_steps=7", "datasteer.seed=3"], str(tmp_path / "out"))
    assert path == tmp_path / "out" / "training_args.yaml"
    written = yaml.safe_load(path.read_text())
    assert written == {
        "stage": "pt",
        "max_steps": 7,
        "datasteer": {"paradigm": "mix", "algorithm": "static", "seed": 3},
    }
    monkeypatch.setenv("RANK", "1")  # other ranks of a launch leave it to rank 0
    assert write_run_config(str(config), [], str(tmp_path / "other")) is None
    assert not (tmp_path / "other").exists()
