"""Paired row differences from a paper_table output directory (same held-out problems per seed).

    python -m experiments.paired --out runs/mul_table [--a eapo --b rl] [--json FILE]

Reads runs/<row>-s<seed>/eval.json ("correct_per_problem", greedy and sampled) and prints
the per-seed difference of accuracy (a - b), their mean, and a problem-bootstrap 95% interval
(eapo_ray.algo.paired)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from eapo_ray.algo.paired import paired_difference


def load(out: Path, row: str, mode: str) -> tuple[dict, int]:
    per, k = {}, 1
    for ev_path in sorted((out / "runs").glob(f"{row}-s*/eval.json")):
        ev = json.loads(ev_path.read_text()).get(mode) or {}
        if "correct_per_problem" in ev:
            per[int(ev_path.parent.name.rsplit("-s", 1)[1])] = ev["correct_per_problem"]
            k = ev.get("samples_per_problem", 1)
    return per, k


def compare(out: Path, a: str, b: str) -> dict:
    res = {}
    for mode in ("greedy", "sampled"):
        pa, k = load(out, a, mode)
        pb, _ = load(out, b, mode)
        if set(pa) & set(pb):
            res[mode] = paired_difference(pa, pb, samples=k)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--a", default="eapo")
    ap.add_argument("--b", default="rl")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = compare(Path(args.out), args.a, args.b)
    for mode, r in res.items():
        seeds = " / ".join(f"s{s} {v:+.3f}" for s, v in r["per_seed"].items())
        print(f"{args.a} - {args.b} ({mode}): {seeds}; mean {r['mean']:+.3f}, 95% CI "
              f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] (problem bootstrap), {r['wins']} wins / {r['losses']} losses")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
