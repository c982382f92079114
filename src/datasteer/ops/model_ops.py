"""Model operations bound to the live model and the training pool."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from datasteer import dist
from datasteer.ops.losses import per_sample_loss

#: Batch key carrying each row's pool index from the data loader to the loss.
INDEX_KEY = "datasteer_index"


class ModelOps:
    """Batched passes of the live model over pool samples, for algorithms that need them.

    Args:
        model: the model being trained (wrapped or not).
        dataset: the training pool (indexable, rows as the collator expects them).
        collator: turns a list of rows into a batch dict with ``labels``.
        batch_size: rows per forward pass.
        device: where batches go.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Any,
        collator: Callable[[list[Any]], dict[str, Any]],
        batch_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.dataset = dataset
        self.collator = collator
        self.batch_size = batch_size
        self.device = device

    @torch.no_grad()
    def sample_losses(self, indices: Sequence[int] | torch.Tensor, desc: str = "per-sample loss") -> torch.Tensor:
        """Token-mean loss of each pool sample in ``indices`` (eval mode, no gradient).

        Returns a float32 CPU tensor in the order of ``indices``.
        """
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        was_training = self.model.training
        self.model.eval()
        out = torch.empty(len(idx), dtype=torch.float32)
        try:
            bar = tqdm(total=len(idx), desc=desc, unit="sample", disable=dist.rank() != 0, leave=False)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                batch = self.collator([self.dataset[i] for i in chunk])
                batch.pop(INDEX_KEY, None)
                labels = batch.pop("labels").to(self.device)
                inputs = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                logits = self.model(**inputs).logits
                out[start : start + len(chunk)] = per_sample_loss(logits, labels)[0].float().cpu()
                bar.update(len(chunk))
            bar.close()
        finally:
            self.model.train(was_training)
        return out
