"""LLaMA-Factory drop-in: `datasteer train` on the built-in corpus and tiny model, in process."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.factories import steering_records, without_seconds

from datasteer.cli import main
from datasteer.hf import STATE_FILE

pytest.importorskip("llamafactory")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
QUICK = ["max_steps=6", "logging_steps=2", "save_steps=3", "report_to=none", "per_device_train_batch_size=4"]


@pytest.fixture(scope="module", autouse=True)
def assets_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Built-in corpus and tiny model in a private home, built once for the module."""
    home = tmp_path_factory.mktemp("datasteer-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("DATASTEER_HOME", str(home))
    yield
    patch.undo()


def train(config: Path | str, out: Path, *extra: str) -> None:
    assert main(["train", str(config), f"output_dir={out}", *QUICK, *extra]) == 0


def test_pt_full_mixing_trains_only_the_domains_it_is_told(tmp_path: Path) -> None:
    schedule = "datasteer.params.schedule=[[0,[0.0,0.0,1.0,0.0]]]"
    train(EXAMPLES / "mix_scheduled.yaml", tmp_path, schedule)
    records = steering_records(tmp_path / "steering.jsonl")
    assert [r["first_step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["proportions"] == {"prose": 0.0, "code": 0.0, "arithmetic": 1.0, "noise": 0.0} for r in records)
    served = {k: sum(r["served"][k] for r in records) for k in records[0]["served"]}
    assert served == {"prose": 0, "code": 0, "arithmetic": 4 * 4, "noise": 0}  # steps 1-4 reported
    assert (tmp_path / "checkpoint-3" / STATE_FILE).is_file()
    assert (tmp_path / "model.safetensors").is_file()
    # The trained model can be scored per domain on the held-out splits.
    report = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path), "--domains", "arithmetic,noise", "--output", str(report)]) == 0
    scores = json.loads(report.read_text())
    assert set(scores) == {"arithmetic", "noise"}
    assert all(v["loss"] > 0 and v["tokens"] > 0 for v in scores.values())


@pytest.mark.slow
def test_sft_lora_selection(tmp_path: Path) -> None:
    train(EXAMPLES / "sft_lora_select_random.yaml", tmp_path, "datasteer.warmup_steps=1", "datasteer.update_every=2")
    records = steering_records(tmp_path / "steering.jsonl")
    assert [(r["first_step"], r["last_step"], r["selected"]) for r in records] == [(2, 3, 8), (4, 5, 8), (6, 6, 4)]
    assert set(records[0]["domain_counts"]) == {"prose_sft", "code_sft", "arithmetic_sft", "noise_sft"}
    assert (tmp_path / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_sft_freeze_weighting(tmp_path: Path) -> None:
    train(
        EXAMPLES / "weight_uniform.yaml",
        tmp_path,
        "stage=sft",
        "finetuning_type=freeze",
        "freeze_trainable_layers=1",
        "template=default",
        "dataset=arithmetic_sft,code_sft",
    )
    records = steering_records(tmp_path / "steering.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["weight_mean"] == r["weight_min"] == r["weight_max"] == 1.0 for r in records)


@pytest.mark.slow
def test_without_a_datasteer_block_it_is_plain_llamafactory(tmp_path: Path) -> None:
    config = yaml.safe_load((EXAMPLES / "mix_static.yaml").read_text())
    del config["datasteer"]
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(config))
    train(path, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "steering.jsonl").exists()
    assert not (tmp_path / "out" / "checkpoint-3" / STATE_FILE).exists()


@pytest.mark.slow
def check_resume_after_a_kill(tmp_path: Path, config: Path, steps: list[str]) -> list[dict]:
    """Train ``config`` uninterrupted, then as a run killed after checkpoint-3 (everything later
    lost except the event records, which, as after a crash, run past the checkpoint) and
    resumed: the records and the final weights must be the same. Returns the records."""
    train(config, tmp_path / "full", *steps)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    for folder in ("checkpoint-6", "checkpoint-9"):
        shutil.rmtree(part / folder)
    for name in ("model.safetensors", "trainer_state.json", "all_results.json", "train_results.json"):
        (part / name).unlink(missing_ok=True)
    assert max(r["step"] for r in steering_records(part / "steering.jsonl")) > 3
    resume = [f"resume_from_checkpoint={part / 'checkpoint-3'}", "overwrite_output_dir=false"]
    train(config, part, *steps, *resume)
    full = steering_records(tmp_path / "full" / "steering.jsonl")
    assert without_seconds(steering_records(part / "steering.jsonl")) == without_seconds(full)
    # Same data order after the resume (the stream's positions were restored), hence the
    # same final weights.
    full_weights = load_file(tmp_path / "full" / "model.safetensors")
    part_weights = load_file(part / "model.safetensors")
    for name, tensor in full_weights.items():
        torch.testing.assert_close(part_weights[name], tensor, rtol=1e-5, atol=1e-6)
    return full


@pytest.mark.slow
def test_resume_through_llamafactory_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    records = check_resume_after_a_kill(
        tmp_path, EXAMPLES / "mix_random.yaml", ["datasteer.update_every=2", "max_steps=9"]
    )
    assert max(r["step"] for r in records) > 3


@pytest.mark.slow
def test_the_streaming_example_resumes_after_a_kill_as_if_uninterrupted(tmp_path: Path) -> None:
    """Four domains read as streams (LLaMA-Factory's streaming: true): the stream positions
    saved at checkpoint-3 put every stream back where it was."""
    records = check_resume_after_a_kill(
        tmp_path, EXAMPLES / "mix_odm_streaming.yaml", ["max_steps=9", "save_steps=3", "logging_steps=1"]
    )
    assert len({tuple(r["proportions"].values()) for r in records if "proportions" in r}) > 1
    state = torch.load(tmp_path / "full" / "checkpoint-3" / STATE_FILE, weights_only=False)
    sampler = state["sampler"]
    assert int(sampler["stream_positions"].sum()) == 3 * sampler["global_batch"]  # rows read from the streams by step 3


@pytest.mark.slow
def test_the_streaming_selection_example_resumes_after_a_kill_as_if_uninterrupted(tmp_path: Path) -> None:
    """ODM + loss selection from candidate windows of four streams: checkpoint-3 holds the
    stream positions after the windows and the selection in force, and the resumed run
    (data loader workers forked after the windows were read) trains the same rows."""
    overrides = ["max_steps=9", "save_steps=3", "logging_steps=1"]
    schedule = ["datasteer.select.warmup_steps=1", "datasteer.select.update_every=3"]
    records = check_resume_after_a_kill(
        tmp_path, EXAMPLES / "compose_odm_select_loss_streaming.yaml", [*overrides, *schedule]
    )
    selections = [r for r in records if r["paradigm"] == "select"]
    assert [r["first_step"] for r in selections] == [2, 5, 8]
    for before, after in itertools.pairwise(selections):  # each window starts where the last ended
        assert after["window_start"] == {
            n: before["window_start"][n] + before["window_rows"][n] for n in before["window_start"]
        }
    state = torch.load(tmp_path / "full" / "checkpoint-3" / STATE_FILE, weights_only=False)
    ends = {n: s + selections[0]["window_rows"][n] for n, s in selections[0]["window_start"].items()}
    # (a domain whose share grew after the selection also takes its stream's next rows)
    assert all(p >= e for p, e in zip(state["sampler"]["stream_positions"].tolist(), ends.values(), strict=True))


@pytest.mark.slow
def test_less_on_the_builtin_corpus_favours_the_targets_domain(tmp_path: Path) -> None:
    """Targets drawn from one domain (held-out arithmetic): LESS selects a clearly larger
    share of that domain than its share of the pool."""
    train(EXAMPLES / "select_less.yaml", tmp_path, "max_steps=7", "datasteer.params.candidates=256")
    (record,) = steering_records(tmp_path / "steering.jsonl")
    pool_share = 814 / 5887  # arithmetic rows / all rows of the packed pre-training pool
    share = record["domain_counts"]["arithmetic"] / record["selected"]
    assert share > 3 * pool_share, record["domain_counts"]


@pytest.mark.slow
def test_doremi_workflow_runs_its_three_steps(tmp_path: Path) -> None:
    """Step 1 trains the reference, step 2 the proxy against it (writing the averaged domain
    weights), step 3 trains on those weights: the examples' commands, with fewer steps."""
    ref, proxy, main_run = tmp_path / "reference", tmp_path / "proxy", tmp_path / "main"
    train(EXAMPLES / "mix_doremi_1_reference.yaml", ref)
    train(EXAMPLES / "mix_doremi_2_proxy.yaml", proxy, f"datasteer.params.reference_model={ref}")
    weights = json.loads((proxy / "domain_weights.json").read_text())
    assert weights["domains"] == ["prose", "code", "arithmetic", "noise"] and weights["step"] == 6
    assert sum(weights["proportions"]) == pytest.approx(1.0)
    assert weights["proportions"] != pytest.approx([0.25] * 4)
    records = steering_records(proxy / "steering.jsonl")
    assert all(set(r["alpha"]) == set(weights["domains"]) for r in records)
    train(
        EXAMPLES / "mix_doremi_3_main.yaml",
        main_run,
        f"datasteer.params.proportions_file={proxy / 'domain_weights.json'}",
    )
    (record,) = steering_records(main_run / "steering.jsonl")
    assert list(record["proportions"].values()) == pytest.approx(weights["proportions"], abs=1e-8)


@pytest.mark.slow
def test_rho_loss_workflow_runs_its_two_steps(tmp_path: Path) -> None:
    """Step 1 trains the irreducible-loss model on the held-out splits (a plain run), step 2
    selects by reducible loss against it: the examples' commands, with fewer steps."""
    il, main_run = tmp_path / "irreducible", tmp_path / "main"
    train(EXAMPLES / "select_rho_loss_1_irreducible.yaml", il)
    assert (il / "config.json").is_file() and not (il / "steering.jsonl").exists()
    train(EXAMPLES / "select_rho_loss_2_main.yaml", main_run, f"datasteer.params.reference_model={il}")
    records = steering_records(main_run / "steering.jsonl")
    assert [(r["first_step"], r["last_step"]) for r in records] == [(s, s) for s in range(1, 7)]
    assert all(r["selected"] == r["unique"] == 4 and r["nonfinite"] == 0 for r in records)  # batch 4 of 40
    assert records[0]["irreducible_computed"] == 40  # a new pass over the pool: all new candidates
    assert sum(r["irreducible_computed"] for r in records) == 6 * 40


def test_one_run_builds_each_algorithm_once_and_parses_llamafactory_args_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamafactory import hparams
    from llamafactory.train import tuner

    from datasteer.registry import Registry

    built: list[str] = []
    parsed: list[int] = []
    original_build, original_parse = Registry.build, hparams.get_train_args

    def counting_build(self: Registry, name: str, params: object) -> object:
        built.append(f"{self.paradigm}/{name}")
        return original_build(self, name, params)

    def counting_parse(*args: object, **kwargs: object) -> object:
        parsed.append(1)
        return original_parse(*args, **kwargs)

    monkeypatch.setattr(Registry, "build", counting_build)
    monkeypatch.setattr(hparams, "get_train_args", counting_parse)
    monkeypatch.setattr(tuner, "get_train_args", counting_parse)
    train(EXAMPLES / "compose_odm_select_loss.yaml", tmp_path, "max_steps=2", "save_steps=10")
    assert sorted(built) == ["mix/odm", "select/loss"]
    assert len(parsed) == 1
    records = steering_records(tmp_path / "steering.jsonl")
    assert {r["paradigm"] for r in records} == {"mix"}  # the selection starts after step 5


@pytest.mark.slow
def test_composed_run_resumes_exactly_after_a_kill(tmp_path: Path) -> None:
    """mix/odm + select/loss, killed after checkpoint-3 and resumed: the same records and
    final weights as an uninterrupted run."""
    steps = ["max_steps=9", "datasteer.select.warmup_steps=1", "datasteer.select.update_every=3"]
    steps += ["datasteer.select.params.candidates=32"]
    records = check_resume_after_a_kill(tmp_path, EXAMPLES / "compose_odm_select_loss.yaml", steps)
    assert {r["paradigm"] for r in records} == {"mix", "select"}
