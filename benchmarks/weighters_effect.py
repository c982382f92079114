"""Does per-sample weighting change what the tiny model learns? Held-out loss per domain.

Trains the built-in tiny Llama on the built-in corpus with each weighter (same seed, data
order, steps and learning rate; only the ``datasteer:`` block differs), then prints every
domain's held-out loss side by side. ``reducible`` needs a reference model: the script first
trains DoReMi's step-1 reference run (a uniform mixture, the same number of steps), which
stands for the irreducible loss.

    .venv/bin/python benchmarks/weighters_effect.py --steps 150 --seeds 1 2

The corpus has three learnable domains and ``noise`` (random tokens: all of its loss is
irreducible), so the expectation is: ``loss`` (linupper: high loss weighs more) leans to
noise, ``reducible`` (training loss minus the reference's) leans away from it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from datasteer.assets import BUILTIN_DOMAINS
from datasteer.quickstart import EXAMPLES, format_table, train_run

RUNS = {
    "uniform": ("weight_uniform.yaml", []),
    "loss": ("weight_loss.yaml", []),
    "reducible": ("weight_reducible.yaml", ["datasteer.params.reference_model={reference}"]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--output-dir", default="outputs/weighters_effect")
    ns = parser.parse_args(argv)
    root = Path(ns.output_dir)
    per_seed: dict[str, list[dict[str, float]]] = {name: [] for name in RUNS}
    for seed in ns.seeds:
        print(f"seed {seed}:", flush=True)
        reference = root / f"seed{seed}" / "reference"
        train_run(EXAMPLES / "mix_doremi_1_reference.yaml", reference, ns.steps, [f"seed={seed}"])
        for name, (config, extra) in RUNS.items():
            overrides = [f"seed={seed}", *(e.format(reference=reference) for e in extra)]
            per_seed[name].append(train_run(EXAMPLES / config, root / f"seed{seed}" / name, ns.steps, overrides))
    mean = {name: {key: statistics.fmean(r[key] for r in runs) for key in runs[0]} for name, runs in per_seed.items()}
    print(f"\nHeld-out loss per domain, mean of seeds {ns.seeds}, {ns.steps} steps (difference = uniform - reducible):")
    print(format_table({"uniform": mean["uniform"], "loss": mean["loss"], "reducible": mean["reducible"]}))
    for name, runs in per_seed.items():
        means = [statistics.fmean(r[f"eval_{d}_eval_loss"] for d in BUILTIN_DOMAINS) for r in runs]
        print(f"{name:>10}: mean held-out loss per seed {[round(m, 4) for m in means]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
