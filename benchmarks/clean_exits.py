"""Consecutive 2-process runs of ``datasteer train --nproc 2``: does every one end cleanly?

With torch 2.13 and gloo, a rank that reaches interpreter teardown with its process group
alive can abort ("terminate called without an active exception"). ``datasteer train``
workers tear the group down first (LLaMA-Factory's workflow does), so every run must exit
0 with no abort. Each run is a short ODM run of the built-in tiny model (3 steps).

Run: ``.venv/bin/python benchmarks/clean_exits.py [--runs 10]``. The last line is
``RESULT clean_exits=<clean runs>/<runs>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABORTS = ("terminate called", "Aborted", "SIGABRT", "core dumped")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--example", default="mix_odm.yaml")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    clean = 0
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(1, args.runs + 1):
            cmd = [sys.executable, "-m", "datasteer", "train", str(ROOT / "examples" / args.example), "--nproc", "2"]
            cmd += ["max_steps=3", "save_steps=100", f"output_dir={Path(tmp) / f'run{run}'}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            aborted = [a for a in ABORTS if a in proc.stderr]
            clean += proc.returncode == 0 and not aborted
            print(f"run {run:>2}: exit {proc.returncode}, aborts {aborted or 'none'}", flush=True)
    print(f"RESULT clean_exits={clean}/{args.runs}")
    return 0 if clean == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
