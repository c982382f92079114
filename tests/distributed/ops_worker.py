"""One rank of a 2-process CPU (gloo) run of the sharded model operations; rank 0 saves them.

Usage: python -m torch.distributed.run --nproc-per-node 2 ops_worker.py OUT_FILE
       python ops_worker.py OUT_FILE        (one process)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
from tests.distributed.ddp_worker import leave
from tests.factories import make_dataset, make_model
from transformers import default_data_collator

from datasteer.ops import GradFeatureConfig, ModelOps


def main() -> tuple[dict[str, torch.Tensor], str]:
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    model = make_model()
    ops = ModelOps(model, make_dataset(), default_data_collator, batch_size=4, device=torch.device("cpu"))
    indices = list(range(3, 40, 2))  # 19 samples: an uneven split over 2 ranks
    result = {
        "losses": ops.sample_losses(indices),
        "embeddings": ops.embeddings(indices, pooling="weighted"),
        "vmap": ops.gradient_features(indices, GradFeatureConfig(method="vmap", proj_dim=32)),
        "logra": ops.gradient_features(indices, GradFeatureConfig(method="logra", proj_dim=64)),
    }
    rank = dist.get_rank() if dist.is_initialized() else 0
    return result, f"{sys.argv[1]}.rank{rank}"


if __name__ == "__main__":
    torch.save(*main())  # the model is released when main returns, before the group is destroyed
    leave()
