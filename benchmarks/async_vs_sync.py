"""Async actor-learner overlap vs synchronous RL, with the Serve expert ON, side by side in one run.

    python benchmarks/async_vs_sync.py [--steps 16] [--latencies 0 0.2 1] [--actors 2] [--replicas 1] [key=value ...]

For each added expert latency L (`expert.added_latency_s`, a delay the Serve deployment adds to
every reply; benchmarks only) it runs the launcher twice on the same config and the same number
of samples (`--steps` learner steps of 16 prompts x 8 samples):

- sync  (`rollout.overlap=false`): one batch in flight, only when the learner needs data, so
  generation (and its expert waits) and training alternate;
- async (`rollout.overlap=true`): the actors generate the next batches while the learner trains
  (off-policy corrected); with several actors their expert waits overlap each other too.

The config is EAPO with every consult answered (`acceptance.kind=constant acceptance.start=1`, up
to 4 turns), so the expert sits on the rollout's critical path. Printed per run: samples/s of the
training loop (trained and generated samples / loop seconds; start-up and the final evaluation
excluded; the ratio is on trained samples, equal in both modes, i.e. it is the ratio of loop times:
async also generates batches that are dropped as stale or still buffered at the end),
the learner's and the actors' idle fractions, per-batch generation and expert-wait seconds, the
staleness distribution of the trained batches, and the held-out accuracy after the equal samples
(greedy, `--heldout` problems); then async/sync ratios per L. Each run is one launcher process
(a fresh local Ray cluster; ~25-30 s of start-up each on an idle 2-core box, not timed).

The expert runs as one replica in both modes by default (`--replicas 1`: expert.max_replicas=1).
On a 2-core box Serve's autoscaler otherwise adds a second replica in the async run (twice the
requests in flight), whose start-up (~7 s of CPU, measured) and serving loop take cores from the
actors and the learner inside a ~15 s loop: measured 1.00x at L=0 with it, 1.33x without (loop
times of 8-step runs, same day, same code). `benchmarks/scaling.py` measures replicas 1 vs 2; `--replicas 2` restores the
autoscaled deployment here.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(overlap: bool, latency: float, args, root: str) -> dict:
    name = f"L{latency:g}-{'async' if overlap else 'sync'}"
    from breakdown import launch

    s = launch(root, name, [
        f"steps={args.steps}", f"seed={args.seed}",
        f"rollout.num_actors={args.actors}", f"rollout.overlap={str(overlap).lower()}",
        f"expert.added_latency_s={latency}", "acceptance.kind=constant", "acceptance.start=1.0",
        "rollout.turn_budget_steps=0", "eval.every=0", f"data.num_heldout={args.heldout}",
        f"buffer.capacity={args.capacity}", "expert.min_replicas=1", f"expert.max_replicas={args.replicas}",
        *args.overrides])
    rows = [json.loads(x) for x in (Path(root) / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    s["staleness_hist"] = dict(sorted(collections.Counter(r["staleness"] for r in rows if "staleness" in r).items()))
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/async_vs_sync.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--latencies", type=float, nargs="+", default=[0.0, 0.2, 1.0])
    ap.add_argument("--actors", type=int, default=2, help="rollout actors (both modes)")
    ap.add_argument("--replicas", type=int, default=1, help="expert.max_replicas (both modes; min 1)")
    ap.add_argument("--capacity", type=int, default=2, help="buffer.capacity: batches ahead of the learner (async)")
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="extra key=value launcher overrides (both modes)")
    args = ap.parse_args(argv)
    from breakdown import table  # benchmarks/breakdown.py

    print(f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    res = {}
    with tempfile.TemporaryDirectory() as root:
        for lat in args.latencies:
            for overlap in (False, True):
                res[lat, overlap] = run(overlap, lat, args, root)
    print(f"load average at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print(f"\n{args.steps} steps x 128 samples, {args.actors} rollout actors, buffer.capacity {args.capacity}, "
          f"expert on (every consult answered, 1-{args.replicas} replicas), held-out {args.heldout} greedy")
    hdr = (f"{'L s':>5s} {'mode':5s} {'trained':>7s} {'generated':>9s} {'loop s':>7s} {'trained/s':>9s} "
           f"{'generated/s':>11s} {'learner idle':>12s} "
           f"{'rollout idle':>12s} {'gen s/batch':>11s} {'expert wait':>11s} {'consults/smp':>12s} "
           f"{'held-out':>8s}  staleness (step count)")
    print(hdr)
    for (lat, overlap), s in res.items():
        b = s["breakdown"]
        rb = b["rollout_per_batch"]
        print(f"{lat:5.2f} {'async' if overlap else 'sync':5s} {s['samples']:7d} {s['generated_samples']:9d} "
              f"{s['loop_seconds']:7.1f} {s['trained_rate']:9.1f} {s['rate']:11.1f} "
              f"{b['learner_idle_frac']:12.2f} {b['rollout_idle_frac']:12.2f} "
              f"{rb['produce_s']:11.2f} {rb['expert_wait_s']:11.2f} {s['consult_rate_end']:12.2f} "
              f"{s['heldout_accuracy_end']:8.3f}  {s['staleness_hist']}")
    print()
    for lat in args.latencies:
        a, y = res[lat, True], res[lat, False]
        print(f"L={lat:g}s: async / sync trained samples/s {a['trained_rate'] / y['trained_rate']:.2f}x "
              f"(generated samples/s {a['rate'] / y['rate']:.2f}x)  "
              f"(held-out {y['heldout_accuracy_end']:.3f} sync, {a['heldout_accuracy_end']:.3f} async)")
    if args.latencies:
        lat = args.latencies[0]
        print(f"\nbreakdown at L={lat:g}s (sync | async):")
        print(table([res[lat, False], res[lat, True]], ["sync", "async"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
