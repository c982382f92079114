"""Pooled embeddings: hidden states of the training model, or of a local text encoder.

* :func:`embed` runs the live model (eval mode, no gradient) over a list of batches and
  pools one layer's hidden states per sample: ``mean`` over non-padding tokens, the
  ``last`` non-padding token, or a ``weighted`` mean with weights proportional to the
  position 1..T of each non-padding token (SGPT, arXiv 2202.08904; used by ADAPT).
  Left- and right-padded batches give the same result as unpadded samples.
* :class:`LocalEncoder` embeds raw texts with a sentence-transformers-style model
  directory (transformers ``AutoModel`` + mean pooling), never touching the hub.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from datasteer import dist
from datasteer.ops.hub import ALLOW_DOWNLOADS, local_files_only

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "last", "weighted"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling = "mean") -> torch.Tensor:
    """Pool ``(b, T, h)`` hidden states over the tokens where ``attention_mask`` is 1.

    Works with left and right padding: ``last`` takes the rightmost attended token and
    ``weighted`` counts positions over attended tokens only. Returns float32 ``(b, h)``.
    """
    mask = attention_mask.to(hidden.device).bool()
    # where(), not a product: hidden states at padding may be inf / nan in some kernels.
    h = torch.where(mask[..., None], hidden.float(), 0.0)
    if pooling == "mean":
        return h.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    if pooling == "last":
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    if pooling == "weighted":
        weights = (mask.cumsum(1) * mask).float()  # 1..L over attended tokens, 0 at padding
        return (h * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
    raise ValueError(f"pooling must be 'mean', 'last' or 'weighted', got {pooling!r}")


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def iter_embed(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    layer: int = -1,
    pooling: Pooling = "mean",
    normalize: bool = True,
    device: torch.device | None = None,
    desc: str = "embeddings",
) -> Iterator[torch.Tensor]:
    """Pooled hidden states of each batch in ``batches``, one ``(b, h)`` float32 CPU block at a time.

    The arguments are :func:`embed`'s; a caller can write each block out without holding
    them all. The model is in eval mode between yields.
    """
    if device is None:
        device = next(model.parameters()).device
    extra: dict[str, Any] = {}
    # A causal LM would otherwise materialise (b, T, vocab) logits that we throw away.
    if _accepts(model, "logits_to_keep"):
        extra["logits_to_keep"] = 1
    total = len(batches) if isinstance(batches, Sized) else None
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, total=total, desc=desc, unit="batch", disable=dist.rank() != 0, leave=False):
            with torch.no_grad():
                input_ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
                positions = batch.get("position_ids")
                positions = (mask.long().cumsum(1) - 1).clamp_min(0) if positions is None else positions.to(device)
                outputs = model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    output_hidden_states=True,
                    use_cache=False,
                    **extra,
                )
                pooled = pool(outputs.hidden_states[layer], mask, pooling)
                rows = (F.normalize(pooled, dim=1) if normalize else pooled).cpu()
            yield rows
    finally:
        model.train(was_training)


def embed(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    layer: int = -1,
    pooling: Pooling = "mean",
    normalize: bool = True,
    device: torch.device | None = None,
    desc: str = "embeddings",
) -> torch.Tensor:
    """Pooled hidden states of ``model`` for every sample of ``batches``, in order.

    Args:
        model: a transformers model (causal LM or base model); its train mode is restored.
        batches: dicts with ``input_ids`` and ``attention_mask`` (other keys, e.g.
            ``labels``, are ignored). ``position_ids`` are derived from the mask when
            absent, so left padding does not shift positions.
        layer: index into ``hidden_states`` (0 = embeddings, -1 = last layer).
        pooling: ``"mean"``, ``"last"`` or ``"weighted"`` (see :func:`pool`).
        normalize: L2-normalise each embedding.
        device: where batches go (default: the device of the model's first parameter).
        desc: progress bar label (shown on rank 0 only).

    Returns:
        ``(n, h)`` float32 CPU tensor. Pass one rank's batches to embed its share.
    """
    out = list(iter_embed(model, batches, layer=layer, pooling=pooling, normalize=normalize, device=device, desc=desc))
    if not out:
        raise ValueError("embed() got no batches")
    return torch.cat(out)


class LocalEncoder:
    """Embeds raw texts with a local sentence-transformers-style model directory.

    The directory must hold a transformers model and tokenizer at its root (as
    sentence-transformers saves them). Loading is offline (``local_files_only=True``) unless
    downloads are allowed (see :mod:`datasteer.ops.hub`).

    Args:
        path: the model directory.
        device: where the encoder runs.
        batch_size: texts per forward pass.
        max_length: tokens kept per text (longer texts are truncated).
        pooling: how token states are pooled; sentence-transformers models mostly use mean.
        normalize: L2-normalise each embedding (as the ``Normalize`` module does).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        max_length: int = 256,
        pooling: Pooling = "mean",
        normalize: bool = True,
    ) -> None:
        # Imported here: transformers' auto classes are slow to import and most runs
        # never build an encoder.
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path)
        if local_files_only() and not (self.path / "config.json").is_file():
            raise FileNotFoundError(
                f"{self.path} is not a local model directory (no config.json); set {ALLOW_DOWNLOADS}=1 to let "
                "it be downloaded from the Hugging Face Hub"
            )
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.pooling: Pooling = pooling
        self.normalize = normalize
        offline = local_files_only()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=offline)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=offline).to(self.device).eval()

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, desc: str = "encode") -> torch.Tensor:
        """``(len(texts), dim)`` float32 CPU embeddings, in the order of ``texts``."""
        out: list[torch.Tensor] = []
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=dist.rank() != 0, leave=False):
            enc = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state
            pooled = pool(hidden, enc["attention_mask"], self.pooling)
            out.append((F.normalize(pooled, dim=1) if self.normalize else pooled).cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim)
