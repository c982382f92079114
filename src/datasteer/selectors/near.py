"""NEAR: the pool samples nearest to the target samples in embedding space."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError, NonFiniteInputError
from datasteer.finite import finite_rows
from datasteer.ops.prepared import embedding_settings, pool_fingerprint, read_prepared, row_token_ids
from datasteer.registry import SELECTORS
from datasteer.selectors.base import SelectContext, Selector

logger = logging.getLogger(__name__)


@dataclass
class NearParams:
    """Parameters of :class:`NearSelector`."""

    neighbours: int = doc("Nearest pool samples kept per target (the depth of each neighbour list).", default=64)
    pooling: Literal["mean", "last", "weighted"] = doc(
        "How hidden states are pooled into an embedding.", default="mean"
    )
    layer: int = doc("Hidden layer to embed with (-1: the last).", default=-1)
    refresh: bool = doc("Re-embed pool and targets at every update (false: once, at the first update).", default=False)
    prepared: str | None = doc(
        "Directory written by `datasteer prepare near CONFIG` (null: embed with the live model).", default=None
    )

    def __post_init__(self) -> None:
        if self.neighbours < 1:
            raise ConfigError(f"neighbours: must be >= 1, got {self.neighbours}")
        if self.prepared is not None and self.refresh:
            raise ConfigError("refresh: prepared neighbour lists are fixed; set refresh: false or prepared: null")

    def settings(self) -> dict[str, object]:
        """What prepared neighbour lists depend on (part of their fingerprint)."""
        return {"kind": "near", "neighbours": self.neighbours, "layer": self.layer, "pooling": self.pooling}


@SELECTORS.register("near")
class NearSelector(Selector):
    """NEAR: round-robin over each target's nearest pool samples, moving down the lists at every update.

    Pool and target (evaluation) samples are embedded with the live model (pooled hidden
    states, cosine similarity); each target keeps its ``neighbours`` nearest pool samples.
    A selection takes the 1st neighbour of every target, then the 2nd, and so on, skipping
    samples already taken; the next update continues further down the lists, so every
    update serves new samples (the reference restarts from the top and so returns the same
    set every time). When the lists run out, unused pool samples are drawn at random.

    With ``prepared``, the lists come from ``datasteer prepare near CONFIG`` (faiss over the
    model's embeddings before training), checked against a fingerprint of this run's pool
    rows, target rows and settings; faiss's ``-1`` padding of short lists is skipped.

    Pool embeddings stay on disk, each rank's share of them
    (:meth:`~datasteer.ops.ModelOps.embedding_store`); each rank lists its own rows nearest
    to every target and only those candidates are gathered and merged.

    A pool or target row whose embedding is not finite is left out of the lists (and
    counted, ``nonfinite``); a pool sample left out can still be drawn when the lists run out.
    """

    Params = NearParams

    def check_within_domains(self) -> None:
        if self.params.prepared is not None:
            raise ConfigError(
                "datasteer.select.params.prepared: prepared neighbour lists index the whole pool and cannot be "
                "used within a mixer's domains; drop prepared (embed online) or the mix stage"
            )

    needs_model = True

    def __init__(self, params: NearParams) -> None:
        super().__init__(params)
        self.neighbours: torch.Tensor | None = None  # (targets, depth) pool indices, nearest first
        self.cursor = 0  # position in the rank-major neighbour order
        self.used: torch.Tensor | None = None  # (pool,) bool
        self._report: dict[str, int | float] = {}

    def check_streams(self) -> None:
        self.check_within_domains()

    def reset_pool(self) -> None:
        self.neighbours, self.cursor, self.used = None, 0, None

    def report(self) -> dict[str, int | float]:
        """``nonfinite``: pool and target embeddings left out when the lists were (re)built at this update."""
        return dict(self._report)

    def _neighbour_lists(self, ctx: SelectContext) -> torch.Tensor:
        assert ctx.ops is not None
        p: NearParams = self.params
        if p.prepared is not None:
            expected = pool_fingerprint(
                pool_ids=row_token_ids(ctx.ops.dataset),
                domains=ctx.domains,
                domain_names=ctx.domain_names,
                target_ids=[row_token_ids(t.dataset) for t in ctx.ops.targets],
                settings=embedding_settings(p.settings(), ctx.ops.model),
            )
            return read_prepared(p.prepared, "near", expected)["neighbours"].long()
        targets = ctx.ops.target_embeddings(layer=p.layer, pooling=p.pooling)
        keep = finite_rows(targets)
        with ctx.ops.embedding_store(torch.arange(ctx.pool_size), layer=p.layer, pooling=p.pooling) as pool:
            finite = pool.row_scores(lambda rows: finite_rows(torch.from_numpy(rows)).float()) > 0
            self._report["nonfinite"] = int((~finite).sum()) + int((~keep).sum())
            if not bool(finite.any()) or not bool(keep.any()):
                raise NonFiniteInputError(
                    f"no finite embedding to search ({self._report['nonfinite']} are NaN or infinite)"
                )
            # rows that are not finite score -inf, so with k <= the finite rows none is listed
            _, indices = pool.topk_similarity(targets[keep], min(p.neighbours, int(finite.sum())))
        return indices

    def select(self, ctx: SelectContext) -> torch.Tensor:
        self._report = {"nonfinite": 0}
        if self.neighbours is None or self.params.refresh:
            self.neighbours = self._neighbour_lists(ctx)
            # New lists start over from their nearest neighbours; samples already served are
            # skipped through ``used``, not through a cursor into the old lists.
            self.cursor = 0
        if self.used is None:
            self.used = torch.zeros(ctx.pool_size, dtype=torch.bool)
        order = self.neighbours.T.reshape(-1)  # 1st neighbour of every target, then the 2nd, ...
        chosen: list[int] = []
        while len(chosen) < ctx.num_samples and self.cursor < len(order):
            index = int(order[self.cursor])
            self.cursor += 1
            if index >= 0 and not self.used[index]:  # -1: faiss padding of a short list
                self.used[index] = True
                chosen.append(index)
        missing = ctx.num_samples - len(chosen)
        if missing > 0:
            free = torch.nonzero(~self.used).flatten()
            if len(free) < missing:  # the whole pool has been served: a new round, keeping this update's picks
                self.used[:] = False
                self.used[torch.tensor(chosen, dtype=torch.long)] = True
                free = torch.nonzero(~self.used).flatten()
            logger.info("near: neighbour lists exhausted; %d samples drawn at random from unused ones", missing)
            extra = free[torch.randperm(len(free), generator=ctx.generator)[:missing]]
            self.used[extra] = True
            chosen.extend(extra.tolist())
        return torch.tensor(chosen, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        # A copy: select() changes ``used`` in place, and a saved state must not move with it.
        used = self.used.clone() if self.used is not None else None
        return {"neighbours": self.neighbours, "cursor": self.cursor, "used": used}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.neighbours, self.cursor, self.used = state["neighbours"], int(state["cursor"]), state["used"]
