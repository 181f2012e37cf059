"""Paired row differences from a paper_table output directory (same held-out problems per seed).

    python -m experiments.paired --out runs/mul_table [--a eapo --b rl] [--json FILE] [--allow-unequal-k]

Reads runs/<row>-s<seed>/eval.json ("correct_per_problem" and "samples_per_problem", greedy and
sampled; k is read per row and seed) and prints the per-seed difference of accuracy (a - b),
their mean, and a 95% interval from a hierarchical bootstrap over seeds and problems
(eapo_ray.algo.paired). Rows with different samples per problem are refused unless
--allow-unequal-k."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from eapo_ray.algo.paired import paired_difference


def load(out: Path, row: str, mode: str) -> tuple[dict, dict]:
    """Correct counts per problem and samples per problem, both by seed, of one row."""
    per, ks = {}, {}
    for ev_path in sorted((out / "runs").glob(f"{row}-s*/eval.json")):
        ev = json.loads(ev_path.read_text()).get(mode) or {}
        if "correct_per_problem" in ev:
            s = int(ev_path.parent.name.rsplit("-s", 1)[1])
            per[s], ks[s] = ev["correct_per_problem"], int(ev.get("samples_per_problem", 1))
    return per, ks


def compare(out: Path, a: str, b: str, allow_unequal_k: bool = False) -> dict:
    res = {}
    for mode in ("greedy", "sampled"):
        pa, ka = load(out, a, mode)
        pb, kb = load(out, b, mode)
        if set(pa) & set(pb):
            res[mode] = paired_difference(pa, pb, ka=ka, kb=kb, allow_unequal_k=allow_unequal_k)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--a", default="eapo")
    ap.add_argument("--b", default="rl")
    ap.add_argument("--json", default=None)
    ap.add_argument("--allow-unequal-k", action="store_true",
                    help="compare rows evaluated with different samples per problem")
    args = ap.parse_args(argv)
    res = compare(Path(args.out), args.a, args.b, args.allow_unequal_k)
    for mode, r in res.items():
        seeds = " / ".join(f"s{s} {v:+.3f}" for s, v in r["per_seed"].items())
        print(f"{args.a} - {args.b} ({mode}): {seeds}; mean {r['mean']:+.3f}, 95% CI "
              f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] (bootstrap over seeds and problems; problems only: "
              f"[{r['ci95_problems'][0]:+.3f}, {r['ci95_problems'][1]:+.3f}]), {r['wins']} wins / {r['losses']} losses")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
