"""Model operations on a DeepSpeed ZeRO-3 engine or an FSDP2 model (2 CPU processes, gloo),
or on the plain model.

Usage: python -m torch.distributed.run --nproc-per-node 2 zero3_worker.py OUT_FILE zero3 [lora]
       python -m torch.distributed.run --nproc-per-node 2 zero3_worker.py OUT_FILE fsdp2 [lora]
       python zero3_worker.py OUT_FILE plain [lora]        (one process, no DeepSpeed)

Each rank saves the gathered results (and, under ZeRO-3, what it checked about the
engine's state) to ``OUT_FILE.rank{r}``.
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
from peft import LoraConfig, get_peft_model
from tests.distributed.ddp_worker import leave
from tests.factories import make_dataset, make_model
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import default_data_collator

from datasteer.errors import ConfigError
from datasteer.ops import GradFeatureConfig, ModelOps
from datasteer.ops.sharding import param_sharding

ZERO3 = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    # Threshold 0: no parameter stays resident, so every one is really partitioned.
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
}
METHODS = {  # logra (through DeepSpeed's hooks) first, then the gathered passes
    "logra": GradFeatureConfig(method="logra", proj_dim=64),
    "vmap": GradFeatureConfig(method="vmap", proj_dim=32),
    "dense": GradFeatureConfig(method="dense", proj_dim=32),
    "loop": GradFeatureConfig(method="loop", proj_dim=16),
}


def build(lora: bool) -> nn.Module:
    model = make_model()
    if not lora:
        return model
    with torch.random.fork_rng():
        torch.manual_seed(1)
        # init_lora_weights=False: B is random too, so every LoRA gradient is non-zero.
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        return get_peft_model(model, config)


def run_ops(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    ops = ModelOps(model, make_dataset(), default_data_collator, batch_size=4, device=torch.device("cpu"))
    indices = list(range(3, 40, 2))  # 19 samples: rank 0 runs 3 batches, rank 1 2 batches + 1 dummy
    result = {name: ops.gradient_features(indices, config) for name, config in METHODS.items()}
    # After the last gathered pass (loop) every parameter is back to its empty partition. (DeepSpeed's
    # prefetching may leave a few gathered after the no-grad passes below, as in its own evaluation.)
    if param_sharding(model) == "zero3":
        result["partitioned"] = torch.tensor(all(p.numel() == 0 for p in model.parameters()))
    if param_sharding(model) == "fsdp2":
        result["partitioned"] = torch.tensor(all(isinstance(p, DTensor) for p in model.parameters()))
    result["losses"] = ops.sample_losses(indices)
    result["embeddings"] = ops.embeddings(indices, pooling="weighted")
    if optimizer is not None:
        try:
            ops.gradient_features(indices[:2], METHODS["vmap"], optimizer=optimizer)
        except ConfigError:
            result["adam_rejected"] = torch.tensor(1)
    return result


def run_fsdp2(model: nn.Module) -> dict[str, Any]:
    torch.distributed.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert param_sharding(model) == "fsdp2"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    result = run_ops(model, optimizer)
    # FSDP keeps the root's parameters unsharded after a forward (as in its own evaluation): compare values.
    checks = {
        "unchanged": all(torch.equal(whole(p), full[n]) for n, p in model.named_parameters()),
        "no_grad": all(p.grad is None for p in model.parameters()),
        "no_optimizer_state": not optimizer.state,
    }
    batch = default_data_collator([make_dataset()[i] for i in range(2)])
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    optimizer.step()
    checks["trains_after"] = bool(torch.isfinite(loss).item()) and not all(
        torch.equal(whole(p), full[n]) for n, p in model.named_parameters() if p.requires_grad
    )
    result["checks"] = checks  # type: ignore[assignment]
    return result


def whole(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if isinstance(p, DTensor) else p.detach()


def main() -> tuple[dict[str, Any], str]:
    out, mode, lora = sys.argv[1], sys.argv[2], "lora" in sys.argv[3:]
    model = build(lora)
    if mode == "plain":
        return run_ops(model), f"{out}.rank0"
    if mode == "fsdp2":
        return run_fsdp2(model), f"{out}.rank{torch.distributed.get_rank()}"
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ZERO3)
    module = engine.module
    assert param_sharding(module) == "zero3"
    shards = {n: p.ds_tensor.detach().clone() for n, p in module.named_parameters()}
    fp32 = [t.detach().clone() for t in optimizer.fp32_partitioned_groups_flat]
    result = run_ops(module, optimizer)
    # Nothing changed: partitions, fp32 master copy, no .grad, DeepSpeed's gradient buffers untouched.
    checks = {
        "shards_unchanged": all(torch.equal(p.ds_tensor, shards[n]) for n, p in module.named_parameters()),
        "fp32_unchanged": all(
            torch.equal(a, b) for a, b in zip(optimizer.fp32_partitioned_groups_flat, fp32, strict=True)
        ),
        "no_grad": all(p.grad is None for p in module.parameters()),
        "grad_buffer_zero": not optimizer.grad_partitions_flat_buffer.any().item(),
        "no_averaged_gradients": not optimizer.averaged_gradients,
    }
    # The engine still trains afterwards (hooks restored, no stale gradient state).
    batch = default_data_collator([make_dataset()[i] for i in range(2)])
    loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    engine.backward(loss)
    engine.step()
    checks["trains_after"] = bool(torch.isfinite(loss).item()) and not all(
        torch.equal(p.ds_tensor, shards[n]) for n, p in module.named_parameters() if p.requires_grad
    )
    result["checks"] = checks  # type: ignore[assignment]
    return result, f"{out}.rank{torch.distributed.get_rank()}"


if __name__ == "__main__":
    # The model is released when main returns, before the group is destroyed; a ZeRO-3 engine
    # is not: DeepSpeed keeps its model in parameter_offload.FWD_MODULE_STACK for good.
    torch.save(*main())
    leave()
