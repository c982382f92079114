"""Model operations bound to the live model and the training pool, sharded over ranks.

Every method takes pool indices, gives each rank a contiguous share of them, runs the
batched operation on that share and gathers the results in index order, so that every
rank holds the same tensor (computed once, not once per rank).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from datasteer import dist
from datasteer.errors import SteeringStateError
from datasteer.ops.embeddings import Pooling, embed
from datasteer.ops.gradients import GradFeatureConfig, grad_features
from datasteer.ops.keys import INDEX_KEY
from datasteer.ops.losses import per_sample_loss

__all__ = ["INDEX_KEY", "ModelOps"]


class ModelOps:
    """Batched passes of the live model over pool samples, for algorithms that need them.

    Args:
        model: the model being trained (unwrapped).
        dataset: the training pool (indexable, rows as the collator expects them).
        collator: turns a list of rows into a batch dict with ``labels``.
        batch_size: rows per forward pass.
        device: where batches go.
        targets: the target (evaluation) sets, each bound to its own rows and collator.
        optimizer: the live optimizer (for optimizer-aware gradient features), if any.
        name: the data set's name (an evaluation set's key, e.g. a domain), if it has one.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Any,
        collator: Callable[[list[Any]], dict[str, Any]],
        batch_size: int,
        device: torch.device,
        targets: Sequence[ModelOps] = (),
        optimizer: torch.optim.Optimizer | None = None,
        name: str | None = None,
    ) -> None:
        self.model = model
        self.dataset = dataset
        self.collator = collator
        self.batch_size = batch_size
        self.device = device
        self.targets = tuple(targets)
        self.optimizer = optimizer
        self.name = name

    def target_embeddings(self, *, layer: int = -1, pooling: Pooling = "mean", normalize: bool = True) -> torch.Tensor:
        """Embeddings of every row of every target set, concatenated in order.

        Raises:
            SteeringStateError: the run has no target (evaluation) set.
        """
        if not self.targets:
            raise SteeringStateError("this algorithm needs target samples: give the run an evaluation set")
        parts = [
            t.embeddings(range(len(t.dataset)), layer=layer, pooling=pooling, normalize=normalize) for t in self.targets
        ]
        return torch.cat(parts)

    def _my_share(self, indices: Sequence[int] | torch.Tensor) -> tuple[list[int], int]:
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        start, stop = dist.shard_bounds(len(idx))
        return idx[start:stop], len(idx)

    def batches(self, indices: Sequence[int]) -> Iterator[dict[str, Any]]:
        """Collated batches of the given pool rows, without the steering index."""
        for start in range(0, len(indices), self.batch_size):
            batch = self.collator([self.dataset[i] for i in indices[start : start + self.batch_size]])
            batch.pop(INDEX_KEY, None)
            yield batch

    @torch.no_grad()
    def sample_losses(self, indices: Sequence[int] | torch.Tensor, desc: str = "per-sample loss") -> torch.Tensor:
        """Token-mean loss of each pool sample in ``indices`` (eval mode, no gradient).

        Returns a float32 CPU tensor in the order of ``indices``, the same on every rank.
        """
        mine, total = self._my_share(indices)
        was_training = self.model.training
        self.model.eval()
        out = torch.empty(len(mine), dtype=torch.float32)
        try:
            bar = tqdm(total=len(mine), desc=desc, unit="sample", disable=dist.rank() != 0, leave=False)
            done = 0
            for batch in self.batches(mine):
                labels = batch.pop("labels").to(self.device)
                inputs = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                logits = self.model(**inputs).logits
                losses = per_sample_loss(logits, labels)[0].float().cpu()
                out[done : done + len(losses)] = losses
                done += len(losses)
                bar.update(len(losses))
            bar.close()
        finally:
            self.model.train(was_training)
        return dist.gather_rows(out, total)

    def embeddings(
        self,
        indices: Sequence[int] | torch.Tensor,
        *,
        layer: int = -1,
        pooling: Pooling = "mean",
        normalize: bool = True,
    ) -> torch.Tensor:
        """Pooled hidden states of each pool sample (see :func:`datasteer.ops.embed`)."""
        mine, total = self._my_share(indices)
        local = embed(
            self.model, self.batches(mine), layer=layer, pooling=pooling, normalize=normalize, device=self.device
        )
        return dist.gather_rows(local, total)

    def gradient_features(
        self,
        indices: Sequence[int] | torch.Tensor,
        config: GradFeatureConfig | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> torch.Tensor:
        """Projected per-sample gradient features (see :func:`datasteer.ops.grad_features`).

        Each rank computes its share with its full replica of the trainable parameters
        (DDP); the small projected rows are gathered, never full gradients.
        """
        mine, total = self._my_share(indices)
        if mine:
            local = grad_features(self.model, self.batches(mine), config, optimizer=optimizer)
        else:  # more ranks than samples: this rank contributes no rows
            width = grad_features(self.model, self.batches(torch.as_tensor(indices)[:1].tolist()), config).shape[1]
            local = torch.zeros(0, width)
        return dist.gather_rows(local, total)
