"""Plot a run's metrics.jsonl: ``python -m eapo_ray.tools.plot RUN_DIR`` -> RUN_DIR/metrics.png."""
from __future__ import annotations

import json
import sys
from pathlib import Path

PANELS = [("heldout_accuracy", "held-out accuracy (policy alone)"), ("reward", "rollout reward"),
          ("consult_rate", "consult rate"), ("acceptance_prob", "acceptance probability")]


def plot_run(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key == "heldout_accuracy" else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(plot_run(sys.argv[1]))
