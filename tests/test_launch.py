"""``datasteer train --nproc N`` (and LLaMA-Factory's FORCE_TORCHRUN) start workers through torchrun."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from datasteer.cli import main
from datasteer.errors import ConfigError
from datasteer.launch import LaunchSettings, free_port, in_worker, launch_settings, torchrun_command

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def no_gpus(monkeypatch: pytest.MonkeyPatch, devices: int = 0) -> None:
    monkeypatch.setattr("datasteer.launch._cuda_devices", lambda: devices)


def test_one_process_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    no_gpus(monkeypatch)
    assert launch_settings(environ={}) is None
    assert launch_settings(environ={"NPROC_PER_NODE": "4"}) is None  # without FORCE_TORCHRUN, as llamafactory-cli


def test_flags_and_llamafactory_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    no_gpus(monkeypatch)
    assert launch_settings(nproc=2, environ={}) == LaunchSettings(nproc=2)
    env = {
        "FORCE_TORCHRUN": "1",
        "NPROC_PER_NODE": "3",
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    assert launch_settings(environ=env) == LaunchSettings(3, 2, 1, "10.0.0.1", 29500)
    assert launch_settings(nproc=2, node_rank=0, environ=env) == LaunchSettings(2, 2, 0, "10.0.0.1", 29500)  # flags win
    assert launch_settings(environ={"FORCE_TORCHRUN": "true"}) == LaunchSettings(nproc=1)


def test_a_multi_gpu_machine_starts_one_worker_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    no_gpus(monkeypatch, devices=4)
    assert launch_settings(environ={}) == LaunchSettings(nproc=4)


def test_a_worker_never_launches_again(monkeypatch: pytest.MonkeyPatch) -> None:
    no_gpus(monkeypatch, devices=4)
    worker = {"LOCAL_RANK": "0", "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}
    assert in_worker(worker) and launch_settings(environ=worker) is None
    with pytest.raises(ConfigError, match="already a launched worker"):
        launch_settings(nproc=2, environ=worker)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nproc": 0}, "--nproc"),
        ({"nproc": 1, "nnodes": 2, "node_rank": 2, "master_port": 1}, "--node-rank"),
        ({"nproc": 1, "nnodes": 2}, "--master-port"),
    ],
)
def test_impossible_launches_are_refused(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LaunchSettings(**kwargs)


def test_the_torchrun_command() -> None:
    cmd = torchrun_command(LaunchSettings(2, 2, 1, "node0", 29500), ["run.yaml", "a=1"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:] == [
        "--nnodes=2",
        "--node-rank=1",
        "--nproc-per-node=2",
        "--master-addr=node0",
        "--master-port=29500",
        "-m",
        "datasteer",
        "train",
        "run.yaml",
        "a=1",
    ]


def test_a_bad_config_is_one_line_before_any_worker_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started: list[object] = []
    monkeypatch.setattr("datasteer.launch.launch", lambda *a: started.append(a) or 0)
    code = main(["train", str(EXAMPLES / "mix_static.yaml"), "--nproc", "2", "datasteer.update_evry=3"])
    assert code == 2 and not started
    assert "update_evry" in capsys.readouterr().err


def test_overrides_may_follow_the_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started: list[tuple[LaunchSettings, list[str]]] = []
    monkeypatch.setattr("datasteer.launch.launch", lambda s, a: started.append((s, list(a))) or 0)
    config = str(EXAMPLES / "mix_static.yaml")
    out = f"output_dir={tmp_path / 'out'}"
    assert main(["train", config, "--nproc", "2", "max_steps=3", out]) == 0
    assert started == [(LaunchSettings(nproc=2), [config, "max_steps=3", out])]


TRACE = textwrap.dedent(
    """
    # Test-only: record the pool indices of every micro-batch each process collates.
    import json, os
    if os.environ.get("DATASTEER_TEST_TRACE"):
        from datasteer.integrations import hf
        collate = hf.IndexCollator.__call__
        def traced(self, features):
            batch = collate(self, features)
            path = os.environ["DATASTEER_TEST_TRACE"] + ".rank" + os.environ.get("RANK", "0")
            with open(path, "a") as f:
                f.write(json.dumps(batch[hf.INDEX_KEY].tolist()) + "\\n")
            from transformers.integrations import is_deepspeed_zero3_enabled
            with open(path + ".zero3", "w") as f:
                f.write(str(is_deepspeed_zero3_enabled()))
            return batch
        hf.IndexCollator.__call__ = traced
    """
)


DATASTEER = [sys.executable, "-m", "datasteer", "train"]
BIN = Path(sys.executable).parent


def environment(tmp_path: Path, name: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """Offline, one thread per process, and the trace of collated batches written to ``tmp_path/name.rank<r>``."""
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(TRACE)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "DATASTEER_TEST_TRACE": str(tmp_path / name),
        **(env or {}),
    }


def command(tmp_path: Path, name: str, example: str, *args: str, launcher: list[str] = DATASTEER) -> list[str]:
    cmd = [*launcher, str(EXAMPLES / example), *args]
    return [*cmd, f"output_dir={tmp_path / name}", "max_steps=4", "save_steps=100", "logging_steps=1"]


def finished(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    return proc


def train(
    tmp_path: Path,
    name: str,
    example: str,
    *args: str,
    env: dict[str, str] | None = None,
    launcher: list[str] = DATASTEER,
) -> subprocess.CompletedProcess[str]:
    cmd = command(tmp_path, name, example, *args, launcher=launcher)
    environ = environment(tmp_path, name, env)
    return finished(subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=600))


def steps(tmp_path: Path, name: str, rank: int, max_steps: int = 4) -> list[list[int]]:
    """The micro-batches of the first ``max_steps`` steps (one per step and rank here)."""
    lines = (tmp_path / f"{name}.rank{rank}").read_text().splitlines()
    return [json.loads(line) for line in lines[:max_steps]]


@pytest.mark.slow
@pytest.mark.parametrize("example", ["mix_static.yaml", "mix_random.yaml", "mix_scheduled.yaml"])
def test_two_workers_train_the_one_process_stream(tmp_path: Path, example: str) -> None:
    train(tmp_path, "one", example)
    train(tmp_path, "two", example, "--nproc", "2", "per_device_train_batch_size=4")  # the same global batch
    one, r0, r1 = steps(tmp_path, "one", 0), steps(tmp_path, "two", 0), steps(tmp_path, "two", 1)
    assert len(one) == 4
    for step, (a, b, single) in enumerate(zip(r0, r1, one, strict=True), start=1):
        assert not set(a) & set(b), step  # the ranks train disjoint rows
        assert sorted(a + b) == sorted(single), step


def decisions(stderr: str) -> Counter[str]:
    """How often each logged steering record appears (timings aside)."""
    logged: Counter[str] = Counter()
    for line in stderr.splitlines():
        if "datasteer.controller: steering {" in line:
            record = ast.literal_eval(line.split("steering ", 1)[1])
            record.pop("seconds", None)
            logged[json.dumps(record, sort_keys=True)] += 1
    return logged


@pytest.mark.slow
def test_force_torchrun_starts_workers_that_log_the_same_decisions(tmp_path: Path) -> None:
    proc = train(
        tmp_path,
        "odm",
        "mix_odm.yaml",
        "per_device_train_batch_size=4",
        env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"},
    )
    logged = decisions(proc.stderr)
    assert len(logged) >= 4 and set(logged.values()) == {2}  # every decision, once per rank


def assert_same_stream(tmp_path: Path, example: str, name: str) -> None:
    """The 2-rank run ``name`` trained the stream of a 1-process run of ``example``, split in two."""
    train(tmp_path, "one", example)
    one, r0, r1 = steps(tmp_path, "one", 0), steps(tmp_path, name, 0), steps(tmp_path, name, 1)
    assert len(one) == 4
    for step, (a, b, single) in enumerate(zip(r0, r1, one, strict=True), start=1):
        assert not set(a) & set(b), step
        assert sorted(a + b) == sorted(single), step


@pytest.mark.slow
def test_accelerate_launch_starts_the_workers(tmp_path: Path) -> None:
    launcher = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    train(
        tmp_path, "two", "mix_random.yaml", "per_device_train_batch_size=4", launcher=[*launcher, "-m", *DATASTEER[2:]]
    )
    assert_same_stream(tmp_path, "mix_random.yaml", "two")


@pytest.mark.slow
def test_the_deepspeed_launcher_with_zero3_from_the_yaml(tmp_path: Path) -> None:
    launcher = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank"]
    proc = train(
        tmp_path,
        "two",
        "mix_odm.yaml",
        "per_device_train_batch_size=4",
        f"deepspeed={EXAMPLES / 'deepspeed' / 'ds_z3_config.json'}",
        launcher=[*launcher, "--module", *DATASTEER[2:]],
    )
    for rank in (0, 1):  # each rank trained under ZeRO-3 (recorded by the trace)
        assert (tmp_path / f"two.rank{rank}.zero3").read_text() == "True"
    logged = decisions(proc.stdout + proc.stderr)  # the launcher may forward either stream
    assert len(logged) >= 4 and set(logged.values()) == {2}


@pytest.mark.slow
def test_two_nodes_of_one_worker_meet_on_one_rendezvous(tmp_path: Path) -> None:
    """Two torchrun agents on one machine (loopback), as two nodes of one run would be."""
    port, environ = str(free_port()), environment(tmp_path, "nodes")
    nodes = [
        subprocess.Popen(
            command(
                tmp_path,
                "nodes",
                "mix_scheduled.yaml",
                *("--nproc", "1", "--nnodes", "2", "--node-rank", str(rank)),
                *("--master-addr", "127.0.0.1", "--master-port", port, "per_device_train_batch_size=4"),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        out, err = node.communicate(timeout=600)
        finished(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    assert_same_stream(tmp_path, "mix_scheduled.yaml", "nodes")
