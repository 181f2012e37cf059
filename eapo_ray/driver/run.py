"""One launch, top to bottom: prepare the run directory, start the system, evaluate the starting
policy, run the training loop, save, write the summary and check the accounting; always tear
down."""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path

from eapo_ray.config import RunConfig
from eapo_ray.data import check_data
from eapo_ray.driver.checkpoints import (
    LoopState,
    has_checkpoint,
    load_driver_state,
    prepare_run_dir,
    resume_metrics,
    save_checkpoint,
    upload_run,
)
from eapo_ray.driver.loop import train_loop
from eapo_ray.driver.summary import write_summary
from eapo_ray.driver.system import System, start_system
from eapo_ray.ray_runtime import MetricsLog, quiet_console, wait_get
from eapo_ray.storage import sync_run


class EvaluationFailed(RuntimeError):
    pass


def run(cfg: RunConfig) -> Path:
    """Start the system, train `cfg.steps` policy versions, write the summary; always tear down."""
    import ray

    from eapo_ray import accounting, metrics
    from eapo_ray.plan import check_before_start

    check_before_start(cfg)  # a GPU config whose roles do not fit stops here, before any actor (nothing on CPU)
    t_start = time.time()
    quiet_console(cfg.verbose)
    data_line = check_data(cfg)  # every data file read and validated before anything starts (DataError)
    run_name, run_dir = prepare_run_dir(cfg)
    started_over = bool(cfg.resume) and not has_checkpoint(run_dir)
    if started_over:  # interrupted before its first checkpoint: the same run starts over from step 0
        resume_metrics(run_dir, -1)
        cfg = dataclasses.replace(cfg, resume="")
    cfg.run_name = run_name  # actors tag their metrics with it
    print(f"[eapo] run directory: {run_dir}", flush=True)
    print(f"[eapo] {data_line}", flush=True)
    s = System(accounting=accounting.Accounting())
    if cfg.storage_path:  # uploaded at every checkpoint and at the end (eapo_ray/storage.py)
        s.upload = functools.partial(sync_run, run_dir, cfg.storage_path, run_name, cfg.learner.checkpoint_keep)
        print(f"[eapo] run storage: {cfg.storage_path.rstrip('/')}/{run_name}", flush=True)
    try:
        version = start_system(cfg, run_name, run_dir, s)
        state = load_driver_state(run_dir, version) if cfg.resume else LoopState()
        if state.version != version:
            if cfg.resume:
                print(f"[eapo] driver state is at version {state.version}, the checkpoint at {version}: "
                      "counters restart from the checkpoint", flush=True)
            state = LoopState(version=version, serial=state.serial)  # never replay batch serials
        ev0 = ev = None
        if cfg.resume:
            ev0, ev = resume_metrics(run_dir, version, evaluations=cfg.eval.enabled)
        s.metrics = MetricsLog(run_dir, purge_step=version + 1 if cfg.resume else 0 if started_over else None, cfg=cfg)
        weights = s.learners.publish()
        if ev is None and cfg.eval.enabled:
            try:
                ev0 = ev = wait_get(s.evaluator.evaluate.remote(weights), cfg.eval.timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise EvaluationFailed(f"the held-out evaluation at step {version} was not back after "
                                       f"eval.timeout_s={cfg.eval.timeout_s:g} s (a hung or far too slow evaluator: "
                                       "check eval.engine / data.num_heldout)") from None
            print(f"[eapo] held-out accuracy (policy alone) at step {version}: {ev0['accuracy']:.3f}", flush=True)
            s.metrics.log(version, {f"heldout_{k}": v for k, v in ev0.items()} | {"heldout_accuracy": ev0["accuracy"]})
            metrics.heldout(run_name, ev0["accuracy"])
        ev = train_loop(cfg, s, state, weights, ev, run_dir)
        loop_seconds = s.breakdown.loop_seconds  # the training loop; the final evaluation is after it
        save_checkpoint(s, state, run_dir)
        summary = write_summary(cfg, s, state, run_dir, ev0, ev, time.time() - t_start, loop_seconds)
        a = summary["accounting"]
        b, n = a["batches"], a["samples"]
        terms = " + ".join(f"{k.replace('_', ' ')} {b[k]} ({n[k]})" for k in b if k != "produced")
        print(f"[eapo] accounting: produced {b['produced']} batches ({n['produced']} samples) = {terms}"
              f"{'' if a['closes'] else '  DOES NOT CLOSE'}", flush=True)
        accounting.check(a)
        if s.final_eval_error:  # never let an older evaluation pass for the run's final accuracy
            raise EvaluationFailed(
                f"the final held-out evaluation (step {state.version}) failed ({s.final_eval_error}); summary.json's "
                f"heldout_end is from step {s.heldout_end_step}. The trained model is saved: evaluate it with "
                f"python -m eapo_ray.evaluate --config {run_dir / 'config.json'} --checkpoint {run_dir / 'final'} "
                f"--data {cfg.data.heldout}" + (f" --limit {cfg.data.num_heldout}" if cfg.data.num_heldout else ""))
        s.metrics.close()
        s.metrics = None
        from eapo_ray.tools.plot import plot_run

        plot_run(run_dir)
        if s.upload and (copied := upload_run(s, "the finished run")) is not None:  # a failure: warned, run kept
            print(f"[eapo] uploaded {copied} files to {cfg.storage_path.rstrip('/')}/{run_name}", flush=True)
    except KeyboardInterrupt:
        # resume= takes the run's saved config: the command works as printed (no checkpoint yet: it starts over)
        hint = "" if has_checkpoint(run_dir) else " (no checkpoint yet: it starts over from step 0, same config)"
        print(f"[eapo] interrupted: shutting the run down; continue with: python -m eapo_ray.launch "
              f"resume={run_dir}{hint}", file=sys.stderr, flush=True)
        raise
    finally:
        s.teardown()
    acc = (f"held-out accuracy {ev0['accuracy']:.3f} -> {ev['accuracy']:.3f}" if ev0 and ev
           else "no held-out evaluation (eval.enabled=false)")
    print(f"[eapo] done in {summary['wall_seconds']:.0f}s: {acc}", flush=True)
    print(f"[eapo] run directory: {run_dir}", flush=True)
    return run_dir
