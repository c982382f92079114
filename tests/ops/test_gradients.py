"""Tests of datasteer.ops.gradients: every method against the batch-size-1 reference."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from datasteer.ops import gradients as gf
from datasteer.ops.gradients import GradFeatureConfig, grad_features, logra_projections, loop_grads, split_batch
from datasteer.ops.losses import IGNORE_INDEX, per_sample_loss
from datasteer.ops.projection import ParamLayout, StreamingProjection
from tests.factories import make_dataset, make_model

PROJ = 48


def batches(n: int = 6, size: int = 3) -> list[dict[str, torch.Tensor]]:
    ds = make_dataset((n,), seed=1)
    out = []
    for start in range(0, n, size):
        rows = ds[start : start + size]
        batch = {k: torch.tensor(rows[k]) for k in ("input_ids", "attention_mask", "labels")}
        if start == 0:  # right padding on one row: masks and ignored labels must be honoured
            batch["attention_mask"][1, 8:] = 0
            batch["labels"][1, 8:] = IGNORE_INDEX
        out.append(batch)
    return out


def lora_model() -> nn.Module:
    # init_lora_weights=False: B != 0, so lora_A gets a non-zero gradient too; dropout checks eval mode.
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5, init_lora_weights=False)
    return get_peft_model(make_model(), config)


MODELS = {"full": make_model, "lora": lora_model}


def features(model: nn.Module, method: str, **kw: object) -> torch.Tensor:
    config = GradFeatureConfig(method=method, proj_dim=PROJ, seed=5, normalize=False, chunk_rows=1000)  # type: ignore[arg-type]
    return grad_features(model, batches(), config, **kw)  # type: ignore[arg-type]


def reference_grads(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per-sample gradients, batch size 1, in eval mode."""
    model.eval()
    out = []
    for batch in batches():
        inputs, labels = split_batch(batch, torch.device("cpu"))
        out += [loop_grads(model, inputs, labels, i) for i in range(labels.shape[0])]
    model.train()
    return out


@pytest.mark.parametrize(("kind", "method"), [(k, m) for k in MODELS for m in ("vmap", "dense")] + [("lora", "hooks")])
def test_batched_methods_equal_loop(kind: str, method: str) -> None:
    model = MODELS[kind]()
    ref = features(model, "loop")
    assert ref.shape == (6, PROJ) and ref.abs().sum() > 0
    torch.testing.assert_close(features(model, method), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", list(MODELS))
def test_loop_equals_flat_gradient_through_materialised_projection(kind: str) -> None:
    model = MODELS[kind]()
    params = gf.trainable_parameters(model)
    layout = ParamLayout.from_named(params.items())
    if kind == "lora":
        assert all("lora_" in name for name in params)
    matrix = StreamingProjection(PROJ, seed=5, chunk_rows=1000).materialize(layout.total)
    flat = torch.cat([layout.flatten(g) for g in reference_grads(model)])
    torch.testing.assert_close(features(model, "loop"), flat @ matrix, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", list(MODELS))
def test_logra_equals_kron_of_linear_weight_gradients(kind: str) -> None:
    model = MODELS[kind]()
    got = features(model, "logra")
    config = GradFeatureConfig(method="logra", proj_dim=PROJ, seed=5)
    layers = logra_projections(model, config)
    weight_names = {id(p): n for n, p in model.named_parameters()}
    expected = torch.stack(
        [
            torch.cat([proj.matrix() @ g[weight_names[id(module.weight)]][0].reshape(-1) for _, module, proj in layers])
            for g in reference_grads(model)
        ]
    )
    k = max(1, int((PROJ // len(layers)) ** 0.5))
    assert got.shape == (6, len(layers) * k * k)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_logra_dims_and_rejects_optimizer() -> None:
    model = make_model()
    config = GradFeatureConfig(method="logra", proj_dim=PROJ, logra_dims=(2, 3))
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert grad_features(model, batches(), config).shape == (6, n_linear * 6)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="logra"):
        grad_features(model, batches(), config, optimizer=opt)


def adam_reference(model: nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    """m_hat / (sqrt(v_hat) + eps) by hand from the optimizer's state, then the dense matrix."""
    params = gf.trainable_parameters(model)
    layout = ParamLayout.from_named(params.items())
    (b1, b2), eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    assert (b1, b2, eps) == (0.8, 0.95, 1e-6)
    rows = []
    for grads in reference_grads(model):
        pre = {}
        for name, p in params.items():
            state = opt.state.get(p, {})  # .get: state is a defaultdict, indexing would add entries
            t = int(state["step"]) if state else 0
            m = state["exp_avg"] if state else torch.zeros_like(p)
            v = state["exp_avg_sq"] if state else torch.zeros_like(p)
            g = grads[name][0]
            m_hat = (b1 * m + (1 - b1) * g) / (1 - b1 ** (t + 1))
            v_hat = (b2 * v + (1 - b2) * g * g) / (1 - b2 ** (t + 1))
            pre[name] = (m_hat / (v_hat.sqrt() + eps)).unsqueeze(0)
        rows.append(layout.flatten(pre))
    matrix = StreamingProjection(PROJ, seed=5, chunk_rows=1000).materialize(layout.total)
    return torch.cat(rows) @ matrix


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    model.train()
    for batch in batches()[:steps]:
        inputs, labels = split_batch(batch, torch.device("cpu"))
        per_sample_loss(model(**inputs).logits, labels)[0].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("steps", [0, 2])
def test_adam_features_match_hand_computation(kind: str, steps: int) -> None:
    model = MODELS[kind]()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1
    )
    train_steps(model, opt, steps)
    before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    expected = adam_reference(model, opt)
    for method in ("loop", "vmap", "dense", *(("hooks",) if kind == "lora" else ())):
        got = features(model, method, optimizer=opt)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # Read only: the optimizer state and the parameters' .grad are untouched.
    assert {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}.keys() == before.keys()
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, before[id(p)][k])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["loop", "vmap", "dense", "hooks", "logra"])
def test_no_grad_left_mode_restored_deterministic(method: str) -> None:
    model = lora_model()
    model.train()
    config = GradFeatureConfig(method=method, proj_dim=PROJ, seed=2)  # type: ignore[arg-type]
    a = grad_features(model, batches(), config)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(a.norm(dim=1), torch.ones(6))  # normalize=True by default
    torch.testing.assert_close(grad_features(model, batches(), config), a, atol=1e-6, rtol=0)
    other = grad_features(model, batches(), GradFeatureConfig(method=method, proj_dim=PROJ, seed=3))  # type: ignore[arg-type]
    assert not torch.allclose(a, other)


def test_vmap_failure_falls_back_to_loop(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    model = make_model()
    ref = features(model, "loop")

    def broken(*args: object) -> None:
        raise RuntimeError("vmap: data-dependent control flow")

    monkeypatch.setattr(gf, "vmap_grads", broken)
    with caplog.at_level(logging.WARNING, logger=gf.__name__):
        got = features(model, "vmap")
    torch.testing.assert_close(got, ref)
    assert "falling back to the loop method" in caplog.text


@pytest.mark.parametrize("method", ["vmap", "dense"])
def test_input_require_grads_hooks_do_not_break_vmap(method: str, caplog: pytest.LogCaptureFixture) -> None:
    """LoRA training setups (LLaMA-Factory's) call ``enable_input_require_grads``; its hook calls
    ``requires_grad_`` inside ``torch.func``. The hook is paused for the pass and restored."""
    model = lora_model()
    ref = features(model, "loop")
    model.enable_input_require_grads()
    model.get_base_model().enable_input_require_grads()  # twice, as LLaMA-Factory then peft do: one hook orphaned
    assert len(model.get_input_embeddings()._forward_hooks) == 2
    with caplog.at_level(logging.WARNING, logger=gf.__name__):
        got = features(model, method)
    assert "falling back" not in caplog.text
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert len(model.get_input_embeddings()._forward_hooks) == 2, "the hooks must be restored"
    embeds = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embeds.requires_grad


@pytest.mark.parametrize("method", ["vmap", "dense"])
def test_vmap_chunk_bounds_the_gradients_held_without_changing_the_rows(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = lora_model()
    held: list[int] = []
    real = gf.vmap_grads

    def spy(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> gf.Grads:
        held.append(labels.shape[0])
        return real(model, inputs, labels)

    monkeypatch.setattr(gf, "vmap_grads", spy)
    whole = grad_features(model, batches(), GradFeatureConfig(method=method, proj_dim=PROJ, vmap_chunk=None))  # type: ignore[arg-type]
    assert held == [3, 3]
    held.clear()
    sliced = grad_features(model, batches(), GradFeatureConfig(method=method, proj_dim=PROJ, vmap_chunk=2))  # type: ignore[arg-type]
    assert held == [2, 1, 2, 1]  # never more than vmap_chunk per-sample gradients at a time
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="vmap_chunk must be >= 1"):
        GradFeatureConfig(vmap_chunk=0)


def test_features_batch_by_batch_equal_the_whole_matrix() -> None:
    config = GradFeatureConfig(method="logra", proj_dim=PROJ)
    model = lora_model()
    blocks = list(gf.iter_grad_features(model, batches(), config))
    assert [len(b) for b in blocks] == [3, 3]
    assert torch.equal(torch.cat(blocks), grad_features(model, batches(), config))


def test_hooks_refuses_a_trainable_parameter_that_is_not_a_linear_weight() -> None:
    """The full tiny model trains its embeddings and norms: hooks cannot give their gradients."""
    with pytest.raises(ValueError, match=r"not an nn.Linear weight.*use method vmap"):
        features(make_model(), "hooks")


def test_hooks_sums_the_calls_of_a_shared_layer() -> None:
    """A layer applied twice in one forward: each sample's gradient is the sum of both uses."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(8, 4).requires_grad_(False)
            self.layer = nn.Linear(4, 4, bias=False)
            self.head = nn.Linear(4, 8, bias=False).requires_grad_(False)

        def forward(self, input_ids: torch.Tensor, **_: object) -> object:
            logits = self.head(self.layer(self.layer(self.embed(input_ids))))
            return type("Out", (), {"logits": logits})()

    torch.manual_seed(0)
    model = Twice()
    ids = torch.randint(0, 8, (3, 5))
    hooks = gf.hook_grads(model, {"input_ids": ids}, ids)
    for i in range(3):
        loop = loop_grads(model, {"input_ids": ids}, ids, i)
        torch.testing.assert_close(hooks["layer.weight"][i], loop["layer.weight"][0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["vmap", "dense", "hooks"])
def test_gradients_buffered_over_batches_give_the_same_rows(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Exact gradients wait over batches and are projected together (one generation of the
    random matrix per buffer, not per batch); the rows do not change."""
    model = lora_model()
    config = GradFeatureConfig(method=method, proj_dim=PROJ, seed=4)  # type: ignore[arg-type]
    monkeypatch.setattr(gf, "PROJECT_BYTES", 1)  # every batch on its own
    alone = list(gf.iter_grad_features(model, batches(), config))
    monkeypatch.setattr(gf, "PROJECT_BYTES", 1 << 30)  # both batches at once
    together = list(gf.iter_grad_features(model, batches(), config))
    assert [len(b) for b in alone] == [3, 3] and [len(b) for b in together] == [6]
    torch.testing.assert_close(torch.cat(together), torch.cat(alone), atol=1e-6, rtol=1e-5)
