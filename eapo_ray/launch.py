"""Run EAPO: ``python -m eapo_ray.launch [--config FILE] [key=value ...]``.

With no arguments it runs the embedded default (configs/tiny_cpu.yaml: bundled tiny
models, local Ray, CPU). Under ``ray job submit`` (RAY_ADDRESS set) it joins that
cluster. Parts, named in the Ray dashboard: the expert Serve app
(<run>-expert), rollout actors (<run>-rollout-i), the buffer (<run>-buffer), the
learners (<run>-learner-r) and the evaluator (<run>-evaluator).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from eapo_ray.config import DEFAULT_CONFIG, ConfigError, RunConfig, load_config, to_dict


def init_ray(cfg: RunConfig, required_cpus: float):
    import ray

    if ray.is_initialized():  # e.g. several runs or evaluations from one process
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}}
    if cfg.ray_address == "auto-local" and not os.environ.get("RAY_ADDRESS"):
        # A private local cluster; never attach to a stray one on this machine.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(required_cpus)),
                 runtime_env=env, include_dashboard=True, log_to_driver=True)
    else:
        ray.init(address=None if cfg.ray_address == "auto-local" else cfg.ray_address, runtime_env=env)


class MetricsLog:
    """JSONL + TensorBoard in the run directory, and Ray metrics for the dashboard."""

    def __init__(self, run_dir: Path):
        from ray.util.metrics import Gauge
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.gauges = {k: Gauge(f"eapo_{k}", description=f"EAPO {k}") for k in
                       ("reward", "consult_rate", "acceptance_prob", "heldout_accuracy", "samples_per_s", "staleness")}

    def log(self, step: int, row: dict):
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.jsonl.flush()
        for k, v in row.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
                if k in self.gauges:
                    self.gauges[k].set(float(v))

    def close(self):
        self.jsonl.close()
        self.tb.close()


def run(cfg: RunConfig) -> Path:
    import ray
    from ray import serve
    from ray.rllib.utils.actor_manager import FaultTolerantActorManager

    from eapo_ray.buffer import TrajectoryBuffer
    from eapo_ray.evaluate import Evaluator
    from eapo_ray.expert import expert_app
    from eapo_ray.learner import LearnerGroup
    from eapo_ray.rollout.actor import RolloutWorker

    t_start = time.time()
    run_name = cfg.run_name or time.strftime("eapo-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.resume) if cfg.resume else Path(cfg.run_root).resolve() / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    print(f"[eapo] run directory: {run_dir}", flush=True)

    r, lc, ec = cfg.rollout, cfg.learner, cfg.expert
    required = r.num_actors * r.num_cpus + lc.num_learners * lc.num_cpus + ec.max_replicas * ec.num_cpus + r.num_cpus
    init_ray(cfg, required)
    app_name = f"{run_name}-expert"
    use_expert = cfg.acceptance.kind != "constant" or cfg.acceptance.start > 0
    if use_expert:
        serve.start(proxy_location="Disabled")
        serve.run(expert_app(cfg.model.expert, ec), name=app_name, route_prefix=None)
        print(f"[eapo] expert Serve app '{app_name}' up ({ec.min_replicas}-{ec.max_replicas} replicas)", flush=True)

    buffer = TrajectoryBuffer.options(name=f"{run_name}-buffer").remote(cfg.buffer.capacity, cfg.buffer.max_staleness)
    learners = LearnerGroup(cfg, run_name)
    resume_ckpt = str(run_dir / "checkpoint") if cfg.resume else ""
    version = learners.setup(resume_ckpt)
    weights = learners.publish()
    worker_cls = ray.remote(RolloutWorker)
    workers = [worker_cls.options(name=f"{run_name}-rollout-{i}", num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                                  max_restarts=3, max_task_retries=0)
               .remote(cfg, i, app_name if use_expert else None, buffer) for i in range(r.num_actors)]
    nccl = r.weight_sync == "nccl"
    if nccl:  # GPU: learner rank 0 -> vLLM engines over NCCL each step; the object store only feeds the evaluator
        learners.init_weight_sync(workers)
    fleet = FaultTolerantActorManager(workers, max_remote_requests_in_flight_per_actor=1)
    evaluator = ray.remote(Evaluator).options(name=f"{run_name}-evaluator", num_cpus=r.num_cpus,
                                              num_gpus=cfg.eval.num_gpus).remote(cfg)
    metrics = MetricsLog(run_dir)

    ev0 = ray.get(evaluator.evaluate.remote(weights))
    print(f"[eapo] held-out accuracy (policy alone) at step {version}: {ev0['accuracy']:.3f}", flush=True)
    metrics.log(version, {f"heldout_{k}": v for k, v in ev0.items()} | {"heldout_accuracy": ev0["accuracy"]})

    rollout_weights = None if nccl else weights
    samples = generated = 0
    by_worker: dict[int, int] = {}
    first_rollout = last_rollout = None
    ev = ev0
    t_loop = time.time()
    for step in range(version, cfg.steps):
        items, rollouts = [], []
        while not items:
            fleet.foreach_actor_async("produce", kwargs={"step": step, "weights": rollout_weights})  # idle only
            items = ray.get(buffer.get.remote(1, version, timeout_s=2.0))
            rollouts += _collect(fleet)
            if not items and fleet.num_healthy_actors() == 0:
                raise RuntimeError("every rollout actor has failed; see their logs in the Ray dashboard")
        if r.overlap:  # keep the fleet generating (with these weights) while the learner trains
            fleet.foreach_actor_async("produce", kwargs={"step": step, "weights": rollout_weights})
        for st in rollouts:
            by_worker[st["worker"]] = by_worker.get(st["worker"], 0) + 1
            generated += st["samples"]
            first_rollout = first_rollout or st
            last_rollout = st
        stats = learners.train_step(items)
        version += 1
        done = version >= cfg.steps
        eval_due = done or (cfg.eval.every and version % cfg.eval.every == 0)
        if nccl:
            stats["weight_sync_seconds"] = learners.sync_weights()
        weights = learners.publish() if eval_due or not nccl else None
        rollout_weights = None if nccl else weights
        samples += stats["learner_samples"]
        row = {**{f"rollout_{k}": v for k, v in (last_rollout or {}).items()},
               **stats, "samples": samples, "generated": generated,
               "samples_per_s": generated / (time.time() - t_loop), **_buffer_stats(buffer)}
        if last_rollout:  # the newest finished rollout batch (none yet at the very first step)
            row.update(reward=last_rollout["reward"], consult_rate=last_rollout["consult_rate"],
                       acceptance_prob=last_rollout["acceptance_prob"])
        if eval_due:
            ev = ray.get(evaluator.evaluate.remote(weights))
            row.update({f"heldout_{k}": v for k, v in ev.items()}, heldout_accuracy=ev["accuracy"])
        metrics.log(version, row)
        nan = float("nan")
        print(f"[eapo] step {version}/{cfg.steps} reward {row.get('reward', nan):.3f} "
              f"consult_rate {row.get('consult_rate', nan):.2f} accept_p {row.get('acceptance_prob', nan):.2f} "
              f"heldout_acc {ev['accuracy']:.3f} "
              f"samples/s {row['samples_per_s']:.1f} staleness {stats.get('staleness', 0)}", flush=True)
        if cfg.checkpoint_every and version % cfg.checkpoint_every == 0 and not done:
            learners.save(str(run_dir))

    loop_seconds = time.time() - t_loop
    learners.save(str(run_dir))
    summary = {
        "heldout_accuracy_start": ev0["accuracy"], "heldout_accuracy_end": ev["accuracy"],
        "heldout_start": ev0, "heldout_end": ev, "steps": version, "samples": samples,
        "generated_samples": generated, "wall_seconds": time.time() - t_start, "loop_seconds": loop_seconds,
        "consult_rate_start": (first_rollout or {}).get("consult_rate", 0.0),
        "consult_rate_end": (last_rollout or {}).get("consult_rate", 0.0),
        "seed": cfg.seed, "buffer": _buffer_stats(buffer), "rollout_batches_by_worker": by_worker,
        "checkpoint": str(run_dir / "final"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    metrics.close()
    from eapo_ray.tools.plot import plot_run

    plot_run(run_dir)
    for w in workers:
        ray.kill(w)
    learners.shutdown()
    if use_expert:
        serve.delete(app_name)
    print(f"[eapo] done in {summary['wall_seconds']:.0f}s: held-out accuracy {ev0['accuracy']:.3f} -> "
          f"{ev['accuracy']:.3f}", flush=True)
    print(f"[eapo] run directory: {run_dir}", flush=True)
    return run_dir


def _collect(fleet) -> list[dict]:
    """Finished rollout calls' stats; failed actors are marked unhealthy and probed back."""
    out = [res.get() for res in fleet.fetch_ready_async_reqs(timeout_seconds=0) if res.ok]
    fleet.probe_unhealthy_actors(timeout_seconds=1.0, mark_healthy=True)  # pings only unhealthy ones
    return out


def _buffer_stats(buffer) -> dict:
    import ray

    return {f"buffer_{k}": v for k, v in ray.get(buffer.stats.remote()).items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m eapo_ray.launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python -m eapo_ray.launch steps=10 rollout.num_actors=2\n"
               "  python -m eapo_ray.launch --config configs/tiny_cpu.yaml learner.num_learners=2")
    ap.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name}, bundled)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys (e.g. learner.lr=1e-4)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
