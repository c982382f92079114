"""Which engine shards a model's parameters, and how the model operations work around it.

Under DeepSpeed ZeRO-3 and FSDP2 (``torch.distributed.fsdp.fully_shard``) every rank holds
a slice of each parameter; hooks gather a module's parameters for its forward and
backward and free them afterwards. Two consequences for :class:`datasteer.ops.ModelOps`:

* Those gathers are collective, so every rank must run the same number of forward (and
  backward) passes: a rank with a shorter share of samples pads it with dummy batches
  whose results it drops (:func:`padded_batch_count`).
* ``torch.func.functional_call`` (used by the ``vmap`` / ``dense`` gradient features)
  swaps the module's parameters for traced tensors, which the engines' per-module hooks
  cannot handle (DeepSpeed's fetch expects ZeRO parameters; FSDP's unshard would put its
  own parameters back over the traced ones). :func:`full_parameters` therefore makes the
  parameters whole once for the pass (ZeRO-3: a read-only coalesced
  ``deepspeed.zero.GatheredParameters`` with ``modifier_rank=None``; FSDP2: ``unshard()``)
  and takes the engine's forward hooks out meanwhile, so the model behaves as the
  unsharded one and gives the same features (to float rounding; the test checks 1e-5).
  The other choice, projecting each rank's parameter shard locally and all-reducing the
  projected rows, was not taken: it needs every rank to run every sample (not a share)
  and still needs the full per-sample gradient inside the forward. The cost of the
  choice is the whole model on each rank for the duration of the pass (fine for the
  models these methods suit, and for LoRA); for a model too large for that, the ``logra``
  method runs through the engine's own layer-by-layer gathering and never holds more than
  a layer's parameters (it needs no parameter gradient at all).

Nothing here writes ``.grad``, touches the engine's gradient buffers or steps an optimizer.
After a pass through the hooks the engines keep their usual state: DeepSpeed may leave a
few prefetched parameters gathered (and, after a ``logra`` backward, the parameters of
modules whose inputs need no gradient, e.g. the first LoRA layers) until its next
forward/backward, and FSDP keeps the root module unsharded after a forward, exactly as
after their own evaluation passes.

Detection is by type, not by probing: a ZeRO-3 parameter is one DeepSpeed's own
``is_zero_param`` recognises (checked only when DeepSpeed was imported), an FSDP2 one is
a ``DTensor``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Literal

from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

ParamSharding = Literal["none", "zero3", "fsdp2"]

__all__ = ["ParamSharding", "full_parameters", "padded_batch_count", "param_sharding"]


def param_sharding(model: nn.Module) -> ParamSharding:
    """``"zero3"`` (DeepSpeed ZeRO-3 partitioned), ``"fsdp2"`` (DTensor shards) or ``"none"``."""
    if "deepspeed" in sys.modules:  # a ZeRO-3 model exists only once DeepSpeed was imported
        from deepspeed.runtime.zero.utils import is_zero_param

        if any(is_zero_param(p) for p in model.parameters()):
            return "zero3"
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "fsdp2"
    return "none"


def padded_batch_count(total: int, world: int, batch_size: int) -> int:
    """Batches every rank runs so that the ranks' collective gathers line up.

    Shares are contiguous with ``ceil(total / world)`` items on the first ranks
    (:func:`datasteer.dist.shard_bounds`), so the largest share sets the count.
    """
    per = -(-total // world)
    return -(-per // batch_size)


@contextlib.contextmanager
def _without_forward_hooks(model: nn.Module, package: str) -> Iterator[None]:
    """Suspend the forward (pre-)hooks that functions of ``package`` registered on any submodule."""

    def owned(hook: object) -> bool:
        return str(getattr(hook, "__module__", "")).startswith(package)

    # The hooks are put back in their original order (dict insertion order is the call order).
    saved = []
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            if any(owned(h) for h in hooks.values()):
                saved.append((hooks, dict(hooks)))
                for key in [k for k, h in hooks.items() if owned(h)]:
                    del hooks[key]
    try:
        yield
    finally:
        for hooks, original in saved:
            hooks.clear()
            hooks.update(original)


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Within the block the model's parameters are whole on every rank, and read-only.

    ZeRO-3: one coalesced read-only gather of the partitioned parameters, DeepSpeed's
    forward hooks suspended (no per-module fetch or release, so no collective inside the
    block), the partitions restored on exit unchanged. FSDP2: every FSDP module unsharded,
    FSDP's forward hooks suspended, resharded on exit. Unsharded models: nothing to do.
    """
    kind = param_sharding(model)
    if kind == "none":
        yield
        return
    if kind == "fsdp2":
        # unshard() gathers each FSDP module's parameters and registers them as plain
        # parameters until reshard() puts the DTensor shards back.
        fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for module in fsdp_modules:
            module.unshard()
        try:
            with _without_forward_hooks(model, "torch.distributed.fsdp."):
                yield
        finally:
            for module in fsdp_modules:
                module.reshard()
        return
    import deepspeed
    from deepspeed.runtime.zero import ZeroParamStatus

    # Only the partitioned ones: parameters DeepSpeed already holds whole (persistent ones,
    # or ones a backward through its hooks left gathered) stay in its own bookkeeping.
    partitioned = [p for p in model.parameters() if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]  # type: ignore[attr-defined]
    gathered = deepspeed.zero.GatheredParameters(partitioned, enabled=bool(partitioned), modifier_rank=None)
    with gathered, _without_forward_hooks(model, "deepspeed."):
        yield
