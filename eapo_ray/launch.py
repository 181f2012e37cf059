"""Run EAPO: ``python -m eapo_ray.launch [--config FILE] [key=value ...]``.

With no arguments it runs the embedded default (the defaults in eapo_ray/config.py: bundled
tiny models, local Ray, CPU); a --config file is a delta on it. Under ``ray job submit`` (RAY_ADDRESS set) it joins that
cluster. Parts, named in the Ray dashboard: the expert Serve app
(<run>-expert), rollout actors (<run>-rollout-i), the buffer (<run>-buffer), the
learners (<run>-learner-r) and the evaluator (<run>-evaluator).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eapo_ray.config import ConfigError, RunConfig, load_config, to_dict
from eapo_ray.ray_runtime import MetricsLog, bounded_call, init_ray, quiet_console, raise_if_interrupted, wait_get

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


@dataclass
class LoopState:
    """The driver's counters; saved beside each checkpoint so a resumed run continues them."""
    version: int = 0  # learner updates done (= the policy version)
    samples: int = 0  # samples trained on
    generated: int = 0  # samples generated (including dropped groups)
    serial: int = 0  # rollout batches requested so far; batch n's prompts and coins come from its serial
    by_worker: dict = field(default_factory=dict)  # rollout batches delivered per actor
    first_rollout: dict | None = None
    last_rollout: dict | None = None
    logp_gap_max: float = 0.0  # max |behaviour - learner| log-prob on policy tokens seen in the run

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "LoopState":
        data = json.loads(path.read_text())
        data["by_worker"] = {int(k): v for k, v in data.get("by_worker", {}).items()}
        return cls(**data)


def prepare_run_dir(cfg: RunConfig) -> tuple[str, Path]:
    run_name = cfg.run_name or (Path(cfg.resume).name if cfg.resume else time.strftime("eapo-%Y%m%d-%H%M%S"))
    run_dir = Path(cfg.resume).resolve() if cfg.resume else Path(cfg.run_root).resolve() / run_name
    if cfg.resume and not (run_dir / "checkpoint").is_dir():
        raise ConfigError(f"config key 'resume': {run_dir} has no checkpoint/ to resume from")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return run_name, run_dir


def start_system(cfg: RunConfig, run_name: str, run_dir: Path, s: System) -> int:
    """Ray, the Serve expert, buffer, learners, rollout actors and evaluator, filled into
    `s` as they come up (so a failure half-way is torn down). Returns the policy version
    (> 0 when resuming)."""
    import ray
    from ray import serve

    from eapo_ray.buffer import TrajectoryBuffer
    from eapo_ray.expert import run_expert_app
    from eapo_ray.learner import LearnerGroup
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


def replace_hung_evaluator(cfg: RunConfig, s: System) -> None:
    """An evaluation ran past eval.timeout_s: kill the evaluator (the calls queued behind the hung
    one fail at once instead of each waiting out its own deadline) and start a fresh one."""
    import ray

    s.evaluator_restarts += 1
    print(f"[eapo] warning: the evaluator hung (an evaluation ran past eval.timeout_s={cfg.eval.timeout_s:g} s): "
          "replacing it", file=sys.stderr, flush=True)
    ray.kill(s.evaluator, no_restart=True)
    s.evaluator = start_evaluator(cfg, f"{s.run_name}-r{s.evaluator_restarts}")


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


def resume_metrics(run_dir: Path, version: int, evaluations: bool = True) -> tuple[dict | None, dict | None]:
    """On resume: drop metric rows logged after the checkpoint (they are redone), and return
    the first and last held-out evaluations already logged (None when there are none, or when
    not `evaluations`: a run resumed with eval.enabled=false must not report an earlier attempt's)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None, None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row["step"] <= version]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    evals = [{k[len("heldout_"):]: v for k, v in row.items() if k.startswith("heldout_")}
             for row in rows if "heldout_accuracy" in row]
    return (evals[0], evals[-1]) if evals and evaluations else (None, None)


def run(cfg: RunConfig) -> Path:
    """Start the system, train `cfg.steps` policy versions, write the summary; always tear down."""
    import ray

    from eapo_ray import accounting, metrics

    t_start = time.time()
    quiet_console(cfg.verbose)
    run_name, run_dir = prepare_run_dir(cfg)
    cfg.run_name = run_name  # actors tag their metrics with it
    print(f"[eapo] run directory: {run_dir}", flush=True)
    s = System(accounting=accounting.Accounting())
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
        s.metrics = MetricsLog(run_dir, purge_step=version + 1 if cfg.resume else None)
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
                f"python -m eapo_ray.evaluate --checkpoint {run_dir / 'final'}")
        s.metrics.close()
        s.metrics = None
        from eapo_ray.tools.plot import plot_run

        plot_run(run_dir)
    except KeyboardInterrupt:
        ckpt = run_dir / "checkpoint"
        hint = (f"; continue with: python -m eapo_ray.launch resume={run_dir}"
                if ckpt.is_dir() and any(ckpt.iterdir()) else " (no checkpoint yet: set checkpoint_every to resume)")
        print(f"[eapo] interrupted: shutting the run down{hint}", file=sys.stderr, flush=True)
        raise
    finally:
        s.teardown()
    acc = (f"held-out accuracy {ev0['accuracy']:.3f} -> {ev['accuracy']:.3f}" if ev0 and ev
           else "no held-out evaluation (eval.enabled=false)")
    print(f"[eapo] done in {summary['wall_seconds']:.0f}s: {acc}", flush=True)
    print(f"[eapo] run directory: {run_dir}", flush=True)
    return run_dir


def next_batches(cfg: RunConfig, s: System, state: LoopState, rollout_weights, pending: deque) -> tuple[list, list]:
    """Keep every idle rollout actor busy while the buffer has room, enqueue the batches
    they return (the driver owns them), and return the buffer's next item once there is
    one, with the stats of the rollout batches that finished meanwhile."""
    import ray

    from eapo_ray import metrics
    from eapo_ray.buffer import BufferItem

    rollouts = []
    while True:
        raise_if_interrupted()  # a Ctrl-C whose KeyboardInterrupt a library swallowed still stops the run
        feed(cfg, s, state, rollout_weights, pending)
        while pending and ray.get(s.buffer.offer.remote(pending[0].box, pending[0].version, pending[0].num_samples),
                                       timeout=BUFFER_CALL_S):
            pending.popleft()
        items = ray.get(s.buffer.get.remote(1, state.version, timeout_s=0), timeout=BUFFER_CALL_S)
        if items:
            return items, rollouts
        for res in s.fleet.wait(timeout_s=5.0):
            if res.stats is None:
                metrics.rollout_failure(s.run_name, res.worker)
                continue
            if s.accounting is not None:
                s.accounting.rollout(res.stats)
            metrics.rollout_batch(s.run_name, res.stats)
            rollouts.append(res.stats)
            if res.stats["kept_samples"]:
                if discarded_policy(s, res.stats["version"], res.tag):
                    if s.accounting is not None:
                        s.accounting.discarded(res.stats["kept_samples"])
                    continue
                pending.append(BufferItem(res.stats["version"], [res.batch], res.stats["kept_samples"]))


def discarded_policy(s: System, version: int, generation: int | None) -> bool:
    """Whether a batch generated at `version` by a call submitted while learner group `generation`
    was training comes from a policy a later rebuild threw away (a version newer than the
    checkpoint that rebuild went back to)."""
    later = s.rollbacks[generation or 0:]
    return bool(later) and version > min(later)


def feed(cfg: RunConfig, s: System, state: LoopState, rollout_weights, pending: deque) -> None:
    """Submit a batch to an idle actor while the batches ahead of the learner (being generated,
    finished, or in the buffer) are fewer than `buffer.capacity` (so capacity also bounds how
    stale a batch can get; set it >= rollout.num_actors to keep every actor busy); synchronous
    (rollout.overlap=false): one batch, only when there is none, i.e. the learner needs data now."""
    import ray

    room = cfg.buffer.capacity if cfg.rollout.overlap else 1
    idle = s.fleet.idle()
    if not idle:
        return
    # + in flight, which grows as we submit
    ahead = ray.get(s.buffer.stats.remote(), timeout=BUFFER_CALL_S)["size"] + len(pending)
    for i in idle:
        if ahead + s.fleet.num_inflight >= room:
            return
        s.fleet.submit(i, tag=s.learner_restarts, step=state.version, weights=rollout_weights, serial=state.serial)
        state.serial += 1


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


def train_loop(cfg: RunConfig, s: System, state: LoopState, weights, ev: dict | None, run_dir: Path) -> dict | None:
    """Policy versions state.version .. cfg.steps: take a batch from the buffer, train, send
    the new weights, evaluate and checkpoint on schedule. Returns the last evaluation.

    Each metrics row carries the step's time breakdown (`time_*`, seconds of driver wall time:
    waiting for data, feeding actors, the learner call, publishing, evaluation, the rest =
    driver overhead) and the run's idle fractions so far (`learner_idle_frac`,
    `rollout_idle_frac`); `s.breakdown` collects the totals for the summary."""
    import ray

    from eapo_ray import metrics
    from eapo_ray.progress import show_progress

    LEARNER_DIED = ray.exceptions.RayActorError  # noqa: N806 -- a learner actor died mid-call
    nccl = cfg.rollout.weight_sync == "nccl"
    rollout_weights = None if nccl else weights
    pending = s.pending  # finished batches the buffer had no room for yet
    t_loop, first, generated0 = time.time(), state.version, state.generated
    rows = PendingRows(s.metrics.log, s.run_name, timeout_s=cfg.eval.timeout_s,
                       on_timeout=lambda: replace_hung_evaluator(cfg, s))
    bd = s.breakdown = Breakdown(num_actors=cfg.rollout.num_actors)
    retry = None  # batches to train on again after the learners were rebuilt
    while state.version < cfg.steps:
        raise_if_interrupted()
        t_step = time.time()
        tm = dict.fromkeys(("wait_data_s", "feed_s", "train_call_s", "publish_s", "eval_s"), 0.0)
        if retry is None:
            items, rollouts = next_batches(cfg, s, state, rollout_weights, pending)
            tm["wait_data_s"] = time.time() - t_step
            t = time.time()
            if cfg.rollout.overlap:  # keep the fleet generating (with these weights) while the learner trains
                feed(cfg, s, state, rollout_weights, pending)
            tm["feed_s"] = time.time() - t
            for st in rollouts:
                state.by_worker[st["worker"]] = state.by_worker.get(st["worker"], 0) + 1
                state.generated += st["samples"]
                state.first_rollout = state.first_rollout or st
                state.last_rollout = st
                bd.rollout(st)
        else:
            items, retry = retry, None
        try:
            t = time.time()
            stats = s.learners.train_step(items)
            tm["train_call_s"] = time.time() - t
        except LEARNER_DIED as e:  # rebuilt from the last checkpoint; the same batches again, unless
            rollout_weights = rebuild_learners(cfg, s, state, run_dir, e, rows)  # made by a discarded policy
            retry = [it for it in items if it.version <= state.version] or None
            for it in items:
                if it.version > state.version and s.accounting is not None:
                    s.accounting.discarded(it.num_samples)
            continue
        if s.accounting is not None:
            s.accounting.step([it.num_samples for it in items], stats.get("lost_batches", 0), stats["learner_samples"],
                              version=state.version + 1)
        state.version += 1
        done = state.version >= cfg.steps
        eval_due = cfg.eval.enabled and (done or (cfg.eval.every and state.version % cfg.eval.every == 0))
        try:
            t = time.time()
            if nccl:
                stats["weight_sync_seconds"] = s.learners.sync_weights()
            weights = s.learners.publish() if eval_due or not nccl else None
            tm["publish_s"] = time.time() - t
        except LEARNER_DIED as e:
            rollout_weights = rebuild_learners(cfg, s, state, run_dir, e, rows)
            continue
        rollout_weights = None if nccl else weights
        state.samples += stats["learner_samples"]
        state.logp_gap_max = max(state.logp_gap_max, stats.get("logp_gap_max", 0.0))
        elapsed = time.time() - t_loop
        row = {**{f"rollout_{k}": v for k, v in (state.last_rollout or {}).items()},
               **stats, "samples": state.samples, "generated": state.generated,
               "samples_per_s": (state.generated - generated0) / max(elapsed, 1e-9),  # this attempt
               **_buffer_stats(s.buffer)}
        acc = s.accounting
        metrics.train_step(s.run_name, state.version, stats,
                           {"size": row["buffer_size"], "dropped_stale": row["buffer_dropped_stale"],
                            "dropped_discarded": row.get("buffer_dropped_discarded", 0)},
                           acc.lost_batches if acc is not None else stats.get("lost_batches", 0),
                           acc.rolled_back_batches if acc is not None else 0, acc.discarded_batches if acc is not None else 0)
        if state.last_rollout:  # the newest finished rollout batch
            row.update(reward=state.last_rollout["reward"], consult_rate=state.last_rollout["consult_rate"],
                       acceptance_prob=state.last_rollout["acceptance_prob"])
        if eval_due and rows.evaluating:  # at most one evaluation out: each holds a copy of the weights
            tm["eval_s"] = rows.flush(wait=True)
        ref = s.evaluator.evaluate.remote(weights) if eval_due else None
        eval_deadline = time.time() + cfg.eval.timeout_s
        if ref is not None and not cfg.eval.overlap:  # wait here (eval.overlap: the evaluator runs beside training)
            t = time.time()
            try:
                wait_get(ref, cfg.eval.timeout_s, fetch=False)
            except ray.exceptions.GetTimeoutError:
                pass  # PendingRows counts it as failed at its deadline
            tm["eval_s"] += time.time() - t
        bd.step(tm, stats, time.time() - t_step)
        row.update({f"time_{k}": v for k, v in bd.last.items()}, **bd.idle(time.time() - t_loop))
        rows.add(state.version, row, ref, eval_deadline)
        rows.flush()  # the rows whose evaluation is back, in step order
        ev = rows.last or ev
        eta = elapsed / (state.version - first) * (cfg.steps - state.version)
        show_progress(state.version, cfg.steps, row, ev["accuracy"] if ev else float("nan"), stats.get("staleness", 0),
                      eta)
        if cfg.checkpoint_every and state.version % cfg.checkpoint_every == 0 and not done:
            # every row up to the checkpoint is on disk before it (a resumed run keeps them)
            bd.after_row("eval_s", rows.flush(wait=True))
            t = time.time()
            try:
                save_checkpoint(s, state, run_dir)
            except LEARNER_DIED as e:
                rollout_weights = rebuild_learners(cfg, s, state, run_dir, e, rows)
            bd.after_row("checkpoint_s", time.time() - t)
    bd.loop_seconds = time.time() - t_loop
    bd.final_eval_s = rows.flush(wait=True)  # the last evaluation, outside the training loop's clock
    s.heldout_end_step = rows.last_step
    s.final_eval_error = rows.failed.get(state.version)  # run() raises it once the model and summary are saved
    return rows.last or ev


class Breakdown:
    """Where the training loop's time went, summed over steps: the driver's own clock per step
    (wait for data, feed, learner call, publish, evaluation, overhead), the learner's train_step
    parts and the rollout actors' produce parts; idle fractions of the learner and the actors."""
    DRIVER = ("wait_data_s", "feed_s", "train_call_s", "publish_s", "eval_s", "checkpoint_s", "driver_overhead_s",
              "step_s")
    LEARNER = ("train_seconds", "fetch_s", "prep_s", "old_logp_s", "forward_s", "backward_s", "optim_s")
    ROLLOUT = ("produce_s", "load_weights_s", "engine_s", "expert_wait_s", "expert_busy_s", "reward_s", "pack_s")

    def __init__(self, num_actors: int):
        self.num_actors = num_actors
        self.driver = dict.fromkeys(self.DRIVER, 0.0)
        self.learner = dict.fromkeys(self.LEARNER, 0.0)
        self.rollouts = dict.fromkeys(self.ROLLOUT, 0.0)
        self.steps = self.batches = 0
        self.last: dict = {}
        self.loop_seconds = self.final_eval_s = 0.0

    def rollout(self, st: dict) -> None:
        self.batches += 1
        for k in self.ROLLOUT:
            self.rollouts[k] += st.get(k, 0.0)

    def step(self, tm: dict, stats: dict, step_s: float) -> None:
        self.steps += 1
        over = step_s - sum(tm.values())
        self.last = {**tm, "driver_overhead_s": over, "step_s": step_s}
        for k, v in self.last.items():
            self.driver[k] += v
        for k in self.LEARNER:
            self.learner[k] += stats.get(k, 0.0)

    def after_row(self, key: str, seconds: float) -> None:
        """Time the driver spent for a step after its row was written (the evaluation wait and the
        save at a checkpoint): in the totals, as part `key` and in step_s, so the parts still sum
        to step_s (the step's own row does not show it)."""
        self.driver[key] += seconds
        self.driver["step_s"] += seconds

    def idle(self, elapsed: float) -> dict:
        """Idle fractions over the loop so far: the learner outside train_step, the actors outside
        produce (batches delivered so far; a batch still in flight counts as idle until it lands)."""
        from eapo_ray.timing import fraction

        return {"learner_idle_frac": 1.0 - fraction(self.learner["train_seconds"], elapsed),
                "rollout_idle_frac": 1.0 - fraction(self.rollouts["produce_s"], elapsed * self.num_actors)}

    def summary(self) -> dict:
        n, b = max(self.steps, 1), max(self.batches, 1)
        return {"steps": self.steps, "rollout_batches": self.batches, "loop_seconds": self.loop_seconds,
                "final_eval_seconds": self.final_eval_s,
                "driver_per_step": {k: v / n for k, v in self.driver.items()},
                "learner_per_step": {k: v / n for k, v in self.learner.items()},
                "rollout_per_batch": {k: v / b for k, v in self.rollouts.items()},
                **self.idle(self.loop_seconds)}


class LearnerFailed(RuntimeError):
    pass


class EvaluationFailed(RuntimeError):
    pass


def rebuild_learners(cfg: RunConfig, s: System, state: LoopState, run_dir: Path, error: Exception,
                     rows: PendingRows | None = None):
    """A learner actor died: rebuild the learner group from the last checkpoint, or from the
    start when there is none yet (at most `learner.max_restarts` times in a launch), and roll
    the driver's counters back to it (batch serials keep going: no prompt is replayed; the
    steps after it are redone). Returns the weights the rollout actors should load. Raises
    LearnerFailed, naming the resume command when there is a checkpoint, when no restart is
    left (or under NCCL, where rollout engines cannot rejoin a new weight group)."""
    err = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    ckpt = run_dir / "checkpoint"
    has_ckpt = (ckpt / "latest").exists()
    nccl = cfg.rollout.weight_sync == "nccl"
    if nccl or s.learner_restarts >= cfg.learner.max_restarts:
        why = ("rollout engines cannot rejoin a new NCCL weight group" if nccl else
               f"rebuilt {s.learner_restarts} times already (learner.max_restarts={cfg.learner.max_restarts})")
        raise LearnerFailed(
            f"a learner died at step {state.version + 1} ({err}); {why}. "
            + (f"Continue from the last checkpoint with: python -m eapo_ray.launch resume={run_dir} "
               "(with this run's config and overrides)" if has_ckpt else
               "There is no checkpoint to resume from (set checkpoint_every)."))
    s.learner_restarts += 1
    if rows is not None:  # rows still waiting for an evaluation are written first (resume_metrics trims them)
        rows.flush(wait=True)
    print(f"[eapo] a learner died near step {state.version + 1} ({err}); rebuilding the learner group from "
          + ("the last checkpoint" if has_ckpt else "the start (no checkpoint yet: set checkpoint_every)")
          + f" (restart {s.learner_restarts}/{cfg.learner.max_restarts})", flush=True)
    from eapo_ray.learner import LearnerGroup

    try:
        s.learners.shutdown()
    except Exception:  # noqa: BLE001 -- the group is broken anyway
        pass
    s.learners = LearnerGroup(cfg, s.run_name, generation=s.learner_restarts)
    version = s.learners.setup(str(ckpt) if has_ckpt else "")
    state.version, state.samples = version, load_driver_state(run_dir, version).samples
    resume_metrics(run_dir, version)  # the steps after the checkpoint are redone: their rows go
    # batches made by the versions after `version` come from a policy that no longer exists: dropped
    # (buffer, driver-held, and, as they arrive, in flight: discarded_policy), and the training of the
    # steps after it is counted as rolled back
    s.rollbacks.append(version)
    import ray

    ray.get(s.buffer.rollback.remote(version), timeout=BUFFER_CALL_S)
    for it in [it for it in s.pending if it.version > version]:
        s.pending.remove(it)
        if s.accounting is not None:
            s.accounting.discarded(it.num_samples)
    if s.accounting is not None:
        s.accounting.rollback(version)
    print(f"[eapo] learner group rebuilt at version {version}; redoing the steps after it", flush=True)
    return s.learners.publish()


def save_checkpoint(s: System, state: LoopState, run_dir: Path) -> None:
    """The learners' checkpoint (tag step<version>) and the driver's counters for that same
    version, written first: a driver killed at any point resumes with the counters (batch
    serials, hence prompts and coins) of the checkpoint it resumes from."""
    import re

    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    state.save(ckpt / f"driver_state_step{state.version}.json")
    s.learners.save(str(run_dir))
    state.save(ckpt / "driver_state.json")  # the newest, for people and tools
    tags = {p.name for p in ckpt.iterdir() if p.is_dir()}
    for p in ckpt.glob("driver_state_step*.json"):  # keep those of the tags the learners kept
        m = re.fullmatch(r"driver_state_(step\d+)\.json", p.name)
        if m and m.group(1) not in tags:
            p.unlink(missing_ok=True)


def load_driver_state(run_dir: Path, version: int) -> LoopState:
    """The driver's counters saved with checkpoint `version` (else the newest, else fresh)."""
    ckpt = run_dir / "checkpoint"
    for path in (ckpt / f"driver_state_step{version}.json", ckpt / "driver_state.json"):
        if path.exists():
            return LoopState.load(path)
    return LoopState()


def write_summary(cfg: RunConfig, s: System, state: LoopState, run_dir: Path, ev0: dict | None, ev: dict | None,
                  wall_seconds: float, loop_seconds: float) -> dict:
    summary = {
        "heldout_accuracy_start": (ev0 or {}).get("accuracy"), "heldout_accuracy_end": (ev or {}).get("accuracy"),
        "heldout_start": ev0, "heldout_end": ev, "heldout_end_step": s.heldout_end_step,
        "heldout_end_error": s.final_eval_error, "steps": state.version, "samples": state.samples,
        "generated_samples": state.generated, "wall_seconds": wall_seconds, "loop_seconds": loop_seconds,
        "consult_rate_start": (state.first_rollout or {}).get("consult_rate", 0.0),
        "consult_rate_end": (state.last_rollout or {}).get("consult_rate", 0.0),
        "logp_gap_max": state.logp_gap_max,
        "seed": cfg.seed, "buffer": _buffer_stats(s.buffer), "rollout_batches_by_worker": state.by_worker,
        "rollout_actors_retired": sorted(s.fleet.retired), "rollout_failed_calls": s.fleet.failed_calls,
        "learner_restarts": s.learner_restarts,
        "checkpoint": str(run_dir / "final"),
    }
    if s.breakdown is not None:
        summary["breakdown"] = s.breakdown.summary()
    if s.accounting is not None:
        import ray

        summary["accounting"] = s.accounting.close(ray.get(s.buffer.stats.remote(), timeout=BUFFER_CALL_S),
                                                   [p.num_samples for p in s.pending], s.fleet.num_inflight)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _buffer_stats(buffer) -> dict:
    import ray

    return {f"buffer_{k}": v for k, v in ray.get(buffer.stats.remote(), timeout=BUFFER_CALL_S).items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m eapo_ray.launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python -m eapo_ray.launch steps=10 rollout.num_actors=2\n"
               "  python -m eapo_ray.launch --config configs/paper/rl.yaml seed=1 learner.num_learners=2\n"
               "  python -m eapo_ray.launch --config configs/smollm2_cpu.yaml --print-config")
    ap.add_argument("--config", default=None,
                    help="YAML delta on the embedded default (keys it names; `base: other.yaml` chains files)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    ap.add_argument("--verbose", action="store_true",
                    help="also print Serve access logs and Ray/transformers INFO lines (config key: verbose)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys (e.g. learner.lr=1e-4)")
    args = ap.parse_args(argv)
    from eapo_ray.accounting import AccountingError
    from eapo_ray.learner import PlacementError
    from eapo_ray.rollout.fleet import FleetError

    try:
        cfg = load_config(args.config, args.overrides + (["verbose=true"] if args.verbose else []))
        if args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FleetError, AccountingError, LearnerFailed, PlacementError, EvaluationFailed, ExpertStartError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
