"""The learner group and its placement: N learner actors in one placement group, and the one
fan-out that calls a collective on every rank and fails as soon as any rank does."""
from __future__ import annotations

import ray

from eapo_ray.config import RunConfig
from eapo_ray.learner.actor import Learner


def get_all(refs: list, timeout_s: float | None = None) -> list:
    """ray.get of every rank's result, raising as soon as ANY rank fails: a plain ray.get of the
    list would first wait on a surviving rank, which blocks in a collective with the dead one
    (gloo's timeout is 30 min). `timeout_s`: ray.exceptions.GetTimeoutError when not all are back
    by then (the ranks are left as they are: the caller ends the run)."""
    import time

    from eapo_ray.ray_runtime import raise_if_interrupted

    pending = list(refs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        raise_if_interrupted()  # a recorded Ctrl-C is not held up by a long learner call
        if deadline is not None and time.monotonic() > deadline:
            raise ray.exceptions.GetTimeoutError(f"{len(pending)} of {len(refs)} learner rank(s) not back within "
                                                 f"{timeout_s:g} s")
        ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
        ray.get(ready)  # a dead rank's error is raised here, at once
    return ray.get(refs)


class PlacementError(RuntimeError):
    """The learners' resources could not be placed in time (learner.placement_timeout_s)."""


def learner_bundle(cfg: RunConfig) -> dict:
    """One learner's bundle: its CPUs and GPUs, and one unit of learner.node_resource when set (only
    learner nodes advertise it, so no bundle can land on a rollout or expert node)."""
    lc = cfg.learner
    return {"CPU": lc.num_cpus, **({"GPU": lc.num_gpus} if lc.num_gpus else {}),
            **({lc.node_resource: 1} if lc.node_resource else {})}


def placement_error(bundle: dict, n: int, timeout_s: float, strategy: str = "PACK") -> str:
    """What the learners asked for against what the cluster has (in total and free now)."""
    def show(res: dict) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU") or k in bundle) or "none"

    total = {k: v * n for k, v in bundle.items()}
    return (f"the {n} learner(s) could not be placed within learner.placement_timeout_s={timeout_s:g}s: they ask "
            f"for {n} x {{{show(bundle)}}} = {show(total)}; the cluster has {show(ray.cluster_resources())} "
            f"({show(ray.available_resources())} free now; learner.placement_strategy={strategy}). Lower "
            "learner.num_learners / learner.num_cpus / learner.num_gpus, add nodes (advertising "
            "learner.node_resource when it is set), or raise learner.placement_timeout_s if nodes are still "
            "coming up." + (" STRICT_PACK needs ONE node that holds every bundle." if strategy == "STRICT_PACK" else ""))


def wait_placed(pg, cfg: RunConfig) -> None:
    """Wait (learner.placement_timeout_s at most) until every learner bundle of `pg` is placed;
    past it, remove the group and raise PlacementError."""
    lc = cfg.learner
    if not pg.wait(timeout_seconds=lc.placement_timeout_s):
        ray.util.remove_placement_group(pg)
        raise PlacementError(placement_error(learner_bundle(cfg), lc.num_learners, lc.placement_timeout_s,
                                             lc.placement_strategy))


def reserve_learners(cfg: RunConfig, run_name: str):
    """The learners' placement group, placed (or PlacementError). The driver calls this FIRST, before
    the expert app, buffer, rollout actors and evaluator ask for anything: GPU actors without a
    node resource (an evaluator, a CPU-only part on a GPU node) started earlier could take the GPUs
    of the learner node, and the learners would then be split over nodes or starve.
    learner.node_resource keeps every bundle on learner nodes whatever the strategy;
    learner.placement_strategy says whether they may span several of them (PACK) or must share one
    (STRICT_PACK)."""
    from ray.util.placement_group import placement_group

    lc = cfg.learner
    pg = placement_group([learner_bundle(cfg)] * lc.num_learners, strategy=lc.placement_strategy,
                         name=f"{run_name}-learners")
    wait_placed(pg, cfg)
    return pg


class LearnerGroup:
    """Creates the N learner actors (in a placement group) and fans calls out to all of them."""

    def __init__(self, cfg: RunConfig, run_name: str, generation: int = 0, pg=None):
        """`generation`: how many times the launcher rebuilt the group (weight_sync.PublishedWeights).
        `pg`: the learners' placement group reserved beforehand (reserve_learners; a rebuild passes
        the old group's, so its GPUs are never free for another role to take); None: reserve it now.
        The group owns it from here: `shutdown` removes it unless told to keep it."""
        self.generation = generation
        lc = cfg.learner
        n = lc.num_learners
        cls = ray.remote(Learner)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if pg is None:
            pg = reserve_learners(cfg, run_name)
        else:  # a reused group whose node died is rescheduled by Ray: wait for it again (bounded)
            wait_placed(pg, cfg)
        self.pg = pg
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

    def init_weight_sync(self, rollout_actors: list, timeout_s: float | None = None) -> None:
        """Collective (NCCL path): open the weight group with the engines, within `timeout_s`."""
        get_all([a.init_weight_sync.remote(rollout_actors) for a in self.actors], timeout_s)

    def sync_weights(self, timeout_s: float | None = None) -> float:
        """Collective (NCCL path): broadcast the weights to the engines; GetTimeoutError when not
        done within `timeout_s` (vLLM's NCCL group has no timeout: an engine that never joins would
        hold rank 0 forever). The driver drains the engines first (weight_sync.sync_engines)."""
        return get_all([a.sync_weights.remote() for a in self.actors], timeout_s)[0]

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

    def shutdown(self, keep_placement: bool = False):
        """Kill the learner actors and remove the placement group (`keep_placement`: keep it for a
        rebuild, which hands it to the next LearnerGroup)."""
        for a in self.actors:
            ray.kill(a)
        if not keep_placement:
            ray.util.remove_placement_group(self.pg)
