"""Per-sample gradient features: projected (optionally Adam-preconditioned) gradients.

A sample's loss is its token-mean shifted cross-entropy (:func:`per_sample_loss`); the
gradient is taken w.r.t. the model's trainable parameters only (e.g. the LoRA weights).
Four methods, one entry point (:func:`grad_features`):

* ``loop``: the reference. One sample at a time, ``torch.autograd.grad``, then the
  streaming projection (:class:`StreamingProjection`) block by block.
* ``vmap``: ``torch.func.vmap(torch.func.grad(loss of one sample))`` over the batch with
  ``functional_call`` on the trainable parameters (the frozen ones stay the module's own
  and act as constants), projected parameter by parameter. Falls back to ``loop`` with a
  warning when the model cannot be vmapped.
* ``dense``: the same per-sample gradients flattened to ``(n, D)`` and projected chunk by
  chunk; one matmul per chunk, best when ``D`` is small (LoRA).
* ``hooks``: the same exact per-sample gradients from one batched forward and one
  backward of the *sum* of the per-sample losses (as ``logra``): for a trainable
  ``nn.Linear`` weight, sample ``i``'s gradient is ``sum_t delta_it^T x_it`` over its
  positions, from the layer's captured input ``x`` and output gradient ``delta`` (the
  per-sample-gradient trick of Goodfellow, arXiv 1510.01799, as in Opacus). It costs about
  one training step instead of ``vmap``'s per-sample forwards, and needs every trainable
  parameter to be such a weight (LoRA's ``lora_A``/``lora_B`` are); Adam preconditioning
  and the projection are then those of ``vmap``.
* ``logra`` (arXiv 2405.13954): one forward and one backward of the *sum* of the batch's
  per-sample losses. Samples do not interact, so the gradient of that sum w.r.t. a
  sample's layer output is that sample's own ``delta``; with the captured layer inputs,
  each trainable ``nn.Linear`` weight's gradient is projected in Kronecker form
  (:class:`KroneckerProjection`) without forming it. Only trainable ``nn.Linear``
  *weights* take part: biases, embeddings, norms and any other trainable tensor are left
  out. Feature width: ``L * k_in * k_out`` over the ``L`` layers, with ``(k_in, k_out)``
  from ``logra_dims`` or, by default, ``k_in = k_out = isqrt(proj_dim // L)`` (so at most
  ``proj_dim``); :func:`logra_projections` lists the layers and their factors. The
  backward asks for gradients w.r.t. the captured layer outputs only, so no weight
  gradient is computed and no ``.grad`` is written.

Adam preconditioning (LESS, arXiv 2402.04333), for ``loop``/``vmap``/``dense``: with the
optimizer's live ``exp_avg`` m, ``exp_avg_sq`` v and ``step`` t per parameter and its
group's betas and eps, a sample's gradient g becomes ``m_hat / (sqrt(v_hat) + eps)`` with
``m_hat = (b1 m + (1 - b1) g) / (1 - b1^(t+1))`` and ``v_hat = (b2 v + (1 - b2) g^2) /
(1 - b2^(t+1))``: the update one more Adam step on this sample would make (up to the
learning rate; decoupled weight decay does not depend on the sample). It is elementwise
on the full gradient, which ``logra`` never forms, so ``logra`` rejects an optimizer.

Nothing here calls ``backward()``, writes ``.grad`` or steps the optimizer; the model runs
in eval mode (no dropout) and gets its mode back.

Distributed use: the function works on the batches it is given, so a caller gives each
rank its own subset of samples and gathers the ``(n, k)`` rows (the projection is the
same on every rank). Under ZeRO-3 / FSDP2, ``logra`` runs the model through the engine's
hooks (they gather parameters layer by layer); ``vmap``/``dense``/``loop`` need whole
parameters, which :meth:`datasteer.ops.ModelOps.gradient_features` provides with
:func:`datasteer.ops.sharding.full_parameters`. The Adam state is sharded there, so the
Adam variant is refused (see :mod:`datasteer.ops.sharding`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask

from datasteer import dist
from datasteer.ops.keys import INDEX_KEY
from datasteer.ops.losses import per_sample_loss
from datasteer.ops.projection import (
    DEFAULT_CHUNK_ROWS,
    KroneckerProjection,
    ParamLayout,
    ProjectionKind,
    StreamingProjection,
)

logger = logging.getLogger(__name__)

K = TypeVar("K")

GradMethod = Literal["vmap", "loop", "logra", "dense", "hooks", "auto"]

#: Bytes of exact per-sample gradients buffered before they are projected together.
PROJECT_BYTES = 256 << 20

#: Per-sample gradients that ``vmap``/``dense`` materialise at a time, by default.
DEFAULT_VMAP_CHUNK = 8
Grads = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GradFeatureConfig:
    """How gradient features are computed.

    Attributes:
        method: ``"vmap"``, ``"loop"``, ``"dense"``, ``"hooks"``, ``"logra"`` (see the module
            docstring) or ``"auto"`` (``hooks`` where it applies, else ``vmap``).
        proj_dim: feature width ``k`` (``logra``: an upper bound, see ``logra_dims``).
        seed: seeds the projection; equal seeds give equal projections everywhere.
        projection: ``"rademacher"`` or ``"gaussian"`` entries.
        normalize: L2-normalise each feature row (cosine-ready, as LESS does).
        chunk_rows: rows of the streaming projection generated at a time.
        logra_dims: ``(k_in, k_out)`` per linear layer for ``logra``; ``None`` derives
            ``k_in = k_out = isqrt(proj_dim // L)``.
        vmap_chunk: samples whose per-sample gradients ``vmap``/``dense`` materialise at a
            time (each batch is cut into slices of this many, projected one after the
            other), so vmap's own memory is about ``vmap_chunk`` x the trainable parameters
            whatever the batch size; ``None``: the whole batch at once. The gradients then
            wait, over batches, until ``PROJECT_BYTES`` (256 MiB) of them are projected at once.
    """

    method: GradMethod = "vmap"
    proj_dim: int = 8192
    seed: int = 0
    projection: ProjectionKind = "rademacher"
    normalize: bool = True
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    logra_dims: tuple[int, int] | None = None
    vmap_chunk: int | None = DEFAULT_VMAP_CHUNK

    def __post_init__(self) -> None:
        if self.method not in ("vmap", "loop", "logra", "dense", "hooks", "auto"):
            raise ValueError(f"method must be one of vmap, loop, logra, dense; got {self.method!r}")
        if self.proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1, got {self.proj_dim}")
        if self.vmap_chunk is not None and self.vmap_chunk < 1:
            raise ValueError(f"vmap_chunk must be >= 1 or None, got {self.vmap_chunk}")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters with ``requires_grad``, in ``named_parameters`` order (the flat layout)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameter (requires_grad=True)")
    return params


def split_batch(batch: Mapping[str, Any], device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(model inputs, labels)`` on ``device`` from a collated batch (non-tensor keys dropped)."""
    inputs = {
        k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in ("labels", INDEX_KEY)
    }
    return inputs, batch["labels"].to(device)


def _sample_loss(model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    # use_cache=False: a KV cache is useless here and its creation breaks under vmap.
    logits = model(**inputs, use_cache=False).logits
    return per_sample_loss(logits, labels)[0]


def loop_grads(model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, index: int) -> Grads:
    """Gradient of sample ``index``'s loss (batch size 1), each ``(1, *shape)``."""
    params = trainable_parameters(model)
    one = {k: v[index : index + 1] for k, v in inputs.items()}
    loss = _sample_loss(model, one, labels[index : index + 1])[0]
    got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {
        name: (torch.zeros_like(p) if g is None else g).unsqueeze(0)
        for (name, p), g in zip(params.items(), got, strict=True)
    }


def _prepare_attention_mask(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace a 2D padding mask by the model's own 4D causal mask, built outside ``vmap``.

    HF's mask builder inspects the mask's values (``padding_mask.all()``) to skip it, which
    ``vmap`` cannot trace; a prepared 4D mask is passed through unchanged by the model.
    When it is not needed (no padding) the builder returns ``None`` and the key is dropped.
    """
    config = getattr(model, "config", None)
    mask = inputs.get("attention_mask")
    if not isinstance(config, PretrainedConfig) or mask is None or mask.dim() != 2:
        return inputs
    dtype = next(model.parameters()).dtype
    embeds = torch.empty(*inputs["input_ids"].shape, 0, dtype=dtype, device=mask.device)
    mask4 = create_causal_mask(
        config=config, inputs_embeds=embeds, attention_mask=mask, past_key_values=None, position_ids=None
    )
    out = {k: v for k, v in inputs.items() if k != "attention_mask"}
    if isinstance(mask4, torch.Tensor):
        out["attention_mask"] = mask4
    return out


def vmap_grads(model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> Grads:
    """Per-sample gradients of the whole batch with ``vmap(grad)``, each ``(n, *shape)``."""
    params = {name: p.detach() for name, p in trainable_parameters(model).items()}
    prepared = _prepare_attention_mask(model, dict(inputs))

    def loss_of_one(p: Grads, one: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        batched = {k: v.unsqueeze(0) for k, v in one.items()}
        logits = functional_call(model, p, args=(), kwargs={**batched, "use_cache": False}).logits
        return per_sample_loss(logits, label.unsqueeze(0))[0][0]

    with warnings.catch_warnings():
        # Some kernels (CPU SDPA) have no batching rule; vmap loops over them, correctly.
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        out: Grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, prepared, labels)
    return out


def linear_weights(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` module of every trainable parameter, by parameter name.

    Raises:
        ValueError: a trainable parameter is not the weight of an ``nn.Linear`` (a bias,
            an embedding, a norm), which the ``hooks`` method cannot differentiate.
    """
    owners = {
        f"{name}.weight" if name else "weight": m for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    out = {}
    for name in trainable_parameters(model):
        if name not in owners:
            raise ValueError(
                f"gradient method hooks: trainable parameter {name!r} is not an nn.Linear weight "
                "(hooks covers LoRA and other linear-only adapters); use method vmap"
            )
        out[name] = owners[name]
    return out


def resolve_auto(model: nn.Module) -> GradMethod:
    """``auto``: ``hooks`` when every trainable parameter is an ``nn.Linear`` weight (LoRA),
    else ``vmap``; both give the same exact per-sample gradients."""
    try:
        linear_weights(model)
    except ValueError:
        return "vmap"
    return "hooks"


def hook_grads(model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> Grads:
    """Exact per-sample gradients of trainable ``nn.Linear`` weights, each ``(n, out, in)``,
    from one forward and one backward of the batch (see the module docstring)."""
    layers = linear_weights(model)
    n = labels.shape[0]
    grads: Grads = {name: torch.zeros(n, *m.weight.shape, device=m.weight.device) for name, m in layers.items()}
    for name, x, delta in _linear_deltas(model, inputs, labels, list(layers.items())):
        grads[name] += torch.einsum("b...o,b...i->boi", delta.float(), x.float())
    return grads


def _linear_deltas(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, layers: Sequence[tuple[K, nn.Module]]
) -> Iterator[tuple[K, torch.Tensor, torch.Tensor]]:
    """``(key, x, delta)`` of every call of each layer in one forward of the batch: its input
    and the gradient of the summed per-sample losses w.r.t. its output (per sample, since
    samples do not interact). A layer called more than once (weight sharing) yields once
    per call; a call the loss does not reach yields nothing."""
    captured: list[tuple[K, torch.Tensor, torch.Tensor]] = []

    def hook_for(key: K) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            captured.append((key, args[0].detach(), output))

        return hook

    handles = [module.register_forward_hook(hook_for(key)) for key, module in layers]
    try:
        total = _sample_loss(model, inputs, labels).sum()
    finally:
        for handle in handles:
            handle.remove()
    deltas = torch.autograd.grad(total, [out for _, _, out in captured], allow_unused=True)
    for (key, x, _out), delta in zip(captured, deltas, strict=True):
        if delta is not None:
            yield key, x, delta


def adam_transform(grads: Grads, model: nn.Module, optimizer: torch.optim.Optimizer) -> Grads:
    """Per-sample gradients -> the Adam update one more step on each sample would make.

    Reads each parameter's live ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with
    amsgrad), ``step`` and its group's ``betas``/``eps``; parameters without state yet use
    ``m = v = 0, t = 0``.

    Raises:
        TypeError: a parameter group has no ``betas``/``eps`` (not an Adam-family optimizer).
        ValueError: a trainable parameter is not in the optimizer.
    """
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out: Grads = {}
    for name, p in trainable_parameters(model).items():
        group = groups.get(id(p))
        if group is None:
            raise ValueError(f"trainable parameter {name!r} is not in the optimizer")
        if "betas" not in group or "eps" not in group:
            raise TypeError(f"Adam preconditioning needs an Adam/AdamW optimizer; group of {name!r} has no betas/eps")
        (b1, b2), eps = group["betas"], float(group["eps"])
        g = grads[name].float()
        state = optimizer.state.get(p, {})
        t = int(state["step"]) if "step" in state else 0
        m = state["exp_avg"].to(g.device, torch.float32) if t else torch.zeros_like(g[0])
        v = state["exp_avg_sq"].to(g.device, torch.float32) if t else torch.zeros_like(g[0])
        m_new = b1 * m + (1 - b1) * g
        v_new = b2 * v + (1 - b2) * g.square()
        if group.get("amsgrad", False) and t:
            # torch's amsgrad divides by the running max of v, not v itself.
            v_new = torch.maximum(state["max_exp_avg_sq"].to(g.device, torch.float32), v_new)
        m_hat = m_new / (1 - b1 ** (t + 1))
        v_hat = v_new / (1 - b2 ** (t + 1))
        out[name] = m_hat / (v_hat.sqrt() + eps)
    return out


def logra_projections(model: nn.Module, config: GradFeatureConfig) -> list[tuple[str, nn.Linear, KroneckerProjection]]:
    """The trainable ``nn.Linear`` layers (module order) and their seeded Kronecker factors."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    if not layers:
        raise ValueError("logra needs at least one nn.Linear with a trainable weight")
    if config.logra_dims is not None:
        k_in, k_out = config.logra_dims
    else:
        k_in = k_out = max(1, math.isqrt(config.proj_dim // len(layers)))
    return [
        (
            name,
            module,
            KroneckerProjection.create(
                module.in_features, module.out_features, k_in, k_out, seed=config.seed, key=name, kind=config.projection
            ),
        )
        for name, module in layers
    ]


def logra_batch_features(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    layers: list[tuple[str, nn.Linear, KroneckerProjection]],
) -> torch.Tensor:
    """LoGra features ``(n, sum of layer widths)`` of one batch: one forward, one backward."""
    n = labels.shape[0]
    feats = [torch.zeros(n, proj.dim, device=labels.device) for _, _, proj in layers]
    # A layer called more than once per forward (weight sharing) sums its contributions.
    modules = [(i, module) for i, (_, module, _) in enumerate(layers)]
    for layer, x, delta in _linear_deltas(model, inputs, labels, modules):
        feats[layer] += layers[layer][2].project(x, delta)
    return torch.cat(feats, dim=1)


def _loop_features(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    layout: ParamLayout,
    projection: StreamingProjection,
) -> torch.Tensor:
    """``loop`` features of one batch: one sample at a time (the other exact methods go
    through :func:`_exact_grads` and are projected over several batches at once)."""
    rows = []
    for i in range(labels.shape[0]):
        g = loop_grads(model, inputs, labels, i)
        g = adam_transform(g, model, optimizer) if optimizer is not None else g
        rows.append(layout.project(g, projection))
    return torch.cat(rows)


def _exact_grads(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    config: GradFeatureConfig,
    optimizer: torch.optim.Optimizer | None,
) -> Grads:
    """The batch's per-sample gradients (``vmap``/``dense``: in slices of ``vmap_chunk``;
    ``hooks``), Adam-preconditioned when an optimizer is given."""
    n = labels.shape[0]
    step = n if config.vmap_chunk is None else config.vmap_chunk
    parts: list[Grads] = []
    for start in range(0, n, step):
        part = {k: v[start : start + step] for k, v in inputs.items()}
        per_sample = hook_grads if config.method == "hooks" else vmap_grads
        grads = per_sample(model, part, labels[start : start + step])
        parts.append(adam_transform(grads, model, optimizer) if optimizer is not None else grads)
    return _concat(parts)


def _concat(parts: list[Grads]) -> Grads:
    return parts[0] if len(parts) == 1 else {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def _project(
    grads: Grads, config: GradFeatureConfig, layout: ParamLayout, projection: StreamingProjection
) -> torch.Tensor:
    if config.method == "dense":
        return projection.project(layout.flatten(grads).float())
    return layout.project(grads, projection)


#: Names of the embedding forward hooks that transformers (``enable_input_require_grads``) and
#: peft register so that LoRA / gradient checkpointing see inputs that require grad.
INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


@contextlib.contextmanager
def input_grad_hooks_paused(model: nn.Module) -> Iterator[None]:
    """Take the input-require-grad hooks off every embedding for the duration.

    They call ``requires_grad_`` on the embeddings' output, which ``torch.func`` transforms
    forbid, and gradients w.r.t. the parameters do not need them. They are found on the
    modules themselves rather than through ``disable_input_require_grads``: a model on
    which ``enable_input_require_grads`` ran twice (LLaMA-Factory, then peft) keeps an
    earlier hook that no handle refers to any more. Each module's hooks are restored, in
    order, afterwards.
    """
    saved = []
    for module in model.modules():
        if not isinstance(module, nn.Embedding) or not module._forward_hooks:
            continue
        hooks = dict(module._forward_hooks)
        keep = {k: h for k, h in hooks.items() if getattr(h, "__name__", "") not in INPUT_GRAD_HOOKS}
        if len(keep) < len(hooks):
            saved.append((module, hooks))
            module._forward_hooks.clear()
            module._forward_hooks.update(keep)
    try:
        yield
    finally:
        for module, hooks in saved:
            module._forward_hooks.clear()
            module._forward_hooks.update(hooks)


def iter_grad_features(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    config: GradFeatureConfig | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    desc: str = "gradient features",
) -> Iterator[torch.Tensor]:
    """Projected per-sample gradient features of each batch in ``batches``, one batch at a time.

    The arguments are :func:`grad_features`'s. Each yield is the ``(b, k)`` float32 CPU
    rows of one batch (normalised row by row under ``config.normalize``), so a caller can
    write them out without holding them all. The model is in eval mode between yields.
    """
    config = config or GradFeatureConfig()
    if config.method == "auto":
        config = GradFeatureConfig(**{**config.__dict__, "method": resolve_auto(model)})
    if optimizer is not None and config.method == "logra":
        raise ValueError("logra cannot be Adam-preconditioned (elementwise on the full gradient); use vmap or loop")
    params = trainable_parameters(model)
    device = next(iter(params.values())).device
    layout = ParamLayout.from_named(params.items())
    projection = StreamingProjection(config.proj_dim, config.seed, config.projection, config.chunk_rows)
    layers = logra_projections(model, config) if config.method == "logra" else []
    method = config.method
    was_training = model.training
    model.eval()
    try:
        total = len(batches) if isinstance(batches, Sized) else None
        paused = input_grad_hooks_paused(model) if method in ("vmap", "dense") else contextlib.nullcontext()
        with paused:
            # Exact per-sample gradients are buffered over batches and projected together, up
            # to PROJECT_BYTES: the projection's random matrix is then generated once per
            # buffer rather than once per batch (for LoRA on a real model, most of the cost).
            pending: list[Grads] = []
            budget = max(1, PROJECT_BYTES // (4 * max(1, layout.total)))
            for batch in tqdm(batches, total=total, desc=desc, disable=dist.rank() != 0, leave=False):
                with torch.enable_grad():
                    inputs, labels = split_batch(batch, device)
                    if method in ("vmap", "dense", "hooks"):
                        try:
                            pending.append(_exact_grads(model, inputs, labels, config, optimizer))
                        except RuntimeError as err:
                            if method == "hooks":
                                raise
                            logger.warning("%s gradients failed (%s); falling back to the loop method", method, err)
                            yield from _flushed(pending, config, layout, projection)
                            method = "loop"
                            config = GradFeatureConfig(**{**config.__dict__, "method": "loop"})
                        else:
                            if sum(len(next(iter(g.values()))) for g in pending) >= budget:
                                yield from _flushed(pending, config, layout, projection)
                            continue
                    if method == "logra":
                        feats = logra_batch_features(model, inputs, labels, layers)
                    else:
                        feats = _loop_features(model, inputs, labels, optimizer, layout, projection)
                    rows = feats.detach().float().cpu()
                # Row by row, so a batch's rows equal those of the whole matrix normalised at once.
                yield torch.nn.functional.normalize(rows, dim=1) if config.normalize else rows
            yield from _flushed(pending, config, layout, projection)
    finally:
        model.train(was_training)


def _flushed(
    pending: list[Grads], config: GradFeatureConfig, layout: ParamLayout, projection: StreamingProjection
) -> Iterator[torch.Tensor]:
    """The projected rows of the buffered gradients (emptied), normalised row by row."""
    if not pending:
        return
    rows = _project(_concat(pending), config, layout, projection).detach().float().cpu()
    pending.clear()
    yield torch.nn.functional.normalize(rows, dim=1) if config.normalize else rows


def grad_features(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    config: GradFeatureConfig | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    desc: str = "gradient features",
) -> torch.Tensor:
    """Projected per-sample gradient features of every sample in ``batches``.

    Holds every row; :func:`iter_grad_features` yields them batch by batch instead.

    Args:
        model: the live model (HF causal LM, with or without a peft adapter).
        batches: collated batches with ``input_ids``, ``attention_mask``, ``labels`` (other
            tensor keys go to the model; ``datasteer_index`` is dropped).
        config: method, projection and normalisation (default :class:`GradFeatureConfig`).
        optimizer: an Adam/AdamW optimizer whose live state preconditions the gradients
            (``None``: plain gradients). Only read, never stepped.
        desc: progress bar label.

    Returns:
        ``(n, k)`` float32 CPU tensor, rows in batch order.
    """
    config = config or GradFeatureConfig()
    rows = list(iter_grad_features(model, batches, config, optimizer=optimizer, desc=desc))
    if rows:
        return torch.cat(rows)
    width = StreamingProjection(config.proj_dim, config.seed, config.projection, config.chunk_rows).out_dim
    return torch.empty(0, width)
