"""Thin helpers over ``torch.distributed`` that degrade to no-ops in one process.

Only the controller and the model operations call these; algorithms never do.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def _device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small plans and records)."""
    if not is_distributed():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    result: T = box[0]
    return result


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over ranks (``sum``, ``min`` or ``max``); returns a new CPU tensor."""
    if not is_distributed():
        return tensor.clone()
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    work = tensor.detach().to(_device(), copy=True)
    dist.all_reduce(work, op=ops[op])
    return work.cpu()


def shard_bounds(n: int) -> tuple[int, int]:
    """This rank's contiguous share ``[start, stop)`` of ``n`` items (ranks in order)."""
    per = -(-n // world_size())
    start = min(n, rank() * per)
    return start, min(n, start + per)


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's rows (its :func:`shard_bounds` share of ``n``) in rank order.

    Each rank passes the rows of its own share; every rank gets all ``n`` rows, on the CPU.
    """
    if not is_distributed():
        return local.cpu()
    per = -(-n // world_size())
    padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype)
    padded[: local.shape[0]] = local.detach().cpu()
    device = _device()
    parts = [torch.empty_like(padded, device=device) for _ in range(world_size())]
    dist.all_gather(parts, padded.to(device))
    return torch.cat([p.cpu() for p in parts])[:n]


def all_gather_rows(local: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """Every rank's rows of ``local`` (row counts may differ), concatenated in rank order.

    Returns ``(rows, mine)``: the gathered CPU tensor, the same on every rank, and the slice
    of it that is this rank's ``local``.
    """
    if not is_distributed():
        return local.detach().cpu(), slice(0, local.shape[0])
    device = _device()
    counts = torch.zeros(world_size(), dtype=torch.long)
    counts[rank()] = local.shape[0]
    counts = all_reduce(counts)
    per = int(counts.max())
    padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype)
    padded[: local.shape[0]] = local.detach().cpu()
    parts = [torch.empty_like(padded, device=device) for _ in range(world_size())]
    dist.all_gather(parts, padded.to(device))
    rows = torch.cat([p.cpu()[: int(c)] for p, c in zip(parts, counts, strict=True)])
    start = int(counts[: rank()].sum())
    return rows, slice(start, start + local.shape[0])
