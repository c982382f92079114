"""MoE helpers: routers found by type (never by a "gate" substring), frozen exactly, and
top-k expert loads counted over non-padding tokens."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import default_data_collator

from datasteer.errors import ConfigError, SteeringStateError
from datasteer.ops import ModelOps
from datasteer.ops.moe import expert_loads, find_routers, freeze_routers, normalize_loads, router_classes
from tests.factories import make_dataset, make_model, make_moe_model

ROUTERS = ["model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]


def test_routers_are_found_by_type_not_by_name() -> None:
    model = make_moe_model()
    assert [c.__name__ for c in router_classes(model)] == ["Qwen2MoeTopKRouter"]
    assert list(find_routers(model)) == ROUTERS
    frozen = freeze_routers(model)
    assert frozen == [f"{name}.weight" for name in ROUTERS]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    by_substring = {n for n, _ in model.named_parameters() if "gate" in n}
    # The reference's substring test would also freeze the dense MLP's and the shared
    # expert's gate_proj, the shared-expert gate and the fused expert gate_up_proj.
    assert {
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.0.mlp.shared_expert.gate_proj.weight",
        "model.layers.0.mlp.shared_expert_gate.weight",
        "model.layers.0.mlp.experts.gate_up_proj",
    } <= by_substring & trainable
    assert len(by_substring) == 9 and set(frozen) < by_substring
    assert trainable == {n for n, _ in model.named_parameters()} - set(frozen)


def test_mixtral_routers() -> None:
    model = make_moe_model(kind="mixtral", layers=2)
    assert [c.__name__ for c in router_classes(model)] == ["MixtralTopKRouter"]
    assert list(find_routers(model)) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_through_a_peft_wrapper() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_moe_model(), LoraConfig(r=2, target_modules=["gate_proj", "q_proj"]))
    prefix = "base_model.model."
    assert list(find_routers(model)) == [prefix + name for name in ROUTERS]
    lora_before = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("gate_proj.lora_A" in n for n in lora_before)
    for name in ROUTERS:  # make the routers trainable, as modules_to_save would
        model.get_submodule(prefix + name).weight.requires_grad_(True)
    frozen = freeze_routers(model)
    assert frozen == [f"{prefix}{name}.weight" for name in ROUTERS]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_before


def test_router_names_override() -> None:
    model = make_moe_model()
    assert list(find_routers(model, ["model.layers.2.mlp.gate"])) == ["model.layers.2.mlp.gate"]
    assert list(find_routers(model, ["model.layers.*.mlp.gate"])) == ROUTERS  # whole-name glob: no gate_proj
    with pytest.raises(ConfigError, match=r"router_names.*model\.layers\.9\.mlp\.gate"):
        find_routers(model, ["model.layers.9.mlp.gate"])
    with pytest.raises(ConfigError, match="router_names"):
        find_routers(make_model())  # a dense Llama declares no router


class HandRouted(nn.Module):
    """A 'MoE model' whose two layers route by a fixed table of token -> router logits."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_experts_per_tok=2)
        self.anchor = nn.Parameter(torch.zeros(1))
        big, small = 5.0, 0.0
        # token ids 0..3; layer 0: 1 -> {0, 1}, 2 -> {2, 3}, 3 -> {0, 3}; layer 1: 1 -> {1, 2}, 2 -> {1, 2}, 3 -> {0, 1}
        self.tables = [
            torch.tensor([[big, big, small, small], [big, big, small, 1], [small, 1, big, big], [big, small, 1, big]]),
            torch.tensor([[big, big, small, small], [small, big, big, 1], [1, big, big, small], [big, big, small, 1]]),
        ]

    def forward(self, input_ids: torch.Tensor, output_router_logits: bool = False, **_: Any) -> SimpleNamespace:
        assert output_router_logits and not self.training
        return SimpleNamespace(router_logits=tuple(t[input_ids].reshape(-1, 4) for t in self.tables))


def test_hand_built_router_gives_known_loads() -> None:
    batch = {
        "input_ids": torch.tensor([[1, 1, 2, 0], [3, 2, 0, 0]]),  # 0 = padding (routed to {0, 1}, must not count)
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "labels": torch.tensor([[1, 1, 2, -100], [3, 2, -100, -100]]),
    }
    model = HandRouted()
    model.train()
    counts = expert_loads(model, [batch])
    assert model.training  # restored
    assert counts.tolist() == [
        [[2, 2, 1, 1], [0, 3, 3, 0]],  # sample 0: tokens 1, 1, 2
        [[1, 0, 1, 2], [1, 2, 1, 0]],  # sample 1: tokens 3, 2
    ]
    loads = normalize_loads(counts)
    assert loads.tolist() == [[3 / 10, 2 / 10, 2 / 10, 3 / 10], [1 / 10, 5 / 10, 4 / 10, 0.0]]
    assert loads.sum(dim=1).tolist() == pytest.approx([1.0, 1.0])
    # top_k = 1 counts the first choice only; without attention_mask every token counts.
    assert expert_loads(model, [batch], top_k=1).sum(dim=-1).tolist() == [[3, 3], [2, 2]]
    unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}
    assert expert_loads(model, [unmasked]).sum(dim=-1).tolist() == [[8, 8], [8, 8]]


def test_real_model_loads_are_the_routers_choices_and_ignore_padding() -> None:
    model = make_moe_model(seed=1)
    ids = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    lengths = [7, 4, 2]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    padded = expert_loads(model, [{"input_ids": ids * mask, "attention_mask": mask}])
    assert padded.shape == (3, 2, 4)  # 3 samples, 2 MoE layers (layer 1 is dense), 4 experts
    assert padded.sum(dim=-1).tolist() == [[2.0 * n] * 2 for n in lengths]
    # Each sample alone, unpadded, routed by the router's own top-k (captured from its output).
    chosen: list[torch.Tensor] = []
    hooks = [
        model.get_submodule(name).register_forward_hook(lambda m, i, out: chosen.append(out[2])) for name in ROUTERS
    ]
    with torch.no_grad():
        for row, n in enumerate(lengths):
            chosen.clear()
            model(input_ids=ids[row : row + 1, :n])
            direct = torch.stack([torch.bincount(c.flatten(), minlength=4).float() for c in chosen])
            assert torch.equal(padded[row], direct), row
    for hook in hooks:
        hook.remove()


def test_model_ops_expert_loads_equal_the_direct_pass_in_any_batch_size() -> None:
    model, data = make_moe_model(), make_dataset().remove_columns("domain")
    rows = [0, 5, 41, 70, 79]
    direct = expert_loads(model, [default_data_collator([data[i] for i in rows])])
    for size in (1, 2, 8):
        ops = ModelOps(model, data, default_data_collator, size, torch.device("cpu"))
        torch.testing.assert_close(ops.expert_loads(rows), direct)
    with pytest.raises(SteeringStateError, match="router logits"):
        expert_loads(make_model(), [default_data_collator([data[0]])], top_k=2)
