"""How much expert help each row got during training against how its policy does alone, from a
paper_table output directory (docs/results.md, issue 11):

    python -m experiments.help_plot --out runs/mul_s19 [--png FILE]

x: answered expert queries per training sample over the helped steps (1 .. acceptance.total_steps
of the run's config.json, else 75% of its steps; the mean over those steps' metrics rows of
`rollout_accepted_per_sample`, which is the newest rollout batch's before each step, then over
seeds); y: greedy
held-out accuracy with the policy alone (eval.json), mean ± std over seeds. Prints the numbers."""
from __future__ import annotations

import argparse
from pathlib import Path

from experiments.report import _read_json, _read_metrics, mean_std


def points(out: Path) -> dict[str, tuple[float, float, float]]:
    """row -> (help per sample, greedy mean, greedy std) for the rows with training metrics."""
    by_row: dict[str, list[tuple[float, float]]] = {}
    for run in sorted((out / "runs").glob("*-s*")):
        rows, ev = _read_metrics(run), _read_json(run / "eval.json")
        if not (rows and ev):
            continue
        cfg = _read_json(run / "config.json") or {}
        last = cfg.get("acceptance", {}).get("total_steps") or 0.75 * max(r["step"] for r in rows)
        helped = [r.get("rollout_accepted_per_sample", 0.0) for r in rows if 0 < r["step"] <= last
                  and "rollout_accuracy" in r]
        if not helped:  # an incomplete run
            continue
        greedy = ev["greedy"]["pass@1"]  # one greedy sample per problem
        by_row.setdefault(run.name.rsplit("-s", 1)[0], []).append((mean_std(helped)[0], greedy))
    return {k: (mean_std([h for h, _ in v])[0], *mean_std([g for _, g in v])) for k, v in by_row.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.help_plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="a paper_table --out directory")
    ap.add_argument("--png", default="", help="default: <out>/help_vs_alone.png")
    args = ap.parse_args(argv)
    out = Path(args.out)
    pts = points(out)
    for name, (h, g, sd) in sorted(pts.items(), key=lambda kv: kv[1][0]):
        print(f"{name:18s} help/sample {h:.2f}  greedy alone {g:.3f} ± {sd:.3f}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, (h, g, sd)) in enumerate(sorted(pts.items(), key=lambda kv: kv[1][0])):
        ax.errorbar(h, g, yerr=sd, fmt="o", capsize=3)
        ax.annotate(name, (h, g), textcoords="offset points", xytext=(5, 4 if i % 2 else -11), fontsize=8)
    ax.set_xlabel("answered expert queries per training sample (helped steps)")
    ax.set_ylabel("greedy held-out accuracy, policy alone")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(args.png or out / "help_vs_alone.png")
    fig.savefig(png, dpi=120)
    print(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
