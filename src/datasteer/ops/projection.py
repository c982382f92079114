"""Seeded random projections for gradient features, generated in chunks, never stored whole.

Three pieces:

* :class:`StreamingProjection`: a ``D x k`` Johnson-Lindenstrauss matrix ``P`` (Rademacher
  entries ``±1/sqrt(k)`` or Gaussian ``N(0, 1/k)``), so ``x @ P`` keeps inner products in
  expectation. Row chunk ``c`` (rows ``[c R, (c + 1) R)``) is drawn from a CPU generator
  seeded by ``(seed, kind, k, R, c)``; ``D`` is not part of the seed, so a row's values
  depend only on its index and the same rows come back in every call, process and rank.
  The chunks are generated on the CPU (then moved) because CUDA generators give other
  numbers: features computed on a GPU and on a CPU stay comparable.
* :class:`ParamLayout`: the flat gradient is the concatenation of the trainable
  parameters' gradients in ``named_parameters`` order; a parameter's block is projected
  with the rows starting at its offset, so projecting block by block and summing equals
  projecting the concatenated vector.
* :class:`KroneckerProjection` (LoGra, arXiv 2405.13954): for a linear layer with weight
  ``W`` (``b x a``) the per-sample gradient is ``G = sum_t delta_t x_t^T``; with small
  seeded ``P_in`` (``k_in x a``) and ``P_out`` (``k_out x b``) the feature is
  ``vec(P_out G P_in^T) = vec(sum_t (P_out delta_t)(P_in x_t)^T)``, which equals
  ``kron(P_out, P_in) @ vec(G)`` (row-major ``vec``) without forming ``G``.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from datasteer.rng import torch_generator

ProjectionKind = Literal["rademacher", "gaussian"]

#: Rows of ``P`` generated at a time; part of the projection's identity (it keys the seeds).
DEFAULT_CHUNK_ROWS = 8192


def random_matrix(rows: int, cols: int, *, scale_dim: int, kind: ProjectionKind, gen: torch.Generator) -> torch.Tensor:
    """A ``rows x cols`` float32 CPU matrix of ``±1/sqrt(scale_dim)`` or ``N(0, 1/scale_dim)``."""
    if kind == "rademacher":
        out = torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.float32)
        return out.mul_(2.0).sub_(1.0).mul_(1.0 / math.sqrt(scale_dim))
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=gen, dtype=torch.float32).mul_(1.0 / math.sqrt(scale_dim))
    raise ValueError(f"projection kind must be 'rademacher' or 'gaussian', got {kind!r}")


class _ChunkCache:
    """Generated projection chunks, least recently used first out, within a byte budget.

    Generating a chunk costs far more than multiplying by it, and every batch needs the
    same chunks again: caching them makes the projection cost one generation per run
    (when the chunks fit the budget) instead of one per batch. Set the budget with
    ``DATASTEER_PROJECTION_CACHE_MB`` (default 512; 0 disables the cache).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...], make: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        value = make()
        size = value.numel() * value.element_size()
        if size <= self.max_bytes:
            with self._lock:
                self._items[key] = value
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.numel() * old.element_size()
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


CHUNK_CACHE = _ChunkCache(int(float(os.environ.get("DATASTEER_PROJECTION_CACHE_MB", "512")) * 2**20))


@dataclass(frozen=True)
class StreamingProjection:
    """``x @ P`` for a seeded ``D x k`` matrix ``P`` that is generated chunk by chunk.

    Attributes:
        out_dim: ``k``, the projected dimension.
        seed: the run's seed; with ``kind``, ``out_dim`` and ``chunk_rows`` it fixes ``P``.
        kind: ``"rademacher"`` (``±1/sqrt(k)``) or ``"gaussian"`` (``N(0, 1/k)``).
        chunk_rows: rows generated at a time (memory ``chunk_rows * k * 4`` bytes).
    """

    out_dim: int
    seed: int
    kind: ProjectionKind = "rademacher"
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def __post_init__(self) -> None:
        if self.out_dim < 1 or self.chunk_rows < 1:
            raise ValueError(f"out_dim and chunk_rows must be >= 1, got {self.out_dim}, {self.chunk_rows}")

    def chunk(self, index: int, rows: int | None = None) -> torch.Tensor:
        """Rows ``[index R, index R + rows)`` of ``P`` (``rows`` defaults to ``R``), float32 CPU."""
        key = ("projection", self.seed, self.kind, self.out_dim, self.chunk_rows, index)

        def make() -> torch.Tensor:
            gen = torch_generator(self.seed, "projection", self.kind, self.out_dim, self.chunk_rows, index)
            return random_matrix(self.chunk_rows, self.out_dim, scale_dim=self.out_dim, kind=self.kind, gen=gen)

        full = CHUNK_CACHE.get(key, make)  # shared and cached: callers must not modify it
        return full if rows is None else full[:rows]

    def project_blocks(self, blocks: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Sum over blocks of ``x_b @ P[offset_b : offset_b + d_b]``.

        Each chunk of ``P`` is generated once per call, whatever the number of blocks it
        serves (many small parameters share a chunk).

        Args:
            blocks: ``(offset, x)`` pairs, ``x`` of shape ``(n, d_b)``, all with the same ``n``
                and device.

        Returns:
            ``(n, k)`` float32 on the blocks' device.
        """
        if not blocks:
            raise ValueError("project_blocks needs at least one block")
        n, device = blocks[0][1].shape[0], blocks[0][1].device
        out = torch.zeros(n, self.out_dim, dtype=torch.float32, device=device)
        # chunk index -> [(lo, hi, x)] with [lo, hi) the block's global rows inside that chunk.
        plan: dict[int, list[tuple[int, int, int, torch.Tensor]]] = {}
        for offset, x in blocks:
            if x.dim() != 2 or x.shape[0] != n:
                raise ValueError(f"every block must be (n={n}, d), got {tuple(x.shape)}")
            end = offset + x.shape[1]
            for c in range(offset // self.chunk_rows, -(-end // self.chunk_rows)):
                lo, hi = max(c * self.chunk_rows, offset), min((c + 1) * self.chunk_rows, end)
                plan.setdefault(c, []).append((lo, hi, offset, x))
        for c in sorted(plan):
            base = c * self.chunk_rows
            rows = max(hi for _, hi, _, _ in plan[c]) - base
            p = self.chunk(c, rows).to(device)
            for lo, hi, offset, x in plan[c]:
                out.addmm_(x[:, lo - offset : hi - offset].float(), p[lo - base : hi - base])
        return out

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ P`` for ``x`` of shape ``(n, D)``; returns ``(n, k)`` float32."""
        return self.project_blocks([(0, x)])

    def materialize(self, in_dim: int) -> torch.Tensor:
        """The first ``in_dim`` rows of ``P`` as one matrix: for tests and tiny ``D`` only."""
        n_chunks = -(-in_dim // self.chunk_rows)
        return torch.cat([self.chunk(c) for c in range(n_chunks)])[:in_dim]


@dataclass(frozen=True)
class ParamBlock:
    """One parameter's place in the flat gradient."""

    name: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ParamLayout:
    """Where each parameter's gradient sits in the flat gradient (fixed, ordered)."""

    blocks: tuple[ParamBlock, ...]

    @classmethod
    def from_named(cls, named: Iterable[tuple[str, torch.Tensor]]) -> ParamLayout:
        """Layout of ``named`` in the given order (use ``named_parameters`` order)."""
        blocks, offset = [], 0
        for name, tensor in named:
            blocks.append(ParamBlock(name, offset, tuple(tensor.shape)))
            offset += tensor.numel()
        return cls(tuple(blocks))

    @property
    def total(self) -> int:
        """``D``, the length of the flat gradient."""
        return self.blocks[-1].offset + self.blocks[-1].numel if self.blocks else 0

    def flatten(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(n, D)`` from per-parameter ``(n, *shape)`` tensors, in layout order."""
        return torch.cat([grads[b.name].reshape(grads[b.name].shape[0], -1) for b in self.blocks], dim=1)

    def project(self, grads: Mapping[str, torch.Tensor], projection: StreamingProjection) -> torch.Tensor:
        """Project per-parameter ``(n, *shape)`` gradients block by block (no flat ``(n, D)`` copy)."""
        return projection.project_blocks(
            [(b.offset, grads[b.name].reshape(grads[b.name].shape[0], -1)) for b in self.blocks]
        )


@dataclass(frozen=True)
class KroneckerProjection:
    """LoGra projection of a linear layer's per-sample gradient, ``kron(P_out, P_in)`` in factors.

    ``P_in`` is ``k_in x a`` with entries scaled by ``1/sqrt(k_in)`` and ``P_out`` is
    ``k_out x b`` scaled by ``1/sqrt(k_out)``, so ``kron(P_out, P_in)`` has the
    ``1/sqrt(k_in k_out)`` scale of a dense projection to ``k_in k_out`` dimensions.

    Attributes:
        p_in: ``(k_in, a)`` float32 CPU.
        p_out: ``(k_out, b)`` float32 CPU.
    """

    p_in: torch.Tensor
    p_out: torch.Tensor

    @classmethod
    def create(
        cls,
        in_features: int,
        out_features: int,
        in_dim: int,
        out_dim: int,
        *,
        seed: int,
        key: str,
        kind: ProjectionKind = "rademacher",
    ) -> KroneckerProjection:
        """Seeded factors for one layer; ``key`` (e.g. the module name) makes layers differ."""
        p_in = random_matrix(
            in_dim, in_features, scale_dim=in_dim, kind=kind, gen=torch_generator(seed, "logra", key, "in")
        )
        p_out = random_matrix(
            out_dim, out_features, scale_dim=out_dim, kind=kind, gen=torch_generator(seed, "logra", key, "out")
        )
        return cls(p_in, p_out)

    @property
    def dim(self) -> int:
        """Feature width ``k_out * k_in``."""
        return self.p_in.shape[0] * self.p_out.shape[0]

    def project(self, inputs: torch.Tensor, out_grads: torch.Tensor) -> torch.Tensor:
        """``vec(sum_t (P_out delta_t)(P_in x_t)^T)`` per sample.

        Args:
            inputs: ``(n, ..., a)`` layer inputs ``x_t``.
            out_grads: ``(n, ..., b)`` gradients ``delta_t`` of the loss w.r.t. the layer output.

        Returns:
            ``(n, k_out * k_in)`` float32, row-major in ``(k_out, k_in)``.
        """
        n = inputs.shape[0]
        px = inputs.reshape(n, -1, inputs.shape[-1]).float() @ self.p_in.to(inputs.device).T
        pd = out_grads.reshape(n, -1, out_grads.shape[-1]).float() @ self.p_out.to(out_grads.device).T
        return torch.bmm(pd.transpose(1, 2), px).reshape(n, -1)

    def matrix(self) -> torch.Tensor:
        """``kron(P_out, P_in)`` (``k_out k_in x b a``): for tests on tiny layers only."""
        return torch.kron(self.p_out, self.p_in)
