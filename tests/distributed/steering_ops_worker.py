"""The model operations of ``dynamic_moe`` (expert loads) and ``nice`` (generation, policy-gradient
features, selection) on a DeepSpeed ZeRO-3 engine or an FSDP2 model (2 CPU processes, gloo), or
on the plain model.

Usage: python -m torch.distributed.run --nproc-per-node 2 steering_ops_worker.py OUT_FILE zero3|fsdp2 moe|nice
       python steering_ops_worker.py OUT_FILE plain moe|nice        (one process, no DeepSpeed)

Each rank saves its results to ``OUT_FILE.rank{r}``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
from tests.distributed.ddp_worker import leave
from tests.distributed.zero3_worker import ZERO3
from tests.factories import (
    DOMAINS,
    VOCAB,
    make_dataset,
    make_model,
    make_moe_model,
    make_sft_dataset,
    mix_context,
    select_context,
)
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import default_data_collator

from datasteer import dist
from datasteer.mixers.dynamic_moe import DynamicMoEMixer, DynamicMoEParams
from datasteer.ops import GradFeatureConfig, ModelOps
from datasteer.ops.policy_gradient import Sampling, sample_responses
from datasteer.ops.rewards import TokenF1, eos_ids, split_prompt_response
from datasteer.ops.sharding import param_sharding
from datasteer.selectors.nice import NiceParams, NiceSelector

CPU = torch.device("cpu")
#: Pool rows whose expert loads are counted: 17 rows, so rank 0 runs 3 batches of 4, rank 1
#: 2 batches and 1 dummy.
MOE_ROWS = list(range(3, 80, 4))[:17]
#: Half the vocabulary ends a response: responses stop early, after different numbers of
#: forward passes on the two ranks. (The targets' reference answers, ids of the domain
#: gamma's band 42..62, hold none of them.)
EOS = list(range(VOCAB // 2))
SAMPLING = Sampling(mc_samples=2, max_new_tokens=8)


def shard(model: nn.Module, engine: str) -> nn.Module:
    """The model as ``engine`` holds it: ``plain`` as is, ``fsdp2`` each decoder layer and the
    root ``fully_shard``-ed, ``zero3`` the module of a DeepSpeed ZeRO-3 engine (every parameter
    partitioned, see :data:`ZERO3`)."""
    if engine == "plain":
        return model
    if engine == "fsdp2":
        torch.distributed.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for layer in model.get_decoder().layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ZERO3)
    module: nn.Module = wrapped.module
    assert all(p.numel() == 0 for p in module.parameters())  # nothing resident, routers included
    return module


def topk_margin(model: nn.Module, batches: Any, k: int) -> float:
    """The smallest gap, over tokens and MoE layers, between the k-th and (k+1)-th router logit:
    how far the plain model's expert choices are from a tie."""
    gaps = []
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], output_router_logits=True).router_logits
            for layer in logits:
                top = layer.float().topk(k + 1, dim=-1).values
                gaps.append((top[:, k - 1] - top[:, k]).min())
    return float(torch.stack(gaps).min())


def run_moe(engine: str) -> dict[str, Any]:
    """Expert loads as ``dynamic_moe`` counts them, the mixer's domain loads and its update."""
    mixer = DynamicMoEMixer(DynamicMoEParams(source="pool", samples_per_domain=3, layer=None))
    model = make_moe_model()
    mixer.prepare_model(model)  # the routers are frozen before the engine is built, as in a run
    module = shard(model, engine)
    assert param_sharding(module) == ("none" if engine == "plain" else engine)
    ops = ModelOps(module, make_dataset(), default_data_collator, batch_size=4, device=CPU)
    result: dict[str, Any] = {"counts": ops.expert_loads(MOE_ROWS)}
    # 9 held-out rows (3 per domain): rank 0 runs 2 batches, rank 1 1 batch and 1 dummy.
    ctx = mix_context(names=DOMAINS, sizes=(40, 24, 16), ops=ops, seed=9)
    result["domain_loads"] = mixer.domain_loads(ctx)
    result["held_out"] = mixer.held_out
    result["proportions"] = mixer.update(ctx)
    if engine == "plain":
        result["margin"] = topk_margin(module, ops.batches(MOE_ROWS), k=2)
    return result


class RecordingReward:
    """:class:`TokenF1`, keeping each prompt's sampled responses (the reference comes last)."""

    def __init__(self, eos: frozenset[int]) -> None:
        self.reward = TokenF1(eos)
        self.calls: list[tuple[list[int], list[list[int]]]] = []

    def __call__(self, prompt: list[int], responses: list[list[int]], reference: list[int]) -> torch.Tensor:
        self.calls.append((prompt, responses[:-1]))
        return self.reward(prompt, responses, reference)


def all_ranks(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if not dist.is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def run_nice(engine: str) -> dict[str, Any]:
    """NICE's sampling of the targets' responses, its policy-gradient features and its selection."""
    model = make_model()
    model.generation_config.eos_token_id = EOS
    module = shard(model, engine)
    eos = eos_ids(module)
    targets = make_sft_dataset(sizes=(0, 0, 5), seed=1)
    # 5 targets in groups of 3 // (2 + 1) = 1: rank 0 samples 3 groups, rank 1 2 groups and 1 dummy.
    target_ops = ModelOps(module, targets, default_data_collator, batch_size=3, device=CPU, name="gamma_eval")
    pool_ops = ModelOps(module, make_dataset(), default_data_collator, batch_size=4, device=CPU, targets=[target_ops])
    prompts = [split_prompt_response(targets[i])[0] for i in range(len(targets))]
    # Generation itself, straight through the engine's hooks: rank 0 samples 3 prompts, rank 1
    # 2 (the plain model both batches), whose responses end after different numbers of steps.
    shares = [prompts[:3], prompts[3:]]
    if engine == "plain":
        generated = [sample_responses(module, share, SAMPLING, 11, eos) for share in shares]
    else:
        generated = all_ranks(sample_responses(module, shares[dist.rank()], SAMPLING, 11, eos))
    result: dict[str, Any] = {"generated": generated}
    for method in ("logra", "vmap"):  # through the engine's hooks, then on gathered parameters
        reward = RecordingReward(eos)
        config = GradFeatureConfig(method=method, proj_dim=64, normalize=False)
        features, no_signal = target_ops.policy_gradient_features(
            range(len(targets)), config, reward=reward, sampling=SAMPLING, seed=5
        )
        result[method] = {"features": features, "no_signal": no_signal, "sampled": all_ranks(reward.calls)}
    params = NiceParams(method="logra", adam=False, proj_dim=64, reward="token_f1", mc_samples=2, max_new_tokens=8)
    result["selected"] = NiceSelector(params).select(select_context(num_samples=10, ops=pool_ops, seed=9))
    return result


def main() -> tuple[dict[str, Any], str]:
    out, engine, task = sys.argv[1], sys.argv[2], sys.argv[3]
    result = run_moe(engine) if task == "moe" else run_nice(engine)
    return result, f"{out}.rank{dist.rank()}"


if __name__ == "__main__":
    # The model is released when main returns, before the group is destroyed; a ZeRO-3 engine
    # is not: DeepSpeed keeps its model in parameter_offload.FWD_MODULE_STACK for good.
    torch.save(*main())
    leave()
