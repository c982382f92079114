"""Per-token and per-sample causal-LM losses from logits and labels.

Normalisation, written down once:

* ``per_token_loss``: cross-entropy of the token at position ``t + 1`` given the logits at
  ``t`` (the usual shift), ``0`` where the label is ``IGNORE_INDEX`` (padding, prompt);
* ``per_sample_loss``: the mean over a sample's own labelled tokens (a sample with no
  labelled token has loss 0 and count 0).

How this combines with gradient accumulation and ``num_items_in_batch`` is described in
:mod:`datasteer.integrations.hf`: a steered step's loss is ``(1/B) sum_i w_i l_i`` over
the B samples of the global batch, whatever the split into micro-batches and ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Label value that marks a position without loss (padding, prompt tokens).
IGNORE_INDEX = -100


def per_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted next-token cross-entropy.

    Args:
        logits: ``(b, T, V)`` model outputs.
        labels: ``(b, T)`` target ids, ``IGNORE_INDEX`` where no loss is taken.
        label_smoothing: ``eps`` of the Trainer's ``label_smoothing_factor``: each token's
            loss is ``(1 - eps) * nll + eps * mean_v(-log p_v)``, per token what
            ``transformers``' ``LabelSmoother`` computes.

    Returns:
        ``(losses, mask)``, both ``(b, T - 1)``: the loss of each predicted token (float32,
        0 where masked) and a bool mask of the positions that count.
    """
    shift_logits = logits[:, :-1, :]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)).float(),
        targets.reshape(-1).clamp_min(0),
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(targets.shape)
    return losses * mask, mask


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean loss of each sample.

    Returns:
        ``(losses, counts)``: ``(b,)`` mean loss over each sample's labelled tokens
        (0 when it has none) and ``(b,)`` the number of those tokens.
    """
    return token_mean(*per_token_loss(logits, labels))


def token_mean(token_losses: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(losses, counts)`` of :func:`per_sample_loss` from :func:`per_token_loss`'s output
    (for callers that also need the per-token losses)."""
    counts = mask.sum(dim=1)
    return token_losses.sum(dim=1) / counts.clamp_min(1), counts
