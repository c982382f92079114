"""Starting ``datasteer train`` on several processes (and nodes) through torchrun.

``datasteer train run.yaml --nproc N`` validates the run once, then starts ``N`` workers
with PyTorch's own launcher (``python -m torch.distributed.run ... -m datasteer train
run.yaml``); each worker runs the ordinary single-process path inside the process group
torchrun set up. LLaMA-Factory's convention works the same: ``FORCE_TORCHRUN=1`` with
``NPROC_PER_NODE``, ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (the
flags win over the variables), and, as ``llamafactory-cli train`` does, a machine with
more than one CUDA device starts one worker per device unless told otherwise.

The training engine stays the user's: a ``deepspeed:`` key or an FSDP setting in the YAML
reaches LLaMA-Factory's arguments unchanged, and ``accelerate launch`` / ``deepspeed``
can start ``python -m datasteer train`` as they start any script.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from datasteer.errors import ConfigError

#: Set by torchrun (and accelerate, deepspeed) in every worker: the process is already one.
_WORKER_VARIABLES = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")
_TRUE = ("1", "true", "y", "yes")


@dataclass(frozen=True)
class LaunchSettings:
    """Where and how many workers torchrun starts (its flags of the same names)."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ConfigError(f"--nproc: must be >= 1, got {self.nproc}")
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes: must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(
                f"--node-rank: must be in [0, {self.nnodes - 1}] for {self.nnodes} nodes, got {self.node_rank}"
            )
        if self.nnodes > 1 and self.master_port is None:
            raise ConfigError("--master-port: a multi-node run needs the port every node meets on (e.g. 29500)")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def in_worker(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a process a launcher (torchrun, accelerate, deepspeed) started."""
    env = os.environ if environ is None else environ
    return any(name in env for name in _WORKER_VARIABLES)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}: must be an integer, got {value!r}") from None


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_settings(
    nproc: int | None = None,
    nnodes: int | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> LaunchSettings | None:
    """The workers to start for ``datasteer train``, or None to train in this process.

    None inside a worker, and when neither a flag, ``FORCE_TORCHRUN`` nor a second CUDA
    device asks for more than one process. Flags win over LLaMA-Factory's variables.
    """
    env = os.environ if environ is None else environ
    if in_worker(env):
        if nproc is not None or nnodes is not None:
            raise ConfigError("--nproc/--nnodes: this process is already a launched worker; drop the flags")
        return None
    forced = env.get("FORCE_TORCHRUN", "").lower() in _TRUE

    def pick(flag: int | None, variable: str) -> int | None:
        return flag if flag is not None else _env_int(env, variable) if forced else None

    nproc, nnodes = pick(nproc, "NPROC_PER_NODE"), pick(nnodes, "NNODES")
    if nproc is None:
        devices = _cuda_devices()
        if not forced and nnodes is None and devices <= 1:
            return None
        nproc = max(1, devices)  # llamafactory-cli's default: one worker per CUDA device
    return LaunchSettings(
        nproc=nproc,
        nnodes=nnodes or 1,
        node_rank=pick(node_rank, "NODE_RANK") or 0,
        master_addr=master_addr or (env.get("MASTER_ADDR") if forced else None) or "127.0.0.1",
        master_port=pick(master_port, "MASTER_PORT"),
    )


def free_port() -> int:
    """A TCP port free on this machine now (the rendezvous of a one-node launch)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_command(settings: LaunchSettings, train_args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run <flags> -m datasteer train <train_args>``."""
    port = settings.master_port if settings.master_port is not None else free_port()
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={settings.nnodes}",
        f"--node-rank={settings.node_rank}",
        f"--nproc-per-node={settings.nproc}",
        f"--master-addr={settings.master_addr}",
        f"--master-port={port}",
        "-m",
        "datasteer",
        "train",
        *train_args,
    ]


def launch(settings: LaunchSettings, train_args: Sequence[str]) -> int:
    """Start the workers and wait for them; torchrun's exit code (0 when every worker ended well)."""
    cmd = torchrun_command(settings, train_args)
    env = dict(os.environ)
    # Workers must not launch again: the variables that asked for this launch stay out of theirs.
    env.pop("FORCE_TORCHRUN", None)
    print(
        f"datasteer: starting {settings.nproc} worker(s) on node {settings.node_rank} of {settings.nnodes} "
        f"(world size {settings.world_size}) through torchrun",
        file=sys.stderr,
        flush=True,
    )
    return subprocess.run(cmd, env=env, check=False).returncode
