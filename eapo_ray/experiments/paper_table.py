"""The paper's table on the bundled tiny task: every row, several seeds, one command.

    python -m eapo_ray.experiments.paper_table [--seeds 0 1 2] [--budget-min 60]
        [--rows base workflow ...] [--out runs/paper_table] [--steps N] [--eval-samples 4]
        [--set key=value ...]

Rows (configs/paper/<row>.yaml): base (no training), workflow (no training, evaluated
WITH the expert), distill (SFT on expert-built solutions, eapo_ray/experiments/distill.py),
rl (self-exploratory RL: GRPO/DAPO, no expert), eapo, and ablations (eapo_sequential,
eapo_weak_expert, eapo_constant, eapo_inverse, eapo_step).

Training rows run as `python -m eapo_ray.launch --config <row>.yaml seed=S key=value ...`
(= `launch.run(load_config(path, overrides))`), one subprocess each. (`run()` calls
`ray.init` itself and never `ray.shutdown`, so a second call in one process needs
`init_ray` to skip an initialized Ray.) A subprocess also gives each run its own log
file and its own local Ray cluster (RAY_ADDRESS is removed from its environment), and a
crashed or stuck run cannot take the rest of the table with it. Every model is then evaluated here,
by the same code, on the launcher's held-out set for that seed (data.num_heldout problems
drawn with seed + 1, the same for every row of a seed): greedy (the launcher's metric) and
sampled (T=1, avg over --eval-samples samples). All rows but workflow are evaluated with
the policy alone (expert off, consult tag banned).

Budget: the plan (rows x seeds x steps, estimated time) is printed before anything runs.
Ablation rows are dropped (last first) until the estimate fits --budget-min; if the core
rows alone do not fit, the number of training steps is scaled down (with every step-based
schedule scaled in proportion, never below --min-steps). After each training run the
estimate is re-measured and ablation rows that have not started are dropped if the rest
no longer fits. Resume: a run whose summary.json exists in --out is not run again (its
evaluation is reused, or done if missing), so a cut-off table can be finished by rerunning
the same command.

Output in --out: table.md, results.json (every number), accuracy_vs_samples.png,
eapo_consult.png, plan.json, runs/<row>-s<seed>/ (run directories, eval.json), logs/.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from eapo_ray.config import PACKAGE_DIR, ConfigError, RunConfig, load_config

CONFIG_DIR = PACKAGE_DIR.parent / "configs" / "paper"


@dataclass(frozen=True)
class Row:
    name: str  # configs/paper/<name>.yaml
    label: str
    kind: str  # "base" | "workflow" | "distill" | "train"
    core: bool = True  # core rows are never dropped to fit the budget


# Table order; ablations are dropped from the end of this list first.
ROWS = (
    Row("base", "base policy", "base"),
    Row("workflow", "expert-assisted workflow (policy + expert at inference)", "workflow"),
    Row("distill", "distillation from the expert (SFT)", "distill"),
    Row("rl", "self-exploratory RL (GRPO/DAPO, no expert)", "train"),
    Row("eapo", "EAPO (linear 1 -> 0 over 75% of steps, K=3)", "train"),
    Row("eapo_weak_expert", "ablation: weak expert (T=2.0)", "train", core=False),
    Row("eapo_constant", "ablation: expert always answers (rho=1)", "train", core=False),
    Row("eapo_sequential", "ablation: sequential consult (K=1)", "train", core=False),
    Row("eapo_inverse", "ablation: rho = min(1, 10/s)", "train", core=False),
    Row("eapo_step", "ablation: rho = 1 until 50% of steps, then 0", "train", core=False),
)
ROW_BY_NAME = {r.name: r for r in ROWS}


def config_path(row: Row) -> Path:
    return CONFIG_DIR / f"{row.name}.yaml"


# ---------------------------------------------------------------- plan and budget (pure)

@dataclass
class Timing:
    """Seconds per unit of work. Defaults: measured on the 2-core dev machine with other
    work running; replaced by measurements as the table runs."""
    step_s: float = 3.0  # one learner step of a training run
    run_overhead_s: float = 45.0  # a training subprocess besides its steps: imports, Ray, Serve, save
    eval_s: float = 45.0  # greedy + sampled (4 x 400 problems) evaluation of one model
    workflow_eval_s: float = 60.0  # the same with the expert consulted in-process
    distill_s: float = 60.0  # expert data (4000 problems) + SFT (before its evaluation)


def run_seconds(row: Row, steps: int, t: Timing) -> float:
    if row.kind == "train":
        return t.run_overhead_s + steps * t.step_s + t.eval_s
    if row.kind == "distill":
        return t.distill_s + t.eval_s
    if row.kind == "workflow":
        return t.workflow_eval_s
    return t.eval_s


def estimate_seconds(rows: list[Row], seeds: list[int], steps: int, t: Timing, done: set = frozenset()) -> float:
    """Time for the (row, seed) runs not in `done`."""
    return sum(run_seconds(r, steps, t) for r in rows for s in seeds if (r.name, s) not in done)


@dataclass
class Plan:
    rows: list[str]
    seeds: list[int]
    steps: int
    estimate_s: float
    budget_s: float
    dropped: list[str] = field(default_factory=list)
    fits: bool = True


def make_plan(rows: list[Row], seeds: list[int], steps: int, budget_s: float, t: Timing, *, min_steps: int = 20,
              scale_steps: bool = True, done: set = frozenset()) -> Plan:
    """Drop ablation rows (last first, never one with a finished run) until the estimate
    fits the budget; then, if allowed, scale training steps down (not below min_steps)."""
    keep, dropped = list(rows), []
    while estimate_seconds(keep, seeds, steps, t, done) > budget_s:
        victims = [r for r in keep if not r.core and not any((r.name, s) in done for s in seeds)]
        if not victims:
            break
        keep.remove(victims[-1])
        dropped.append(victims[-1].name)
    if scale_steps and estimate_seconds(keep, seeds, steps, t, done) > budget_s:
        train_runs = sum(1 for r in keep for s in seeds if r.kind == "train" and (r.name, s) not in done)
        fixed = estimate_seconds(keep, seeds, 0, t, done)
        fit = math.floor((budget_s - fixed) / (train_runs * t.step_s)) if train_runs else steps
        steps = max(min_steps, min(steps, fit))
    est = estimate_seconds(keep, seeds, steps, t, done)
    return Plan([r.name for r in keep], list(seeds), steps, est, budget_s, dropped, est <= budget_s)


def step_overrides(cfg: RunConfig, steps: int) -> list[str]:
    """Overrides that run `cfg` for `steps` learner steps instead of cfg.steps, with the
    step-based schedules (acceptance, turn budget, evaluation interval) scaled in proportion."""
    if steps == cfg.steps:
        return []
    f = steps / cfg.steps
    out = [f"steps={steps}", f"acceptance.total_steps={max(1, round(cfg.acceptance.total_steps * f))}"]
    if cfg.acceptance.kind == "inverse":
        out.append(f"acceptance.scale={cfg.acceptance.scale * f:g}")
    if cfg.eval.every:
        out.append(f"eval.every={max(1, round(cfg.eval.every * f))}")
    return out


def distill_steps(cfg: RunConfig, steps: int, batch_size: int) -> int:
    """SFT steps that show the policy as many samples as an RL run of `steps` steps trains on."""
    return max(1, round(steps * cfg.rollout.prompts_per_batch * cfg.rollout.group_size / batch_size))


def format_plan(plan: Plan, t: Timing) -> str:
    h = lambda s: f"{s / 60:.1f} min"  # noqa: E731
    lines = [f"[paper_table] plan: {len(plan.rows)} rows x {len(plan.seeds)} seeds {plan.seeds}, "
             f"{plan.steps} training steps; estimate {h(plan.estimate_s)} of a {h(plan.budget_s)} budget"
             + ("" if plan.fits else " (DOES NOT FIT: core rows at the minimum steps)"),
             f"[paper_table]   rows: {', '.join(plan.rows)}",
             f"[paper_table]   per run: training {t.run_overhead_s:.0f}s + {plan.steps} x {t.step_s:.1f}s/step "
             f"+ eval {t.eval_s:.0f}s; distill {t.distill_s:.0f}s + eval; workflow eval {t.workflow_eval_s:.0f}s"]
    if plan.dropped:
        lines.append(f"[paper_table]   dropped to fit the budget: {', '.join(plan.dropped)}")
    return "\n".join(lines)


def job_order(rows: list[Row], seeds: list[int]) -> list[tuple[Row, int]]:
    """Core rows seed by seed (a cut-off table still has whole seeds of the core rows),
    then each ablation row for all seeds (a partial ablation row is of no use)."""
    core = [(r, s) for s in seeds for r in rows if r.core]
    return core + [(r, s) for r in rows if not r.core for s in seeds]


# ---------------------------------------------------------------- aggregation and rendering (pure)

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
                 sample_k: int) -> str:
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
    notes = [
        "",
        f"Accuracy: exact final answer on {num_heldout} held-out problems per seed (2-4 operations; seed S draws "
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


# ---------------------------------------------------------------- plots

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


# ---------------------------------------------------------------- running rows


def evaluate_model(model_dir: str, cfg: RunConfig, *, workflow: bool = False, samples: int = 4,
                   batch: int = 256) -> dict:
    """Greedy and sampled (T=1, `samples` per problem) accuracy on the held-out set;
    the policy alone, or with the expert (workflow) for up to rollout.train_turns turns."""
    import torch

    from eapo_ray.evaluate import local_expert, run_eval, summarize
    from eapo_ray.rollout.hf_engine import HFEngine

    t0 = time.time()
    engine = HFEngine(model_dir)
    tok = engine.tokenizer
    from eapo_ray.data import heldout_examples

    examples = heldout_examples(cfg)  # exactly the launcher's evaluator set
    expert = local_expert(cfg.model.expert, cfg) if workflow else None
    kw = dict(expert=expert, max_turns=cfg.rollout.train_turns if workflow else None, batch=batch)
    out = {"model": model_dir, "mode": "workflow" if workflow else "alone", "problems": len(examples)}
    out["greedy"] = summarize(run_eval(engine, tok, examples, cfg, temperature=0.0, samples=1, **kw), examples, 1)
    if samples:
        torch.manual_seed(cfg.seed)
        out["sampled"] = summarize(run_eval(engine, tok, examples, cfg, temperature=1.0, samples=samples, **kw),
                                   examples, samples)
    out["eval_seconds"] = time.time() - t0
    return out


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _read_metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def run_watched(cmd: list[str], log_path: Path, env: dict, cwd: Path, stall_s: float, poll_s: float = 2.0) -> str:
    """Run `cmd` with its output in `log_path`; "ok", "exit <rc>", or "stalled" when the log
    has not grown for `stall_s` seconds (the process is then stopped: SIGTERM, which makes
    the launcher shut its Ray cluster down; SIGKILL if it is still there a minute later)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        size, last_change = -1, time.time()
        try:
            while proc.poll() is None:
                time.sleep(poll_s)
                if log_path.stat().st_size != size:
                    size, last_change = log_path.stat().st_size, time.time()
                elif time.time() - last_change > stall_s:
                    f.write(f"\n[paper_table] no output for {stall_s:.0f}s: stopping the run\n")
                    f.flush()
                    _stop(proc)
                    return "stalled"
        finally:
            if proc.poll() is None:  # interrupted ourselves: do not leave the run (and its Ray) behind
                _stop(proc)
    return "ok" if proc.returncode == 0 else f"exit {proc.returncode}"


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Runner:
    out: Path
    steps: int
    eval_samples: int
    sets: list[str]
    log: object = print
    stall_s: float = 300.0  # a training run with no output for this long is stopped and retried
    retries: int = 1

    def run_dir(self, row: Row, seed: int) -> Path:
        return self.out / "runs" / f"{row.name}-s{seed}"

    def cfg(self, row: Row, seed: int) -> RunConfig:
        base = load_config(config_path(row), [f"seed={seed}", *self.sets])
        return load_config(config_path(row), [f"seed={seed}", *self.sets, *step_overrides(base, self.steps)])

    def train(self, row: Row, seed: int) -> dict:
        """A training row: a launcher subprocess (its own local Ray cluster), watched for
        stalls; a failed or stalled run is retried `retries` times from scratch."""
        base = load_config(config_path(row), [f"seed={seed}", *self.sets])
        rd = self.run_dir(row, seed)
        cmd = [sys.executable, "-m", "eapo_ray.launch", "--config", str(config_path(row)), f"seed={seed}",
               f"run_root={rd.parent}", f"run_name={rd.name}", *self.sets, *step_overrides(base, self.steps)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
        t0, problems = time.time(), []
        for attempt in range(1 + self.retries):
            if rd.exists():
                shutil.rmtree(rd)  # a cut-off attempt: metrics.jsonl is appended to, so start clean
            log_path = self.out / "logs" / f"{rd.name}{f'.retry{attempt}' if attempt else ''}.log"
            status = run_watched(cmd, log_path, env, PACKAGE_DIR.parent, self.stall_s)
            if status == "ok" and (rd / "summary.json").exists():
                return {"process_seconds": time.time() - t0, "attempts": attempt + 1, "problems": problems}
            problems.append(f"attempt {attempt + 1}: {status} (see {log_path})")
            self.log(f"[paper_table] {rd.name}: {problems[-1]}")
        raise RuntimeError(f"{rd.name}: " + "; ".join(problems))

    def run(self, row: Row, seed: int) -> tuple[dict, dict]:
        """Train (unless summary.json exists) and evaluate (unless eval.json exists) one
        (row, seed); returns (the run's result, timings measured now)."""
        from eapo_ray.experiments.distill import DistillConfig, distill

        rd, cfg, timing = self.run_dir(row, seed), self.cfg(row, seed), {}
        if not (rd / "summary.json").exists():
            if row.kind == "train":
                timing = self.train(row, seed)
            elif row.kind == "distill":
                dc = DistillConfig()
                dc = dataclasses.replace(dc, steps=distill_steps(cfg, self.steps, dc.batch_size))
                t0 = time.time()
                log_path = self.out / "logs" / f"{rd.name}.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with log_path.open("w") as f:
                    distill(cfg, dc, rd, log=lambda m: print(m, file=f, flush=True))
                timing = {"distill_seconds": time.time() - t0}
            else:
                rd.mkdir(parents=True, exist_ok=True)
                (rd / "summary.json").write_text(json.dumps(
                    {"row": row.name, "training": "none", "model": cfg.model.policy, "seed": seed, "samples": 0,
                     "steps": 0}, indent=2))
        summary = _read_json(rd / "summary.json")
        ev = _read_json(rd / "eval.json")
        if ev is None:
            model = cfg.model.policy if row.kind in ("base", "workflow") else str(rd / "final")
            ev = evaluate_model(model, cfg, workflow=row.kind == "workflow", samples=self.eval_samples)
            (rd / "eval.json").write_text(json.dumps(ev, indent=2))
            timing["eval_seconds"] = ev["eval_seconds"]
        return run_result(row, summary, ev, _read_metrics(rd) if row.kind == "train" else None), timing


def update_timing(t: Timing, row: Row, steps: int, measured: dict, counts: dict) -> Timing:
    """Running means of the measured times replace the defaults."""
    def avg(name, value):
        n = counts.get(name, 0)
        counts[name] = n + 1
        return value if n == 0 else (getattr(t, name) * n + value) / (n + 1)

    t = dataclasses.replace(t)
    if row.kind == "train" and "process_seconds" in measured:
        loop = measured.get("loop_seconds")
        if loop:
            t.step_s = avg("step_s", loop / steps)
            t.run_overhead_s = avg("run_overhead_s", measured["process_seconds"] - loop)
    if row.kind == "distill" and "distill_seconds" in measured:
        t.distill_s = avg("distill_s", measured["distill_seconds"])
    if "eval_seconds" in measured:
        if row.kind == "workflow":
            t.workflow_eval_s = avg("workflow_eval_s", measured["eval_seconds"])
        else:
            t.eval_s = avg("eval_s", measured["eval_seconds"])
    return t


def _hms(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 60}m{s % 60:02d}s"


def write_outputs(out: Path, rows: list[Row], results: dict, seeds: list[int], meta: dict, num_heldout: int,
                  sample_k: int) -> None:
    labels = {r.name: r.label for r in rows}
    (out / "table.md").write_text(render_table(rows, results, seeds, num_heldout=num_heldout, sample_k=sample_k))
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eapo_ray.experiments.paper_table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget-min", type=float, default=60.0, help="wall-clock budget in minutes for the whole table")
    ap.add_argument("--rows", nargs="+", default=[r.name for r in ROWS], choices=[r.name for r in ROWS])
    ap.add_argument("--out", default="runs/paper_table")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps (default: the configs' 40, scaled down only if the core rows do not fit)")
    ap.add_argument("--min-steps", type=int, default=20)
    ap.add_argument("--eval-samples", type=int, default=4, help="samples per problem at T=1 (0: greedy only)")
    ap.add_argument("--stall-min", type=float, default=5.0,
                    help="stop (and retry once) a training run that prints nothing for this many minutes")
    ap.add_argument("--set", dest="sets", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides applied to every row (e.g. data.num_heldout=100)")
    args = ap.parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a running launcher is stopped with us

    t_start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in ROWS if r.name in args.rows]
    seeds = list(dict.fromkeys(args.seeds))
    try:
        cfg0 = load_config(config_path(ROW_BY_NAME["eapo"]), args.sets)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = {(r.name, s) for r in rows for s in seeds if (out / "runs" / f"{r.name}-s{s}" / "summary.json").exists()}
    prev = _read_json(out / "plan.json")
    fixed_steps = args.steps or (prev["steps"] if prev and done else None)  # a resumed table keeps its steps
    timing = Timing(**prev["timing"]) if prev and "timing" in prev else Timing()
    used_before = prev.get("elapsed_s", 0.0) if prev and done else 0.0  # earlier attempts at this table
    budget_s = args.budget_min * 60 - used_before
    plan = make_plan(rows, seeds, fixed_steps or cfg0.steps, budget_s, timing, min_steps=args.min_steps,
                     scale_steps=fixed_steps is None, done=done)
    if done:
        print(f"[paper_table] resuming: {len(done)} runs already in {out} are not run again; "
              f"{used_before / 60:.1f} min of the budget were used before", flush=True)
    print(format_plan(plan, timing), flush=True)

    # The experts' single-operation accuracy (the rows' expert decoding), measured once.
    expert_acc = {}
    from eapo_ray.experiments.distill import expert_accuracy
    for r in rows:
        if r.name in plan.rows and r.kind in ("train", "distill", "workflow") and r.name != "rl":
            c = load_config(config_path(r), args.sets)
            key = f"T={c.expert.temperature:g}"
            if key not in expert_acc:
                expert_acc[key] = expert_accuracy(c)
                a = expert_acc[key]
                print(f"[paper_table] expert {key}: single-op accuracy {a['all_steps']:.3f} on task steps "
                      f"({a['consult_like']:.3f} on a*b with a >= 10, the queries the policy delegates)", flush=True)

    runner = Runner(out, plan.steps, args.eval_samples, list(args.sets), stall_s=args.stall_min * 60)
    results: dict[str, dict[int, dict]] = {}
    counts: dict = {}
    meta = {"command": "python -m eapo_ray.experiments.paper_table " + " ".join(argv if argv is not None else sys.argv[1:]),
            "expert_accuracy": expert_acc, "eval_samples": args.eval_samples, "sets": args.sets}

    def save_plan():
        (out / "plan.json").write_text(json.dumps(
            dataclasses.asdict(plan) | {"timing": dataclasses.asdict(timing),
                                        "elapsed_s": used_before + time.time() - t_start}, indent=2))

    save_plan()
    jobs = job_order([r for r in rows if r.name in plan.rows], seeds)
    failures = []
    i = 0
    while i < len(jobs):
        row, seed = jobs[i]
        t0 = time.time()
        try:
            res, measured = runner.run(row, seed)
        except Exception as e:  # noqa: BLE001 -- one failed run must not lose the table
            failures.append(f"{row.name} seed {seed}: {e}")
            print(f"[paper_table] FAILED {row.name} seed {seed}: {e}", flush=True)
            i += 1
            continue
        results.setdefault(row.name, {})[seed] = res
        rd = runner.run_dir(row, seed)
        if row.kind == "train" and "process_seconds" in measured:
            measured["loop_seconds"] = (_read_json(rd / "summary.json") or {}).get("loop_seconds")
        timing = update_timing(timing, row, plan.steps, measured, counts)
        done.add((row.name, seed))
        i += 1
        # Re-plan the rest with the measured times: drop ablation rows that have not started.
        elapsed = time.time() - t_start
        left = [r for r in rows if r.name in plan.rows]
        new = make_plan(left, seeds, plan.steps, budget_s - elapsed, timing, scale_steps=False, done=done)
        if new.dropped:
            plan.rows = new.rows
            plan.dropped += new.dropped
            jobs = jobs[:i] + [(r, s) for r, s in jobs[i:] if r.name in new.rows]
            print(f"[paper_table] re-planned with measured times: dropping {', '.join(new.dropped)}", flush=True)
        plan.estimate_s = used_before + elapsed + new.estimate_s
        save_plan()
        sampled = f" sampled {res['sampled']:.3f}" if res.get("sampled") is not None else ""
        print(f"[paper_table] {i}/{len(jobs)} {row.name} seed {seed}: greedy {res['greedy']:.3f}{sampled} "
              f"samples {res['samples']} ({time.time() - t0:.0f}s)  elapsed {_hms(elapsed)}  "
              f"ETA {_hms(new.estimate_s)}", flush=True)

    kept = [r for r in rows if r.name in plan.rows]
    meta |= {"steps": plan.steps, "plan": dataclasses.asdict(plan), "timing": dataclasses.asdict(timing),
             "wall_seconds": time.time() - t_start, "wall_seconds_all_attempts": used_before + time.time() - t_start,
             "failures": failures}
    save_plan()
    write_outputs(out, kept, results, seeds, meta, cfg0.data.num_heldout, args.eval_samples)
    print((out / "table.md").read_text(), flush=True)
    print(f"[paper_table] done in {_hms(time.time() - t_start)}: {out / 'table.md'}, {out / 'results.json'}, "
          f"{out / 'accuracy_vs_samples.png'}, {out / 'eapo_consult.png'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
