"""Held-out evaluation during a run: metric rows that wait for their step's evaluation
(`PendingRows`, written in step order), and a hung evaluator replaced by a fresh one."""
from __future__ import annotations

import sys
import time
from collections import deque

from eapo_ray.config import RunConfig
from eapo_ray.driver.system import System, start_evaluator
from eapo_ray.ray_runtime import wait_get


class PendingRows:
    """Metrics rows waiting for their held-out evaluation (eval.overlap: the evaluator runs beside
    training on the step's published weights). Rows are written in step order, each with the
    evaluation of its own step's weights, once that evaluation is back."""

    def __init__(self, log, run_name: str, ready=None, get=None, timeout_s: float = 3600.0, on_timeout=None):
        """`log(step, row)` writes a row; `ready(ref)` / `get(ref, timeout=)` (default: ray.wait with
        no wait, a sliced ray.get (wait_get)) look at an evaluation's result; an evaluation not back `timeout_s` after
        it was added counts as failed (eval.timeout_s) and `on_timeout()` is called (the launcher
        replaces the hung evaluator)."""
        import ray

        self.log, self.run_name, self.timeout_s = log, run_name, timeout_s
        self.on_timeout = on_timeout
        self.ready = ready or (lambda ref: bool(ray.wait([ref], timeout=0)[0]))
        self.get = get or (lambda ref, timeout: wait_get(ref, timeout))  # sliced: a Ctrl-C is not held up
        self.rows: deque = deque()  # (step, row, eval ObjectRef or None, deadline)
        self.last: dict | None = None  # the newest evaluation written
        self.last_step: int | None = None  # the step it evaluated
        self.failed: dict[int, str] = {}  # step -> the error of its evaluation

    @property
    def evaluating(self) -> bool:
        """An evaluation is still out (its row not yet written)."""
        return any(ref is not None for _, _, ref, _ in self.rows)

    def add(self, step: int, row: dict, ref=None, deadline: float | None = None) -> None:
        """`deadline` (time.time()): when the evaluation counts as failed (default: timeout_s from now)."""
        self.rows.append((step, row, ref, deadline or time.time() + self.timeout_s))

    def flush(self, wait: bool = False) -> float:
        """Write the rows whose evaluation is back (all, waiting, if `wait`). Returns the seconds
        spent waiting for evaluations."""
        import ray

        from eapo_ray import metrics

        waited = 0.0
        while self.rows:
            step, row, ref, deadline = self.rows[0]
            if ref is not None:
                t = time.time()
                if not wait and not self.ready(ref) and t < deadline:
                    break
                try:
                    ev = self.get(ref, timeout=max(0.0, deadline - t))  # GetTimeoutError past the deadline
                except ray.exceptions.RayError as e:  # e.g. its weights' owner (a learner) died meanwhile
                    if isinstance(e, ray.exceptions.GetTimeoutError) and self.on_timeout is not None:
                        self.on_timeout()
                    row["heldout_error"] = self.failed[step] = f"{type(e).__name__}"
                    print(f"[eapo] warning: the held-out evaluation of step {step} failed ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); its row has no accuracy",
                          file=sys.stderr, flush=True)
                    ev = None
                waited += time.time() - t
                if ev is not None:
                    row.update({f"heldout_{k}": v for k, v in ev.items()}, heldout_accuracy=ev["accuracy"])
                    metrics.heldout(self.run_name, ev["accuracy"])
                    self.last, self.last_step = ev, step
            self.log(step, row)
            self.rows.popleft()
        return waited


def replace_hung_evaluator(cfg: RunConfig, s: System) -> None:
    """An evaluation ran past eval.timeout_s: kill the evaluator (the calls queued behind the hung
    one fail at once instead of each waiting out its own deadline) and start a fresh one."""
    import ray

    s.evaluator_restarts += 1
    print(f"[eapo] warning: the evaluator hung (an evaluation ran past eval.timeout_s={cfg.eval.timeout_s:g} s): "
          "replacing it", file=sys.stderr, flush=True)
    ray.kill(s.evaluator, no_restart=True)
    s.evaluator = start_evaluator(cfg, f"{s.run_name}-r{s.evaluator_restarts}")
