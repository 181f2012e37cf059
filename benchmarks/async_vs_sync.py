"""Async actor-learner overlap vs synchronous RL, side by side in one run.

    python benchmarks/async_vs_sync.py [--steps 30] [--actors 1] [key=value ...]

Runs the launcher twice on the same config: `rollout.overlap=true` (rollout actors
generate the next batch while the learner trains, importance-corrected) and
`rollout.overlap=false` (generate, then train). Prints learner steps/s of the training
loop (start-up and final evaluation excluded) and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(mode: bool, steps: int, actors: int, extra: list[str], root: str) -> dict:
    name = f"overlap-{str(mode).lower()}"
    cmd = [sys.executable, "-m", "eapo_ray.launch", f"steps={steps}", f"rollout.num_actors={actors}",
           f"rollout.overlap={str(mode).lower()}", "eval.every=0", "data.num_heldout=30",
           f"run_root={root}", f"run_name={name}", *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    print(f"running: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((Path(root) / name / "summary.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        res = {mode: run(mode, args.steps, args.actors, args.overrides, root) for mode in (False, True)}
    rate = {m: r["steps"] / r["loop_seconds"] for m, r in res.items()}
    for m, r in res.items():
        print(f"overlap={m!s:5}  {rate[m]:.3f} steps/s  {r['samples'] / r['loop_seconds']:.1f} trained samples/s  "
              f"held-out end {r['heldout_accuracy_end']:.3f}  lost/stale batches {r['buffer']['buffer_dropped_stale']}")
    print(f"async / sync speed-up: {rate[True] / rate[False]:.2f}x")


if __name__ == "__main__":
    main()
