"""Start-up and teardown of a run's parts: Ray, the expert's Serve app, the buffer, the learner
group, the rollout actors and the evaluator (`start_system`), and `System`, the handles of what
was started, whose `teardown` (called in `finally`) releases each part on its own."""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from eapo_ray.config import RunConfig
from eapo_ray.ray_runtime import MetricsLog, bounded_call, init_ray, raise_if_interrupted

# The buffer's methods never block (offer refuses when full, get takes timeout_s=0), so a call
# not back in this time means its actor is stuck: fail (GetTimeoutError) rather than hang.
BUFFER_CALL_S = 60.0


TEARDOWN_SERVE_S = 60.0  # the expert app's deletion at teardown (normally ~1 s)


@dataclass
class System:
    """Handles of the running parts; `teardown` releases whichever were started."""
    run_name: str = ""
    app_name: str | None = None  # the expert's Serve app (None: no expert this run)
    buffer: object = None
    learners: object = None  # learner.LearnerGroup
    workers: list = field(default_factory=list)  # rollout actors
    fleet: object = None  # rollout.fleet.RolloutFleet
    evaluator: object = None
    evaluator_restarts: int = 0  # hung evaluators replaced (replace_hung_evaluator)
    metrics: MetricsLog | None = None
    accounting: object = None  # accounting.Accounting of this launch
    learner_restarts: int = 0  # learner groups rebuilt from a checkpoint
    rollbacks: list = field(default_factory=list)  # the version each rebuild went back to, in order
    pending: deque = field(default_factory=deque)  # finished batches the buffer had no room for yet
    breakdown: object = None  # train_loop's Breakdown (where the loop's time went)
    heldout_end_step: int | None = None  # the step of the last held-out evaluation that came back
    final_eval_error: str | None = None  # the final step's evaluation failed (the run then exits 1)

    def teardown(self) -> None:
        """Stop everything that was started, each part on its own (one failing does not keep
        the others, e.g. the expert's GPUs, alive)."""
        import ray

        steps = [("metrics", lambda: self.metrics and self.metrics.close()),
                 ("rollout fleet", lambda: self.fleet and self.fleet.cancel_all()),
                 ("rollout engines", lambda: self.workers and ray.wait(
                     [w.shutdown.remote() for w in self.workers], num_returns=len(self.workers), timeout=30)),
                 *[(f"rollout actor {i}", lambda w=w: ray.kill(w, no_restart=True)) for i, w in enumerate(self.workers)],
                 ("evaluator", lambda: self.evaluator and ray.kill(self.evaluator, no_restart=True)),
                 ("learners", lambda: self.learners and self.learners.shutdown()),
                 ("buffer", lambda: self.buffer and ray.kill(self.buffer, no_restart=True))]
        if self.app_name:
            from ray import serve

            # serve.delete waits on Serve's controller with no timeout of its own: a hung controller
            # must not hold the driver (signals are ignored during teardown)
            steps.append(("expert", lambda: bounded_call(lambda: serve.delete(self.app_name), TEARDOWN_SERVE_S,
                                                         "serve.delete", check_interrupt=False)))
        # A second Ctrl-C or a SIGTERM while tearing down must not skip the rest (the Serve app
        # and its GPUs would outlive the driver on a joined cluster): both are ignored until done.
        held = _hold_signals()
        try:
            for what, fn in steps:
                try:
                    fn()
                except BaseException as e:  # noqa: BLE001 -- keep tearing down the rest
                    print(f"[eapo] teardown of {what} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            _restore_signals(held)


def _hold_signals() -> dict:
    """Ignore SIGINT and SIGTERM (main thread only); returns the handlers to restore."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(held: dict) -> None:
    import signal

    for sig, handler in held.items():
        signal.signal(sig, handler)


def start_system(cfg: RunConfig, run_name: str, run_dir: Path, s: System) -> int:
    """Ray, the Serve expert, buffer, learners, rollout actors and evaluator, filled into
    `s` as they come up (so a failure half-way is torn down). Returns the policy version
    (> 0 when resuming)."""
    import ray
    from ray import serve

    from eapo_ray.buffer import TrajectoryBuffer
    from eapo_ray.expert import run_expert_app
    from eapo_ray.learner.group import LearnerGroup
    from eapo_ray.models import resolve_models
    from eapo_ray.rollout.actor import remote_worker_cls
    from eapo_ray.rollout.fleet import RolloutFleet

    resolve_models(cfg)  # model names (e.g. smollm2-135m) -> directories, built on first use
    r, lc, ec = cfg.rollout, cfg.learner, cfg.expert
    s.run_name = run_name
    required = r.num_actors * r.num_cpus + lc.num_learners * lc.num_cpus + ec.max_replicas * ec.num_cpus + (
        cfg.eval.num_cpus if cfg.eval.enabled else 0)
    url = init_ray(cfg, required, reaper=True)
    print(f"[eapo] dashboard: {url or '(none)'}", flush=True)
    # where tools find this run's cluster (python -m eapo_ray.expert scale --run-dir ...)
    (run_dir / "ray_address").write_text(ray.get_runtime_context().gcs_address + "\n")
    if cfg.acceptance.kind != "constant" or cfg.acceptance.start > 0:
        s.app_name = f"{run_name}-expert"
        # no access line per expert request (the replica logs keep warnings and errors) unless --verbose
        logs = {} if cfg.verbose else {"logging_config": {"log_level": "WARNING", "enable_access_log": False}}
        serve.start(proxy_location="Disabled", **logs)
        # registered now (handles can be made), RUNNING later: the replicas load while the rest sets up
        serve.run_many([serve.RunTarget(run_expert_app(cfg, cfg.model.expert), name=s.app_name, route_prefix=None,
                                        **logs)], wait_for_applications_running=False)
    # The buffer shares the driver's fate anyway: on the driver's node (a 0-CPU actor could otherwise land on
    # any node, e.g. a rollout node that dies); the evaluator prefers it too (soft: a GPU evaluator goes elsewhere)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    s.buffer = TrajectoryBuffer.options(
        name=f"{run_name}-buffer", scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(cfg.buffer.capacity, cfg.buffer.max_staleness)
    # Rollout engines and the evaluator load their models while the learners set up.
    s.workers = [remote_worker_cls().options(name=f"{run_name}-rollout-{i}", num_cpus=r.num_cpus,
                                             num_gpus=r.num_gpus, max_task_retries=0,
                                             resources={r.node_resource: 1} if r.node_resource else None,
                                             # a restarted engine cannot rejoin the NCCL weight group
                                             max_restarts=0 if r.weight_sync == "nccl" else 3)
                 .remote(cfg, i, s.app_name) for i in range(r.num_actors)]
    s.evaluator = start_evaluator(cfg, run_name) if cfg.eval.enabled else None
    s.learners = LearnerGroup(cfg, run_name)
    version = s.learners.setup(str(run_dir / "checkpoint") if cfg.resume else "")
    if s.app_name:
        wait_expert_running(s.app_name, ec.start_timeout_s)
        print(f"[eapo] expert Serve app '{s.app_name}' up ({ec.min_replicas}-{ec.max_replicas} replicas)", flush=True)
    s.fleet = RolloutFleet(s.workers, max_failures=r.max_actor_failures, max_empty=r.max_empty_batches,
                           restart_timeout_s=r.restart_timeout_s)
    if r.weight_sync == "nccl":
        start_nccl_weight_sync(s.learners, s.workers)
    return version


def start_evaluator(cfg: RunConfig, name: str):
    """The held-out evaluator actor (its own policy copy), preferring the driver's node (soft: a GPU
    evaluator may go elsewhere)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from eapo_ray.evaluate import Evaluator

    here = ray.get_runtime_context().get_node_id()
    return ray.remote(Evaluator).options(name=f"{name}-evaluator", num_cpus=cfg.eval.num_cpus,
                                         num_gpus=cfg.eval.num_gpus,
                                         scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
                                         ).remote(cfg)



class ExpertStartError(RuntimeError):
    """The expert's Serve app failed to deploy or did not reach RUNNING in time."""


def wait_expert_running(app_name: str, timeout_s: float, poll_s: float = 0.25) -> None:
    """Block until the Serve app is RUNNING (bounded by `timeout_s`); raise ExpertStartError with
    Serve's own message when it failed to deploy or the time ran out."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while True:
        raise_if_interrupted()
        try:  # a ray.get on Serve's controller with no timeout of its own
            app = bounded_call(serve.status, max(1.0, deadline - time.monotonic()), "serve.status()")
        except TimeoutError as e:
            raise ExpertStartError(f"the expert Serve app '{app_name}' did not come up: Serve's controller did not "
                                   f"answer ({e}; expert.start_timeout_s={timeout_s:g})") from None
        app = app.applications.get(app_name)
        status = app.status if app else "NOT_STARTED"
        if status == ApplicationStatus.RUNNING:
            return
        failed = status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY)
        if failed or time.monotonic() > deadline:
            why = "failed to deploy" if failed else f"not RUNNING after {timeout_s:.0f} s"
            msg = (app.message if app else "") or "no message from Serve"
            raise ExpertStartError(f"the expert Serve app '{app_name}' {why} (status {status}): {msg}. Check "
                                   "expert.num_cpus / expert.num_gpus against the cluster, model.expert, and "
                                   "expert.start_timeout_s.")
        time.sleep(poll_s)


def start_nccl_weight_sync(learners, workers) -> float:
    """GPU path: open the NCCL group between learner rank 0 and every rollout engine, then
    send the current weights at once (engines start from the base model; after a resume the
    learner is ahead of them). Returns the seconds the first sync took."""
    learners.init_weight_sync(workers)
    return learners.sync_weights()
