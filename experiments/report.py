"""Aggregation over seeds, the markdown table, the plots and the output files of a table run."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from experiments.rows import Row, config_path


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _read_metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(per_seed: dict[int, dict], keys: list[str]) -> dict:
    """{key: {mean, std, n, values: {seed: v}}} over the seeds that have `key`."""
    out = {}
    for k in keys:
        vals = {s: r[k] for s, r in sorted(per_seed.items()) if r.get(k) is not None}
        m, sd = mean_std(list(vals.values()))
        out[k] = {"mean": m, "std": sd, "n": len(vals), "values": vals}
    return out


def run_result(row: Row, summary: dict, ev: dict, metrics: list[dict] | None = None) -> dict:
    """One run's numbers for the table, from its summary.json and eval.json."""
    g, s = ev["greedy"], ev.get("sampled") or {}
    k = s.get("samples_per_problem")
    out = {"greedy": g["pass@1"], "sampled": s.get("pass@1"), "sampled_k": k,
           "greedy_levels": {key[len("pass@1_level_"):]: v for key, v in g.items() if key.startswith("pass@1_level_")},
           "sampled_pass@k": s.get(f"pass@{k}") if k else None,
           "consults_per_sample_sampled": s.get("consults_per_sample"),
           "samples": summary.get("samples", 0), "steps": summary.get("steps", summary.get("sft_steps", 0)),
           "wall_s": summary.get("wall_seconds"), "launcher_greedy_end": summary.get("heldout_accuracy_end")}
    if row.kind == "distill":
        out["data_correct_frac"] = summary.get("data_correct_frac")
    if metrics:
        out["train"] = train_stats(metrics)
    return out


def _mean_of(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def train_stats(metrics: list[dict]) -> dict:
    """Rollout statistics of a training run over its first and last quarter of steps."""
    steps = [r for r in metrics if r.get("step", 0) >= 1 and "reward" in r]
    if not steps:
        return {}
    q = max(1, len(steps) // 4)
    out = {}
    for part, rows in (("first", steps[:q]), ("last", steps[-q:])):
        for key in ("reward", "rollout_accuracy", "consult_rate", "rollout_consults_per_sample",
                    "rollout_accepted_per_sample", "rollout_dropped_groups", "rollout_response_len"):
            out[f"{key}_{part}"] = _mean_of(rows, key)
    return out


def fmt_ms(a: dict, digits: int = 3) -> str:
    if not a or not a["n"]:
        return "-"
    if a["n"] == 1:
        return f"{a['mean']:.{digits}f} (n=1)"
    return f"{a['mean']:.{digits}f} ± {a['std']:.{digits}f}"


def fmt_seeds(a: dict, seeds: list[int], digits: int = 3) -> str:
    vals = (a or {}).get("values", {})
    return " / ".join(f"{vals[s]:.{digits}f}" if s in vals else "-" for s in seeds)


def render_table(rows: list[Row], results: dict[str, dict[int, dict]], seeds: list[int], *, num_heldout: int,
                 sample_k: int, levels: list[int] | None = None) -> str:
    """Markdown table: one line per row with greedy and sampled accuracy (mean ± std over
    seeds, and per seed in seed order), training samples and steps."""
    sampled_h = f"sampled acc. (T=1, avg@{sample_k})" if sample_k else "sampled acc."
    head = (f"| row | evaluated | greedy acc. | greedy per seed ({' / '.join(map(str, seeds))}) | {sampled_h} | "
            f"sampled per seed | training samples | steps |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        per = results.get(r.name, {})
        a = aggregate(per, ["greedy", "sampled", "samples", "steps"])
        evaluated = "policy + expert (≤ train_turns turns)" if r.kind == "workflow" else "policy alone"
        samples = f"{a['samples']['mean']:.0f}" if a["samples"]["n"] else "-"
        steps = f"{a['steps']['mean']:.0f}" if a["steps"]["n"] and r.kind != "base" and r.kind != "workflow" else "-"
        lines.append(f"| {r.label} | {evaluated} | {fmt_ms(a['greedy'])} | {fmt_seeds(a['greedy'], seeds)} | "
                     f"{fmt_ms(a['sampled'])} | {fmt_seeds(a['sampled'], seeds)} | {samples} | {steps} |")
    ops = (f"{min(levels)}-{max(levels)}" if len(set(levels)) > 1 else f"{levels[0]}") if levels else "2-4"
    notes = [
        "",
        f"Accuracy: exact final answer on {num_heldout} held-out problems per seed ({ops} operations; seed S draws "
        f"them with seed S+1, the same problems for every row of that seed). Greedy: temperature 0, one sample "
        f"(the launcher's held-out metric). Sampled: temperature 1, mean over {sample_k} samples per problem.",
        "Every row except the workflow row is evaluated with the policy alone (expert off, consult tag banned). "
        "The workflow row is the untrained policy allowed to consult the expert (every query answered).",
        "Mean ± sample std over seeds. Training samples: learner samples (RL rows) or SFT examples seen (distill).",
    ]
    return "\n".join(lines + notes) + "\n"


def curve(metrics_by_seed: dict[int, list[dict]], key: str) -> dict:
    """Mean / std / min / max of `key` over seeds at the steps every seed logged it, with
    the mean number of training samples at those steps (0 before the first update)."""
    per = {s: {r["step"]: (r.get("samples", 0), r[key]) for r in rows if key in r}
           for s, rows in metrics_by_seed.items()}
    per = {s: v for s, v in per.items() if v}
    if not per:
        return {"steps": [], "samples": [], "mean": [], "std": [], "min": [], "max": []}
    steps = sorted(set.intersection(*(set(v) for v in per.values())))
    out = {"steps": steps, "samples": [], "mean": [], "std": [], "min": [], "max": []}
    for st in steps:
        xs = [v[st][0] for v in per.values()]
        ys = [v[st][1] for v in per.values()]
        m, sd = mean_std(ys)
        out["samples"].append(statistics.fmean(xs))
        out["mean"].append(m)
        out["std"].append(sd)
        out["min"].append(min(ys))
        out["max"].append(max(ys))
    return out


COLORS = {"rl": "C0", "eapo": "C1", "eapo_weak_expert": "C2", "eapo_constant": "C3", "eapo_sequential": "C4",
          "eapo_inverse": "C5", "eapo_step": "C6"}


def plot_accuracy(curves: dict[str, dict], labels: dict[str, str], path: Path, n_seeds: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        if not c["steps"]:
            continue
        line, = ax.plot(c["samples"], c["mean"], marker="o", markersize=3, label=labels.get(name, name),
                        color=COLORS.get(name))
        ax.fill_between(c["samples"], c["min"], c["max"], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training samples (learner)")
    ax.set_ylabel("held-out accuracy, policy alone (greedy)")
    ax.set_title(f"mean over {n_seeds} seeds, shaded: min-max", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_consult(curves: dict[str, dict[str, dict]], labels: dict[str, str], path: Path) -> Path:
    """curves[metric][row]: consult rate, acceptance probability, turn budget and rollout accuracy
    against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("consult_rate", "consult rate (rollouts)"), ("acceptance_prob", "acceptance probability"),
              ("rollout_turn_budget", "turn budget (rollouts)"), ("rollout_accuracy", "rollout accuracy (T=1)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.6))
    for ax, (key, title) in zip(axes, panels):
        for name, c in curves.get(key, {}).items():
            if not c["steps"]:
                continue
            line, = ax.plot(c["steps"], c["mean"], label=labels.get(name, name), color=COLORS.get(name))
            lo = [m - s for m, s in zip(c["mean"], c["std"])]
            hi = [m + s for m, s in zip(c["mean"], c["std"])]
            ax.fill_between(c["steps"], lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle("mean over seeds, shaded: ± std", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(out: Path, rows: list[Row], results: dict, seeds: list[int], meta: dict, num_heldout: int,
                  sample_k: int, levels: list[int] | None = None) -> None:
    labels = {r.name: r.label for r in rows}
    (out / "table.md").write_text(render_table(rows, results, seeds, num_heldout=num_heldout, sample_k=sample_k,
                                               levels=levels))
    metrics = {r.name: {s: _read_metrics(out / "runs" / f"{r.name}-s{s}") for s in results.get(r.name, {})}
               for r in rows if r.kind == "train"}
    acc_curves = {n: curve(metrics[n], "heldout_accuracy") for n in ("rl", "eapo") if metrics.get(n)}
    consult_curves = {
        "consult_rate": {n: curve(metrics[n], "consult_rate") for n in ("eapo", "rl") if metrics.get(n)},
        "acceptance_prob": {n: curve(metrics[n], "acceptance_prob") for n in ("eapo",) if metrics.get(n)},
        "rollout_turn_budget": {n: curve(metrics[n], "rollout_turn_budget") for n in ("eapo",) if metrics.get(n)},
        "rollout_accuracy": {n: curve(metrics[n], "rollout_accuracy") for n in ("eapo", "rl") if metrics.get(n)},
    }
    plot_accuracy(acc_curves, labels, out / "accuracy_vs_samples.png", len(seeds))
    plot_consult(consult_curves, labels, out / "eapo_consult.png")
    all_curves = {n: {k: curve(m, k) for k in ("heldout_accuracy", "consult_rate", "acceptance_prob",
                                               "rollout_accuracy", "reward")} for n, m in metrics.items() if m}
    agg = {r.name: aggregate(results.get(r.name, {}), ["greedy", "sampled", "sampled_pass@k", "samples", "steps",
                                                       "wall_s", "consults_per_sample_sampled", "data_correct_frac"])
           for r in rows}
    doc = {**meta, "seeds": seeds, "rows": {r.name: {"label": r.label, "kind": r.kind, "config": str(config_path(r)),
                                                      "per_seed": results.get(r.name, {}), "aggregate": agg[r.name]}
                                             for r in rows},
           "curves": all_curves}
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
