"""Start-up and teardown of a run's parts: Ray, the learners' placement group (reserved first),
the expert's Serve app, the buffer, the rollout actors, the evaluator and the learner group
(`start_system`), and `System`, the handles of what
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
    learner_pg: object = None  # the learners' placement group, reserved first (owned by `learners` once made)
    workers: list = field(default_factory=list)  # rollout actors
    fleet: object = None  # rollout.fleet.RolloutFleet
    evaluator: object = None
    evaluator_restarts: int = 0  # hung evaluators replaced (replace_hung_evaluator)
    metrics: MetricsLog | None = None
    upload: object = None  # storage.sync_run for this run (config key storage_path): after each checkpoint, at the end
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
                 ("learners", lambda: self.learners.shutdown() if self.learners else (
                     self.learner_pg and ray.util.remove_placement_group(self.learner_pg))),
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
    """Ray, the learners' placement group (reserved before anything else asks for resources:
    docs/gpu.md, "Placement"), the Serve expert, buffer, rollout actors, evaluator and learners,
    filled into `s` as they come up (so a failure half-way is torn down). Returns the policy
    version (> 0 when resuming)."""
    import ray
    from ray import serve

    from eapo_ray.buffer import TrajectoryBuffer
    from eapo_ray.expert import run_expert_app
    from eapo_ray.learner.group import LearnerGroup, reserve_learners
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
    # The learners' GPUs are reserved before any other part asks for resources (docs/gpu.md, "Placement"):
    # started later, they could find the learner node's GPUs taken by an evaluator or rollout actor that
    # has no node resource, and be split over nodes or starve (learner.group.reserve_learners)
    s.learner_pg = reserve_learners(cfg, run_name)
    print(f"[eapo] learners' resources reserved: {placement_summary(s.learner_pg)}", flush=True)
    for warning in shared_learner_nodes(cfg, s.learner_pg):
        print(f"[eapo] warning: {warning}", file=sys.stderr, flush=True)
    if cfg.acceptance.kind != "constant" or cfg.acceptance.start > 0:
        from eapo_ray.expert_scale import start_bounds

        start_bounds(cfg, run_name, run_dir)  # a resume keeps the replica bounds `expert scale` set
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
    s.workers = [remote_worker_cls().options(**rollout_actor_options(cfg, run_name, i)).remote(cfg, i, s.app_name)
                 for i in range(r.num_actors)]
    s.evaluator = start_evaluator(cfg, run_name) if cfg.eval.enabled else None
    if engines_first(cfg):  # a shared GPU: vLLM's memory profiling must not see the learners' allocations
        wait_actors_ready(s, r.restart_timeout_s, with_evaluator=True)
    s.learners = LearnerGroup(cfg, run_name, pg=s.learner_pg)
    version = s.learners.setup(str(run_dir / "checkpoint") if cfg.resume else "")
    if s.app_name:
        wait_expert_running(s.app_name, ec.start_timeout_s)
        print(f"[eapo] expert Serve app '{s.app_name}' up ({ec.min_replicas}-{ec.max_replicas} replicas)", flush=True)
    s.fleet = RolloutFleet(s.workers, max_failures=r.max_actor_failures, max_empty=r.max_empty_batches,
                           restart_timeout_s=r.restart_timeout_s)
    if r.weight_sync == "nccl":
        # the group's init is bounded by rollout.sync_timeout_s: engines still loading (a 7B vLLM load) must not count
        wait_actors_ready(s, r.restart_timeout_s, with_evaluator=False)
        start_nccl_weight_sync(s.learners, s.workers, r, run_dir)
    return version


def engines_first(cfg: RunConfig) -> bool:
    """Whether the rollout actors and the evaluator must be up before the learners set up: when a
    role holds a fraction of a GPU (rollout.num_gpus, eval.num_gpus or learner.num_gpus strictly
    between 0 and 1), roles may share a card, and vLLM's start-up memory profiling counts what another
    process allocates meanwhile (a learner's DeepSpeed set-up, a second engine) as its own and fails
    (vllm/v1/worker/gpu_worker.py asserts the free memory did not grow; utils.py checks it at start)."""
    gpus = [cfg.rollout.num_gpus, cfg.learner.num_gpus] + ([cfg.eval.num_gpus] if cfg.eval.enabled else [])
    return any(0 < g < 1 for g in gpus)


class StartupError(RuntimeError):
    """A rollout actor or the evaluator did not come up (failed, or not within the time allowed)."""


def wait_actors_ready(s: System, timeout_s: float, *, with_evaluator: bool, slice_s: float = 0.5) -> None:
    """Block until every rollout actor (its `ping`) and, `with_evaluator`, the evaluator are constructed
    (their engines loaded), at most `timeout_s` (rollout.restart_timeout_s), polling in slices with
    raise_if_interrupted. Raises StartupError naming the actors and the key."""
    import ray

    refs = {w.ping.remote(): f"rollout actor {i}" for i, w in enumerate(s.workers)}
    if with_evaluator and s.evaluator is not None:
        refs[s.evaluator.__ray_ready__.remote()] = "the evaluator"
    deadline, waiting = time.monotonic() + timeout_s, list(refs)
    while waiting:
        raise_if_interrupted()
        left = deadline - time.monotonic()
        if left <= 0:
            raise StartupError(f"{', '.join(refs[r] for r in waiting)} not up within rollout.restart_timeout_s="
                               f"{timeout_s:g} s (its engine still loading, or no resources to place it: check "
                               "rollout.num_gpus / eval.num_gpus against the cluster, or raise the key)")
        ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=min(slice_s, left))
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 -- its constructor failed (e.g. the engine ran out of memory)
                from eapo_ray.weight_sync import first_line

                raise StartupError(f"{refs[ref]} failed to start: {first_line(e)}") from None


def rollout_actor_options(cfg: RunConfig, run_name: str, i: int) -> dict:
    """Ray options of rollout actor `i`: one unit of rollout.node_resource when set (only the rollout
    nodes advertise it: at most that many actors per node, none elsewhere)."""
    r = cfg.rollout
    return dict(name=f"{run_name}-rollout-{i}", num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_task_retries=0,
                resources={r.node_resource: 1} if r.node_resource else None,
                # a restarted engine cannot rejoin the NCCL weight group
                max_restarts=0 if r.weight_sync == "nccl" else 3)


def evaluator_options(cfg: RunConfig, name: str) -> dict:
    """Ray options of the evaluator: one unit of eval.node_resource when set (e.g. the rollout nodes'
    resource, for the rollout node's spare GPU); otherwise a soft preference for the driver's node
    (a GPU evaluator goes wherever a GPU is free: on a multi-node GPU cluster set eval.node_resource)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    e = cfg.eval
    where = ({"resources": {e.node_resource: 1}} if e.node_resource else
             {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)})
    return dict(name=f"{name}-evaluator", num_cpus=e.num_cpus, num_gpus=e.num_gpus, **where)


def start_evaluator(cfg: RunConfig, name: str):
    """The held-out evaluator actor (its own policy copy), placed by evaluator_options."""
    import ray

    from eapo_ray.evaluate import Evaluator

    return ray.remote(Evaluator).options(**evaluator_options(cfg, name)).remote(cfg)


def placement_summary(pg) -> str:
    """How a placement group's bundles lie on the nodes: "4 bundles on 1 node (ab12cd34: 4)"."""
    from collections import Counter

    from ray.util import placement_group_table

    nodes = Counter(placement_group_table(pg).get("bundles_to_node_id", {}).values())
    where = ", ".join(f"{node[:8]}: {k}" for node, k in nodes.items())
    return f"{sum(nodes.values())} bundles on {len(nodes)} node{'s' * (len(nodes) != 1)} ({where})"


def shared_learner_nodes(cfg: RunConfig, pg) -> list[str]:
    """A line per node the learners were placed on that advertises another role's node resource
    (possible only without learner.node_resource): they took GPUs meant for that role."""
    import ray
    from ray.util import placement_group_table

    roles = {"rollout.node_resource": cfg.rollout.node_resource, "eval.node_resource": cfg.eval.node_resource,
             "expert.node_resource": cfg.expert.node_resource}
    placed = set(placement_group_table(pg).get("bundles_to_node_id", {}).values())
    out = []
    for node in ray.nodes():
        if node.get("NodeID") in placed:
            theirs = [f"{k}={v}" for k, v in roles.items() if v and node.get("Resources", {}).get(v, 0) > 0]
            if theirs:
                out.append(f"learners placed on node {node['NodeID'][:8]}, which advertises {', '.join(theirs)}: "
                           "set learner.node_resource to a resource only the learner nodes advertise "
                           "(docs/gpu.md, \"Placement\")")
    return out



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


def resume_hint(run_dir: Path) -> str:
    """How to continue a run that stopped: the resume command when it has a checkpoint."""
    if (Path(run_dir) / "checkpoint" / "latest").exists():  # resume takes the run's saved config as its base
        return f"Continue from the last checkpoint with: python -m eapo_ray.launch resume={run_dir}"
    return (f"There is no checkpoint yet: python -m eapo_ray.launch resume={run_dir} starts the run over with its "
            "saved config")


def sync_nccl_weights(rc, learners, workers, run_dir: Path, when: str) -> float:
    """One NCCL weight sync under the run's deadlines (weight_sync.sync_engines: drain every engine
    within rollout.pause_timeout_s, broadcast within rollout.sync_timeout_s, resume every engine
    in any case). A failure raises WeightSyncError naming `when` and the resume command."""
    from eapo_ray.weight_sync import WeightSyncError, sync_engines

    try:
        return sync_engines(learners, workers, drain_timeout_s=rc.pause_timeout_s, sync_timeout_s=rc.sync_timeout_s)
    except WeightSyncError as e:
        raise WeightSyncError(f"the NCCL weight sync {when} failed: {e}; every rollout engine was resumed and the "
                              f"run stops (the learners may be stuck in the broadcast). {resume_hint(run_dir)}") from None


def start_nccl_weight_sync(learners, workers, rc=None, run_dir: Path | None = None) -> float:
    """GPU path: open the NCCL group between learner rank 0 and every rollout engine, then
    send the current weights at once (engines start from the base model; after a resume the
    learner is ahead of them). Returns the seconds the first sync took. With `rc` (cfg.rollout)
    both are bounded (rollout.sync_timeout_s) and a failure raises WeightSyncError."""
    if rc is None:
        learners.init_weight_sync(workers)
        return learners.sync_weights()
    import ray

    from eapo_ray.weight_sync import WeightSyncError, first_line

    try:
        learners.init_weight_sync(workers, timeout_s=rc.sync_timeout_s)
    except Exception as e:  # noqa: BLE001 -- a timeout (GetTimeoutError) or an engine/learner failure
        why = (f"not open within rollout.sync_timeout_s={rc.sync_timeout_s:g} s"
               if isinstance(e, ray.exceptions.GetTimeoutError) else first_line(e))
        raise WeightSyncError(f"the NCCL weight group between the learners and the rollout engines could not be "
                              f"opened ({why}). {resume_hint(run_dir or Path('.'))}") from None
    return sync_nccl_weights(rc, learners, workers, run_dir or Path("."), "at start")
