"""Scaling on one machine: rollout actors 1/2/4 and expert replicas 1/2, side by side in one run.

    python benchmarks/scaling.py [--steps 6] [--configs 1x1 2x1 4x1 2x2] [key=value ...]

Each config AxR runs the launcher with A rollout actors and R expert replicas (min = max = R),
overlap on, the expert on with every consult answered (acceptance constant 1), and
buffer.capacity = A (every actor may run one batch ahead; max_staleness = A + 1 so nothing is
dropped). Printed per config: samples/s of the training loop (generated samples / loop seconds),
seconds per rollout batch (an actor's produce call: it grows once the actors share cores),
generation and expert-wait seconds per batch, the learner's train_step seconds, and the idle
fractions. On a machine with C cores the loop saturates once actors + learner (one torch thread
each) + the expert replicas exceed C: more actors then only slow each other down (the per-batch
seconds grow ~linearly) and the learner's step grows too, since it shares the same cores.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(actors: int, replicas: int, args, root: str) -> dict:
    name = f"a{actors}-r{replicas}"
    from breakdown import launch

    return launch(root, name, [
        f"steps={args.steps}", f"seed={args.seed}",
        f"rollout.num_actors={actors}", f"expert.min_replicas={replicas}", f"expert.max_replicas={replicas}",
        f"buffer.capacity={actors}", f"buffer.max_staleness={actors + 1}", "acceptance.kind=constant",
        "acceptance.start=1.0", "rollout.turn_budget_steps=0", "eval.every=0", "data.num_heldout=16",
        *args.overrides])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/scaling.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--configs", nargs="+", default=["1x1", "2x1", "4x1", "2x2"],
                    help="AxR: A rollout actors, R expert replicas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="extra key=value launcher overrides")
    args = ap.parse_args(argv)
    print(f"cores: {os.cpu_count()}; load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    res = {}
    with tempfile.TemporaryDirectory() as root:
        for c in args.configs:
            a, r = (int(x) for x in c.split("x"))
            res[a, r] = run(a, r, args, root)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n{args.steps} steps x 128 samples, overlap on, expert on (every consult answered)")
    print("trained/s: trained samples per loop second (equal steps: the ratio of loop times); generated/s counts "
          "batches dropped as stale or left buffered too")
    print(f"{'actors':>6s} {'replicas':>8s} {'trained/s':>9s} {'vs 1x1':>7s} {'generated/s':>11s} {'s/batch':>8s} {'gen s':>6s} "
          f"{'expert wait':>11s} {'train s':>8s} {'learner idle':>12s} {'rollout idle':>12s} {'stale drops':>11s}")
    base = res.get((1, 1), next(iter(res.values())))["trained_rate"]
    for (a, r), s in res.items():
        b = s["breakdown"]
        rb, lb = b["rollout_per_batch"], b["learner_per_step"]
        print(f"{a:6d} {r:8d} {s['trained_rate']:9.1f} {s['trained_rate'] / base:6.2f}x {s['rate']:11.1f} "
              f"{rb['produce_s']:8.2f} {rb['engine_s']:6.2f} "
              f"{rb['expert_wait_s']:11.2f} {lb['train_seconds']:8.2f} {b['learner_idle_frac']:12.2f} "
              f"{b['rollout_idle_frac']:12.2f} {s['buffer']['buffer_dropped_stale']:11d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
