"""The paper's table on the bundled tiny task: every row, several seeds, one command.

    python -m experiments.paper_table [--seeds 0 1 2] [--budget-min 60]
        [--rows base workflow ...] [--out runs/paper_table] [--steps N] [--eval-samples 4]
        [--set key=value ...]

Rows (configs/paper/<row>.yaml): base (no training), workflow (no training, evaluated
WITH the expert), distill (SFT on expert-built solutions, experiments/distill.py),
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
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import experiments.rows as rows_mod
from eapo_ray.config import ConfigError, RunConfig, load_config
from experiments.budget import Timing, _hms, format_plan, job_order, make_plan, update_timing
from experiments.report import _read_json, _read_metrics, run_result, write_outputs
from experiments.rows import EXTRA_ROWS, ROW_BY_NAME, ROWS, Row, config_path, distill_steps, labelled, step_overrides

REPO = Path(__file__).resolve().parents[1]  # the checkout: launcher subprocesses run from here


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
    def counts(trajs):  # correct samples per problem, in held-out order (for paired comparisons)
        c = [0] * len(examples)
        for t in trajs:
            c[t.group] += int(t.correct)
        return c

    trajs = run_eval(engine, tok, examples, cfg, temperature=0.0, samples=1, **kw)
    out["greedy"] = summarize(trajs, examples, 1) | {"correct_per_problem": counts(trajs)}
    if samples:
        torch.manual_seed(cfg.seed)
        trajs = run_eval(engine, tok, examples, cfg, temperature=1.0, samples=samples, **kw)
        out["sampled"] = summarize(trajs, examples, samples) | {"correct_per_problem": counts(trajs)}
    out["eval_seconds"] = time.time() - t0
    return out


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
        from eapo_ray.models import resolve_models

        base = load_config(config_path(row), [f"seed={seed}", *self.sets])
        cfg = load_config(config_path(row), [f"seed={seed}", *self.sets, *step_overrides(base, self.steps)])
        resolve_models(cfg)  # repo-relative model paths (configs/mul) work from any directory
        return cfg

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
            status = run_watched(cmd, log_path, env, REPO, self.stall_s)
            if status == "ok" and (rd / "summary.json").exists():
                return {"process_seconds": time.time() - t0, "attempts": attempt + 1, "problems": problems}
            problems.append(f"attempt {attempt + 1}: {status} (see {log_path})")
            self.log(f"[paper_table] {rd.name}: {problems[-1]}")
        raise RuntimeError(f"{rd.name}: " + "; ".join(problems))

    def run(self, row: Row, seed: int) -> tuple[dict, dict]:
        """Train (unless summary.json exists) and evaluate (unless eval.json exists) one
        (row, seed); returns (the run's result, timings measured now)."""
        from experiments.distill import DistillConfig, distill

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


def expert_key(cfg: RunConfig, eapo_cfg: RunConfig) -> str:
    """The key of a row's expert in results.json's expert_accuracy: "T=<temperature>" for eapo.yaml's
    expert model, "T=<temperature> <model path>" for another (a weak expert is a different model on
    configs/mul, not a hotter one: it must not be reported with the strong expert's accuracy)."""
    same = (cfg.model.expert, cfg.expert.reverse_answer) == (eapo_cfg.model.expert, eapo_cfg.expert.reverse_answer)
    return f"T={cfg.expert.temperature:g}" + ("" if same else f" {cfg.model.expert}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.paper_table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget-min", type=float, default=60.0, help="wall-clock budget in minutes for the whole table")
    ap.add_argument("--rows", nargs="+", default=[r.name for r in ROWS + EXTRA_ROWS],
                    choices=[r.name for r in ROWS + EXTRA_ROWS])
    ap.add_argument("--config-dir", default=str(rows_mod.CONFIG_DIR),
                    help="the rows' configs (<dir>/<row>.yaml): configs/paper (tiny:arith) or configs/mul (tiny:arith-mul)")
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
    rows_mod.set_config_dir(args.config_dir)
    # a dir may hold fewer rows; each row's label from its config file's `# label:` line when it has one
    rows = [labelled(r) for r in ROWS + EXTRA_ROWS if r.name in args.rows and config_path(r).exists()]
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

    # The experts' single-operation accuracy (each row's expert model and decoding), measured once
    # each; keyed "T=<temperature>" for eapo.yaml's expert, with the model path added for another one
    expert_acc = {}
    from experiments.distill import expert_accuracy
    for r in rows:
        if r.name in plan.rows and r.kind in ("train", "distill", "workflow") and r.name != "rl":
            c = load_config(config_path(r), args.sets)
            key = expert_key(c, cfg0)
            if key not in expert_acc:
                expert_acc[key] = expert_accuracy(c)
                a = expert_acc[key]
                print(f"[paper_table] expert {key}: single-op accuracy {a['all_steps']:.3f} on task steps "
                      f"({a['consult_like']:.3f} on a*b with a >= 10, the queries the policy delegates)", flush=True)

    runner = Runner(out, plan.steps, args.eval_samples, list(args.sets), stall_s=args.stall_min * 60)
    results: dict[str, dict[int, dict]] = {}
    counts: dict = {}
    meta = {"command": "python -m experiments.paper_table " + " ".join(argv if argv is not None else sys.argv[1:]),
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
    write_outputs(out, kept, results, seeds, meta, cfg0.data.num_heldout, args.eval_samples, cfg0.data.heldout_levels)
    print((out / "table.md").read_text(), flush=True)
    print(f"[paper_table] done in {_hms(time.time() - t_start)}: {out / 'table.md'}, {out / 'results.json'}, "
          f"{out / 'accuracy_vs_samples.png'}, {out / 'eapo_consult.png'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
