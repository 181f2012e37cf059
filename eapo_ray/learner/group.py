"""The learner group and its placement: N learner actors in one placement group, and the one
fan-out that calls a collective on every rank and fails as soon as any rank does."""
from __future__ import annotations

import ray

from eapo_ray.config import RunConfig
from eapo_ray.learner.actor import Learner


def get_all(refs: list) -> list:
    """ray.get of every rank's result, raising as soon as ANY rank fails: a plain ray.get of the
    list would first wait on a surviving rank, which blocks in a collective with the dead one
    (gloo's timeout is 30 min)."""
    from eapo_ray.ray_runtime import raise_if_interrupted

    pending = list(refs)
    while pending:
        raise_if_interrupted()  # a recorded Ctrl-C is not held up by a long learner call
        ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
        ray.get(ready)  # a dead rank's error is raised here, at once
    return ray.get(refs)


class PlacementError(RuntimeError):
    """The learners' resources could not be placed in time (learner.placement_timeout_s)."""


def placement_error(bundle: dict, n: int, timeout_s: float) -> str:
    """What the learners asked for against what the cluster has (in total and free now)."""
    def show(res: dict) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU") or k in bundle) or "none"

    total = {k: v * n for k, v in bundle.items()}
    return (f"the {n} learner(s) could not be placed within learner.placement_timeout_s={timeout_s:g}s: they ask "
            f"for {n} x {{{show(bundle)}}} = {show(total)}; the cluster has {show(ray.cluster_resources())} "
            f"({show(ray.available_resources())} free now). Lower learner.num_learners / learner.num_cpus / "
            "learner.num_gpus, add nodes, or raise learner.placement_timeout_s if nodes are still coming up.")


class LearnerGroup:
    """Creates the N learner actors and fans calls out to all of them."""

    def __init__(self, cfg: RunConfig, run_name: str, generation: int = 0):
        """`generation`: how many times the launcher rebuilt the group (weight_sync.PublishedWeights)."""
        self.generation = generation
        lc = cfg.learner
        n = lc.num_learners
        cls = ray.remote(Learner)
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": lc.num_cpus, **({"GPU": lc.num_gpus} if lc.num_gpus else {})}
        self.pg = placement_group([bundle] * n, strategy="PACK", name=f"{run_name}-learners")
        if not self.pg.wait(timeout_seconds=lc.placement_timeout_s):
            ray.util.remove_placement_group(self.pg)
            raise PlacementError(placement_error(bundle, n, lc.placement_timeout_s))
        self.actors = [
            cls.options(name=f"{run_name}-learner-{r}", num_cpus=lc.num_cpus, num_gpus=lc.num_gpus,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
                        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(lc.torch_threads)}})
            .remote(cfg, r, n)
            for r in range(n)
        ]

    def call_all(self, method: str, *args) -> list:
        """The one fan-out: `method(*args)` on every rank, waiting for all (the learner methods
        are collectives: every rank must enter), raising as soon as any rank fails (get_all).
        Results in rank order."""
        return get_all([getattr(a, method).remote(*args) for a in self.actors])

    def setup(self, resume_dir: str = "") -> int:
        addr, port = ray.get(self.actors[0].endpoint.remote())  # rank 0's node: learners may span nodes
        return self.call_all("setup", addr, port, resume_dir)[0]

    def init_weight_sync(self, rollout_actors: list) -> None:
        self.call_all("init_weight_sync", rollout_actors)

    def sync_weights(self) -> float:
        return self.call_all("sync_weights")[0]

    def train_step(self, items: list) -> dict:
        """items: buffer.BufferItem records; every rank gets every batch ref and trains its shard."""
        results = self.call_all("train_step", [it.box for it in items])
        out = dict(results[0])
        out["learner_samples"] = sum(r["learner_samples"] for r in results)
        return out

    def publish(self):
        """A weight_sync.PublishedWeights of the current version (rank 0's), stamped with the
        group's generation: after a rebuild, versions are reused for other weights."""
        return self.call_all("publish")[0]._replace(generation=self.generation)

    def save(self, run_dir: str) -> str:
        return self.call_all("save", run_dir)[0]

    def shutdown(self):
        for a in self.actors:
            ray.kill(a)
        ray.util.remove_placement_group(self.pg)
