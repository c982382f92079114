"""Mixture-of-Experts helpers: find the router modules exactly, freeze them, count expert loads.

A router is the module that scores the experts of one MoE layer (its output is what
``output_router_logits=True`` returns). Routers are found by **module type**, never by
substrings of parameter names: a name test such as ``"gate" in name`` also catches the
``gate_proj`` of every dense or shared-expert MLP and, in transformers 5, the fused
``experts.gate_up_proj`` tensors, i.e. most of the model. The router type comes from the
model class itself: transformers declares, in ``_can_record_outputs["router_logits"]``,
which module class produces the router logits (``MixtralTopKRouter``,
``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter``, ``OlmoeTopKRouter``, ...). For other models
``router_names`` lists the routers' qualified module names (exact, or ``fnmatch`` patterns
matched against the whole name such as ``"model.layers.*.mlp.gate"``). The search walks
the whole module tree, so it works through PEFT and DDP wrappers; a PEFT layer that wraps
a router (LoRA on a router) is frozen with it.

Expert load (arXiv 2406.11256): for each token and MoE layer the router picks its top-k
experts; the load of expert e in a layer is the number of tokens routed to e. Counted over
non-padding tokens, with the model in eval mode and no gradient.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from datasteer import dist
from datasteer.errors import ConfigError, SteeringStateError

__all__ = ["expert_loads", "find_routers", "freeze_routers", "normalize_loads", "router_classes"]

logger = logging.getLogger(__name__)

ROUTER_OUTPUT = "router_logits"


def router_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The module classes that produce router logits, as the model's own class declares them.

    Looks at every module of the tree (so a PEFT or DDP wrapper is seen through) for a
    transformers model class whose ``_can_record_outputs`` names a ``router_logits`` source.

    Returns:
        The router classes; empty when the model declares none.
    """
    found: list[type[nn.Module]] = []
    for module in model.modules():
        spec = (getattr(type(module), "_can_record_outputs", None) or {}).get(ROUTER_OUTPUT)
        for recorder in spec if isinstance(spec, list | tuple) else [spec]:
            target = recorder if isinstance(recorder, type) else getattr(recorder, "target_class", None)
            if isinstance(target, type) and issubclass(target, nn.Module) and target not in found:
                found.append(target)
    return tuple(found)


def _peft_base_layer(module: nn.Module) -> nn.Module | None:
    """The layer a PEFT tuner layer wraps (``None`` for any other module, or without peft)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is optional
        return None
    if isinstance(module, BaseTunerLayer):
        base: nn.Module = module.get_base_layer()
        return base
    return None


def find_routers(model: nn.Module, router_names: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The router modules of a MoE model, by qualified module name, in model order.

    Args:
        model: the model, possibly wrapped (PEFT, DDP).
        router_names: qualified module names (or whole-name ``fnmatch`` patterns) of the
            routers; ``None`` finds them by the type the model class declares.

    Returns:
        ``{module name: router module}``. When a PEFT layer wraps a router, the wrapper is
        returned in its place (so its adapters are frozen with the router).

    Raises:
        ConfigError: no router found, or a name in ``router_names`` matches no module.
    """
    modules = dict(model.named_modules())
    if router_names is not None:
        chosen: dict[str, nn.Module] = {}
        for pattern in router_names:
            hits = [name for name in modules if name == pattern or fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                raise ConfigError(f"router_names: {pattern!r} matches no module of {type(model).__name__}")
            chosen.update((name, modules[name]) for name in hits)
        routers = {name: chosen[name] for name in modules if name in chosen}
    else:
        classes = router_classes(model)
        routers = {name: m for name, m in modules.items() if classes and isinstance(m, classes)}
    if not routers:
        raise ConfigError(
            f"{type(model).__name__} declares no MoE router (no router_logits output); "
            "list the router modules in router_names"
        )
    wrapped = {id(_peft_base_layer(m)): name for name, m in modules.items() if _peft_base_layer(m) is not None}
    result: dict[str, nn.Module] = {}
    for name, module in routers.items():
        outer = wrapped.get(id(module))
        if outer is not None:
            result[outer] = modules[outer]
        elif not any(name.startswith(f"{kept}.") for kept in result):
            result[name] = module
    return result


def freeze_routers(model: nn.Module, router_names: Sequence[str] | None = None) -> list[str]:
    """Stop gradient updates of every router parameter (``requires_grad = False``).

    Call before the optimizer is built. Only the routers' own parameters are touched.

    Returns:
        The qualified names of the frozen parameters.
    """
    frozen: list[str] = []
    for name, router in find_routers(model, router_names).items():
        for pname, param in router.named_parameters():
            param.requires_grad_(False)
            frozen.append(f"{name}.{pname}")
    logger.info("froze %d router parameters: %s", len(frozen), ", ".join(frozen))
    return frozen


def _top_k(model: nn.Module, top_k: int | None) -> int:
    if top_k is not None:
        return top_k
    for module in model.modules():
        config = getattr(module, "config", None)
        k = getattr(config, "num_experts_per_tok", None)
        if isinstance(k, int) and k > 0:
            return k
    raise ConfigError("top_k: the model config has no num_experts_per_tok; set top_k")


@torch.no_grad()
def expert_loads(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    top_k: int | None = None,
    device: torch.device | str | None = None,
    total: int | None = None,
    desc: str = "expert loads",
) -> torch.Tensor:
    """Top-k routed-token counts of each sample, per MoE layer and expert.

    One batched forward per batch with ``output_router_logits=True`` (eval mode, no
    gradient; the model's training mode is restored). For each non-padding token
    (``attention_mask != 0``) and MoE layer, the ``top_k`` experts with the largest router
    logits are counted; for routers that take top-k of softmax(logits) (Mixtral,
    Qwen2/3-MoE, OLMoE, ...) these are exactly the experts the token is routed to.

    Args:
        model: a MoE causal LM that accepts ``output_router_logits``.
        batches: collated batches (``input_ids``, optional ``attention_mask``; ``labels``
            are ignored).
        top_k: experts counted per token (default: the config's ``num_experts_per_tok``).
        device: where batches go (default: the model's device).
        total: number of samples, for the progress bar.
        desc: progress bar label (shown on rank 0).

    Returns:
        ``(n, L, E)`` float32 CPU tensor: sample, MoE layer, expert. Each (sample, layer)
        row sums to ``top_k`` x the sample's non-padding tokens.

    Raises:
        SteeringStateError: the model returns no router logits.
    """
    k = _top_k(model, top_k)
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts: list[torch.Tensor] = []
    bar = tqdm(total=total, desc=desc, unit="sample", disable=dist.rank() != 0, leave=False)
    try:
        for batch in batches:
            inputs = {n: v.to(device) for n, v in batch.items() if isinstance(v, torch.Tensor) and n != "labels"}
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            keep = (mask != 0) if mask is not None else torch.ones_like(ids, dtype=torch.bool)
            logits = getattr(model(**inputs, output_router_logits=True), ROUTER_OUTPUT, None)
            layers = [t for t in (logits or ()) if t is not None]
            if not layers:
                raise SteeringStateError(f"{type(model).__name__} returned no router logits: is it a MoE model?")
            counts = []
            for layer in layers:  # (b * T, E), rows in (sample, position) order
                chosen = layer.float().topk(k, dim=-1).indices
                hits = torch.zeros_like(layer, dtype=torch.float32).scatter_(1, chosen, 1.0)
                hits = hits.view(*ids.shape, -1) * keep.unsqueeze(-1)
                counts.append(hits.sum(dim=1))  # (b, E)
            parts.append(torch.stack(counts, dim=1).cpu())
            bar.update(ids.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    if not parts:
        raise SteeringStateError("expert_loads: no samples given")
    return torch.cat(parts)


def normalize_loads(counts: torch.Tensor) -> torch.Tensor:
    """Sum per-sample counts ``(n, L, E)`` over samples and normalise each layer to sum 1.

    Returns:
        ``(L, E)`` float64; a layer that saw no token stays all zero.
    """
    total = counts.double().sum(dim=0)
    return total / total.sum(dim=-1, keepdim=True).clamp_min(1e-300)
