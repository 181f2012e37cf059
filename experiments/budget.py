"""Plan and budget (pure): which rows and seeds fit the time budget, at how many steps, and the
per-unit timings that are re-measured as the table runs."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from experiments.rows import Row


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
