"""One rank of a 2-process CPU (gloo) DDP run with steering; writes what it trained.

Usage: python -m torch.distributed.run --nproc-per-node 2 ddp_worker.py OUT_DIR PARADIGM
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
from tests.factories import make_dataset, make_model, make_sft_dataset, make_streams, training_args
from transformers import TrainingArguments, default_data_collator

from datasteer.hf import SteeringTrainer
from datasteer.mixers.base import ShapesDomainLoss
from datasteer.ops import INDEX_KEY

STEERING = {
    "mix": {"paradigm": "mix", "algorithm": "random", "update_every": 2, "seed": 9},
    "select": {"paradigm": "select", "algorithm": "random", "warmup_steps": 1, "update_every": 3, "seed": 9},
    "weight": {"paradigm": "weight", "algorithm": "uniform"},
    "odm": {"paradigm": "mix", "algorithm": "odm", "update_every": 1, "seed": 9},
    # aioli: rounds of 5 steps, LearnParams on steps 1-3 (training losses; aioli_eval: the
    # held-out set of each domain); ado: laws refitted every 3 steps from step 3
    "aioli": {
        "paradigm": "mix",
        "algorithm": "aioli",
        "seed": 9,
        "params": {"round_steps": 5, "interval_steps": 1, "sweeps": 1, "one_hot_factor": 0.6, "eta": 1.0},
    },
    "aioli_eval": {
        "paradigm": "mix",
        "algorithm": "aioli",
        "seed": 9,
        "params": {
            "round_steps": 5,
            "interval_steps": 1,
            "sweeps": 1,
            "one_hot_factor": 0.6,
            "eta": 1.0,
            "source": "eval",
        },
    },
    "ado": {
        "paradigm": "mix",
        "algorithm": "ado",
        "warmup_steps": 2,
        "seed": 9,
        "params": {"prior": "uniform", "ignore_steps": 0, "fit_every": 3, "fit_stride": 1, "smoothing_window": 5},
    },
    "weight_loss": {"paradigm": "weight", "algorithm": "loss", "params": {"temperature": 0.5}},
    "weight_adapt": {"paradigm": "weight", "algorithm": "adapt", "params": {"tau": 0.05, "center": True}},
    "weight_reducible": {
        "paradigm": "weight",
        "algorithm": "reducible",
        "params": {"reference_model": os.environ.get("DATASTEER_TEST_REFERENCE", ""), "temperature": 0.2},
    },
    "weight_custom": {
        "paradigm": "weight",
        "algorithm": "custom",
        "params": {
            "path": str(Path(__file__).resolve().parents[2] / "examples" / "custom_weighter.py:DomainWeighter"),
            "params": {"weights": {"beta": 3.0}},
        },
    },
    "compose": {
        "mix": {"algorithm": "random", "update_every": 2},
        "select": {"algorithm": "loss", "warmup_steps": 1, "update_every": 3},
        "weight": {"algorithm": "loss"},
        "seed": 9,
    },
    "doremi": {
        "paradigm": "mix",
        "algorithm": "doremi",
        "update_every": 2,
        "seed": 9,
        "params": {"reference_model": os.environ.get("DATASTEER_TEST_REFERENCE", "")},
    },
    # a mixture of streamed domains (tests.factories.make_streams), with loss weights
    "stream": {"mix": {"algorithm": "random", "update_every": 2}, "weight": {"algorithm": "loss"}, "seed": 9},
    # ... and a selector choosing from candidate windows of the streams
    "stream_select": {
        "mix": {"algorithm": "random", "update_every": 2},
        "select": {"algorithm": "loss", "warmup_steps": 1, "update_every": 3, "stream_window": 3},
        "seed": 9,
    },
    "near": {"paradigm": "select", "algorithm": "near", "warmup_steps": 1, "update_every": 3, "seed": 9},
    "cluster_less": {
        "paradigm": "select",
        "algorithm": "cluster_less",
        "warmup_steps": 1,
        "update_every": 3,
        "seed": 9,
        "params": {"cluster_size": 8, "proj_dim": 512},
    },
    "nice": {
        "paradigm": "select",
        "algorithm": "nice",
        "warmup_steps": 1,
        "update_every": 3,
        "seed": 9,
        # 5 targets in groups of 8 // 3 = 2: ranks get 2 and 1 groups (the short one pads).
        "params": {"proj_dim": 512, "mc_samples": 2, "max_new_tokens": 4, "reward": "token_f1"},
    },
    "less": {
        "paradigm": "select",
        "algorithm": "less",
        "warmup_steps": 1,
        "update_every": 3,
        "seed": 9,
        "params": {"proj_dim": 512},
    },
    # 48 candidates of the 80-row pool per update (the pass over the pool is in the state).
    "rho_loss": {
        "paradigm": "select",
        "algorithm": "rho_loss",
        "warmup_steps": 1,
        "update_every": 3,
        "seed": 9,
        "params": {"reference_model": os.environ.get("DATASTEER_TEST_REFERENCE", ""), "fraction": 0.5},
    },
    "greats": {
        "paradigm": "select",
        "algorithm": "greats",
        "warmup_steps": 1,
        "update_every": 3,
        "seed": 9,
        "params": {"fraction": 0.5, "targets": 4, "proj_dim": 512},
    },
}


class Recording(SteeringTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
        self.trained.append((self.state.global_step + 1, inputs[INDEX_KEY].tolist()))
        return super().training_step(model, inputs, num_items_in_batch)


def worker_args(out: Path, **overrides: object) -> TrainingArguments:
    """Training arguments of every worker: a global batch of 4 x 2 accumulation whatever the
    number of ranks, 7 steps, CPU, gloo with several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    settings: dict[str, object] = {
        "per_device_train_batch_size": 4 // world,
        "gradient_accumulation_steps": 2,
        "max_steps": 7,
        "save_strategy": "no",
        "ddp_backend": "gloo" if world > 1 else None,
    }
    return training_args(out, **{**settings, **overrides})


def leave() -> None:
    """Release what holds the process group, then tear it down before the interpreter exits.

    With torch 2.13, a gloo rank that reaches interpreter teardown with its process group
    alive can abort ("terminate called without an active exception"). Destroying the group
    is not enough while a DDP-wrapped model (the Trainer's) still holds it: the group is
    then freed during interpreter teardown, and a 2-rank aioli run aborted that way in CI.
    So the caller drops its trainer, model or engine first (each worker's ``main`` returns
    what it writes), and the cycles that keep them alive are collected here before the
    group is destroyed.
    """
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    gc.collect()


def finish(out: Path, record: object) -> None:
    """Write this rank's record, then :func:`leave`."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    leave()


def main() -> tuple[Path, dict[str, Any]]:
    out, paradigm = Path(sys.argv[1]), sys.argv[2]
    args = worker_args(out, logging_steps=1)
    # Target rows of domain gamma: prompt/response rows for NICE, plain rows otherwise.
    targets = make_sft_dataset(sizes=(0, 0, 5), seed=1) if paradigm == "nice" else make_dataset((0, 0, 6), seed=1)
    evals: Any = targets.remove_columns("domain")
    if paradigm == "aioli_eval":  # 3 held-out rows per domain: the ranks evaluate 2 and 1
        sizes = {"alpha": (3, 0, 0), "beta": (0, 3, 0), "gamma": (0, 0, 3)}
        evals = {f"{d}_eval": make_dataset(n, seed=1).remove_columns("domain") for d, n in sizes.items()}
    trainer = Recording(
        model=make_model(),
        args=args,
        train_dataset=make_streams(Path(tempfile.mkdtemp())) if paradigm.startswith("stream") else make_dataset(),
        eval_dataset=evals,
        data_collator=default_data_collator,
        steering=STEERING[paradigm],
    )
    trainer.trained = []
    ctl = trainer.steering
    assert ctl is not None
    weights: list[tuple[int, list[int], list[float]]] = []  # (step, indices, weights) of each micro-batch
    weigh = ctl.sample_weights

    def recording_weights(step, batch):  # type: ignore[no-untyped-def]
        w = weigh(step, batch)
        weights.append((step, batch.indices.tolist(), w.tolist()))
        return w

    ctl.sample_weights = recording_weights  # type: ignore[method-assign]
    trainer.train()
    plans = [(s, p.tolist() if p is not None else None) for s, p in ctl.sampler._plans] if ctl.sampler else []
    selections = [(s, c.tolist() if c is not None else None) for s, c in getattr(ctl.sampler, "_selections", [])]
    mixer = ctl.plan.mixer
    learned = mixer.learned_proportions() if isinstance(mixer, ShapesDomainLoss) else None
    report = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in mixer.report().items()} if mixer else {}
    record = {
        "trained": trainer.trained,
        "plans": plans,
        "selections": selections,
        "weights": weights,
        "learned": learned.tolist() if learned is not None else None,
        "report": report,  # what the mixer learned, on this rank
    }
    return out, record


if __name__ == "__main__":
    finish(*main())  # the trainer is released when main returns, before the group is destroyed
