"""The default demo before and after issue 13's optimisations, side by side in one run.

    python benchmarks/before_after.py [--steps 10] [--repeats 1] [key=value ...]

Runs `python -m eapo_ray.launch steps=N` (the embedded default: expert on, one rollout actor)
twice per repeat, alternating:

- before (`--before`, default): `eval.overlap=false learner.length_buckets=false
  rollout.prune_finished=false rollout.fast_decode=false rollout.join_running=false` (the loop
  waits for each evaluation, inside its clock; the learner trains on one padded batch; the
  transformers engine runs every sequence until the batch's longest ends, every step through the
  model's own forward, each batch to its end before the next), i.e. the flow before issue 13;
- after: the defaults (evaluation beside training on the published weights, the final one
  after the loop's clock; length-bucketed micro-batches with pi_old reused; finished sequences
  dropped from the running batch; fast decoding steps; requests joining a decoding batch, with
  every episode sampling with its own seed so that joining changes no token, to float rounding).

Prints samples/s of the training loop (generated samples / loop seconds, as the launcher's
console line), held-out accuracy, and both breakdowns (benchmarks/breakdown.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
# eapo_ray as it was before issue 13's optimisations (the switches that have one; benchmarks/vs_trl.py too)
BEFORE = ["eval.overlap=false", "learner.length_buckets=false", "learner.share_prompts=false",
          "rollout.prune_finished=false", "rollout.fast_decode=false", "rollout.join_running=false"]


def run(name: str, extra: list[str], args, root: str) -> dict:
    from breakdown import launch

    return launch(root, name, [f"steps={args.steps}", f"seed={args.seed}", *extra, *args.overrides])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/before_after.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--before", nargs="+", default=BEFORE, metavar="KEY=VALUE",
                    help="the 'before' run's overrides (default: every issue-13 switch off; e.g. only "
                         "rollout.fast_decode=false rollout.join_running=false for the engine's last two)")
    ap.add_argument("overrides", nargs="*", help="extra key=value launcher overrides (both)")
    args = ap.parse_args(argv)
    from breakdown import table

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    res = []
    with tempfile.TemporaryDirectory() as root:
        for i in range(args.repeats):
            res.append((run(f"before{i}", args.before, args, root), run(f"after{i}", [], args, root)))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\ndefault demo, steps={args.steps} {' '.join(args.overrides)}; before: {' '.join(args.before)}")
    print(f"{'repeat':>6s} {'before samples/s':>16s} {'after samples/s':>15s} {'after/before':>12s} "
          f"{'held-out before':>15s} {'held-out after':>14s}")
    for i, (b, a) in enumerate(res):
        print(f"{i:6d} {b['rate']:16.1f} {a['rate']:15.1f} {a['rate'] / b['rate']:11.2f}x "
              f"{b['heldout_accuracy_end']:15.3f} {a['heldout_accuracy_end']:14.3f}")
    print("\nbreakdown (first repeat):")
    print(table(list(res[0]), ["before", "after"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
