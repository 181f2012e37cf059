"""The lead figure of docs/results.md: each row's greedy accuracy minus RL's, with the paired 95%
interval (experiments.paired: bootstrap over seeds and problems), for the channels on
tiny:arith-mul and for EAPO against chain length on tiny:arith-chain.

    python -m experiments.channel_figure --mul runs/mul_replay --chain runs/chain_L3 runs/chain_L4 ... \
        --png docs/results/eapo_minus_rl.png

Each --chain directory is a paper_table output with rows rl, eapo and (optionally) eapo_replay (its name
ends in L<length>). Rows absent from a directory are skipped.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from experiments.paired import compare

MUL_ROWS = [("eapo", "EAPO (masked)"), ("eapo_replay", "EAPO + replay (rho)"),
            ("eapo_replay_coef4", "EAPO + replay (rho, x4)"), ("eapo_replay_adv", "EAPO + replay (advantage)"),
            ("control_own_steps", "control: own-step NLL, no consult"), ("rl_noconsult", "control: RL, no consult action"),
            ("rl_turn1", "RL, turn budget to 1"), ("eapo_turn1", "EAPO, turn budget to 1"),
            ("distill", "distillation (SFT on expert solutions)")]
CHAIN_ROWS = [("eapo", "EAPO (masked)"), ("eapo_replay", "EAPO + replay (rho)"), ("rl_turn1", "RL, turn budget to 1"),
              ("eapo_turn1", "EAPO, turn budget to 1")]


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mul", required=True)
    ap.add_argument("--chain", nargs="*", default=[])
    ap.add_argument("--png", required=True)
    args = ap.parse_args(argv)
    bars = []  # (label, mean, lo, hi, seeds)
    for row, label in MUL_ROWS:
        r = compare(Path(args.mul), row, "rl").get("greedy")
        if r:
            bars.append((f"mul: {label}", r["mean"], *r["ci95"], len(r["per_seed"])))
    for d in args.chain:
        length = re.search(r"L(\d+)$", d.rstrip("/")).group(1)
        for row, label in CHAIN_ROWS:
            r = compare(Path(d), row, "rl").get("greedy")
            if r:
                bars.append((f"chain, {length} ops: {label}", r["mean"], *r["ci95"], len(r["per_seed"])))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1.2))
    ys = list(range(len(bars)))[::-1]
    for y, (label, m, lo, hi, n) in zip(ys, bars):
        ax.errorbar(m, y, xerr=[[m - lo], [hi - m]], fmt="o", color="C0" if label.startswith("mul") else "C1", capsize=3)
        ax.text(max(hi, m) + 0.004, y, f"{m:+.3f} ({n} seeds)", va="center", fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(ys, [b[0] for b in bars], fontsize=8)
    ax.set_xlabel("greedy held-out accuracy minus RL's (paired, 95% interval)")
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=120)
    for label, m, lo, hi, n in bars:
        print(f"{label}: {m:+.3f} [{lo:+.3f}, {hi:+.3f}] ({n} seeds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
