"""Where a run's training-loop time went: the per-step time breakdown, as a table.

    python benchmarks/breakdown.py --run-dir runs/<run> [--run-dir other ...]

Reads <run>/summary.json's `breakdown` block (written by the launcher: eapo_ray.driver.breakdown.Breakdown)
and prints, per step (driver and learner) and per rollout batch (actors), the seconds spent in
each part, with the learner's and the rollout actors' idle fractions. Columns side by side when
several runs are given. Importable: `table(summaries, names)` returns the text, and
`launch(root, name, overrides)` runs the launcher for the benchmarks beside this file.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(root: str, name: str, overrides: list[str]) -> dict:
    """`python -m eapo_ray.launch run_root=<root> run_name=<name> <overrides>` in its own local Ray
    cluster (RAY_ADDRESS dropped), quietly; returns its summary.json with `rate` = generated
    samples per second of the training loop (what the launcher prints) and `trained_rate` =
    trained samples per second (generated counts batches dropped as stale or left in the buffer
    at the end too: compare runs of equal steps by `trained_rate`)."""
    cmd = [sys.executable, "-m", "eapo_ray.launch", *overrides, f"run_root={root}", f"run_name={name}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    print(f"[{time.strftime('%H:%M:%S')}] running: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = json.loads((Path(root) / name / "summary.json").read_text())
    s["rate"] = s["generated_samples"] / s["loop_seconds"]
    s["trained_rate"] = s["samples"] / s["loop_seconds"]
    return s

ROWS = [
    ("driver, per step (wall)", None),
    ("  wait for data (buffer empty)", ("driver_per_step", "wait_data_s")),
    ("  feed rollout actors", ("driver_per_step", "feed_s")),
    ("  learner train_step call", ("driver_per_step", "train_call_s")),
    ("  weight publish / sync", ("driver_per_step", "publish_s")),
    ("  evaluation (waited for)", ("driver_per_step", "eval_s")),
    ("  checkpoint save", ("driver_per_step", "checkpoint_s")),
    ("  driver overhead (rest)", ("driver_per_step", "driver_overhead_s")),
    ("  = step", ("driver_per_step", "step_s")),
    ("learner, per step", None),
    ("  fetch batches", ("learner_per_step", "fetch_s")),
    ("  merge/split/collate", ("learner_per_step", "prep_s")),
    ("  pi_old forward (0 = reused)", ("learner_per_step", "old_logp_s")),
    ("  forward + loss", ("learner_per_step", "forward_s")),
    ("  backward", ("learner_per_step", "backward_s")),
    ("  optimizer step", ("learner_per_step", "optim_s")),
    ("  = train_step", ("learner_per_step", "train_seconds")),
    ("rollout, per batch", None),
    ("  load weights", ("rollout_per_batch", "load_weights_s")),
    ("  generation (engine busy)", ("rollout_per_batch", "engine_s")),
    ("  expert wait (engine idle)", ("rollout_per_batch", "expert_wait_s")),
    ("  expert in flight (any)", ("rollout_per_batch", "expert_busy_s")),
    ("  reward grading", ("rollout_per_batch", "reward_s")),
    ("  advantages + packing", ("rollout_per_batch", "pack_s")),
    ("  = produce", ("rollout_per_batch", "produce_s")),
    ("idle fractions", None),
    ("  learner idle", ("learner_idle_frac",)),
    ("  rollout actors idle", ("rollout_idle_frac",)),
    ("run", None),
    ("  loop seconds", ("loop_seconds",)),
    ("  final eval seconds (after loop)", ("final_eval_seconds",)),
    ("  steps", ("steps",)),
    ("  rollout batches", ("rollout_batches",)),
]


def _get(d: dict, path: tuple):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def table(summaries: list[dict], names: list[str]) -> str:
    w = max(len(n) for n in names + ["12345678"]) + 2
    lines = [f"{'':36s}" + "".join(f"{n:>{w}s}" for n in names)]
    for label, path in ROWS:
        if path is None:
            lines.append(label)
            continue
        cells = []
        for s in summaries:
            v = _get(s.get("breakdown", {}), path)
            cells.append(f"{'-':>{w}s}" if v is None else f"{v:>{w}.3f}" if isinstance(v, float) else f"{v:>{w}}")
        lines.append(f"{label:36s}" + "".join(cells))
    extra = [("samples/s (generated / loop s)", lambda s: s["generated_samples"] / max(s["loop_seconds"], 1e-9)),
             ("held-out accuracy end", lambda s: s["heldout_accuracy_end"])]
    for label, fn in extra:
        vals = [fn(s) for s in summaries]  # held-out accuracy is None for a run with eval.enabled=false
        lines.append(f"{label:36s}" + "".join(f"{'-':>{w}s}" if v is None else f"{v:>{w}.3f}" for v in vals))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/breakdown.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", action="append", required=True, help="a run directory (repeatable)")
    args = ap.parse_args(argv)
    summaries = [json.loads((Path(d) / "summary.json").read_text()) for d in args.run_dir]
    print(table(summaries, [Path(d).name for d in args.run_dir]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
