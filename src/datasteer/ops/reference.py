"""A frozen reference model beside the one being trained (DoReMi's excess loss)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datasteer.errors import ConfigError
from datasteer.ops.hub import local_files_only, require_local
from datasteer.ops.losses import per_token_loss, token_mean

logger = logging.getLogger(__name__)


def load_reference_model(path: str, like: nn.Module) -> nn.Module:
    """Load the causal LM saved at ``path`` (full weights, or a PEFT adapter, merged), frozen, in eval mode.

    Its dtype follows ``like`` (the model being trained), whose vocabulary it must share.
    Offline (see :mod:`datasteer.ops.hub`): the base model an adapter names must be a local
    directory too, unless downloads are allowed.

    Raises:
        ConfigError: no model at ``path`` (or at its adapter's base), or a different vocabulary.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise ConfigError(
            f"reference_model: {path} holds no saved model (config.json or adapter_config.json); "
            "train the reference model first (DoReMi step 1, RHO-LOSS step 1)"
        )
    dtype = next(like.parameters()).dtype
    model: Any
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        require_local(base_path, f"reference_model: {path} is an adapter whose base model")
        base = _from_pretrained(AutoModelForCausalLM, base_path, dtype)
        model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    else:
        model = _from_pretrained(AutoModelForCausalLM, str(folder), dtype)
    ours = getattr(getattr(like, "config", None), "vocab_size", None)
    theirs = model.config.vocab_size
    if ours is not None and ours != theirs:
        raise ConfigError(f"reference_model: {path} has a vocabulary of {theirs} tokens, the trained model {ours}")
    model.requires_grad_(False)
    model.eval()
    logger.info("reference model loaded from %s", path)
    result: nn.Module = model
    return result


def _from_pretrained(auto: Any, path: str, dtype: torch.dtype) -> Any:
    try:
        return auto.from_pretrained(path, dtype=dtype, local_files_only=local_files_only())
    except OSError as err:  # missing weights, or a Hub id while offline
        raise ConfigError(f"reference_model: cannot load a model from {path} ({str(err).splitlines()[0]})") from None


@torch.no_grad()
def reference_losses(
    reference: nn.Module,
    inputs: dict[str, Any],
    labels: torch.Tensor,
    token_losses: torch.Tensor,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One no-grad forward of the reference model on a training batch.

    Args:
        reference: the frozen reference model (moved to the batch's device on first use).
        inputs: the model inputs of the batch (without labels).
        labels: ``(b, T)`` labels.
        token_losses: ``(b, T - 1)`` the trained model's per-token losses (see
            :func:`datasteer.ops.per_token_loss`).
        label_smoothing: the smoothing those losses were computed with (applied to the
            reference's losses too, so that both sides measure the same thing).

    Returns:
        ``(excess, reference_mean)``, both ``(b,)``: per sample, the sum over its labelled
        tokens of ``max(loss - reference loss, 0)``, and the reference's token-mean loss.
    """
    device = labels.device
    if next(reference.parameters()).device != device:
        reference.to(device)
    ref_losses, mask = per_token_loss(reference(**inputs).logits, labels, label_smoothing)
    excess = ((token_losses.detach() - ref_losses).clamp_min(0) * mask).sum(dim=1)
    return excess, token_mean(ref_losses, mask)[0]
