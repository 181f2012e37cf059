"""Learner failures: the learner group rebuilt from the last checkpoint (the driver's counters
rolled back with it), and the batches of a policy such a rebuild threw away."""
from __future__ import annotations

from pathlib import Path

from eapo_ray.config import RunConfig
from eapo_ray.driver.checkpoints import LoopState, load_driver_state, resume_metrics
from eapo_ray.driver.evaluation import PendingRows
from eapo_ray.driver.system import BUFFER_CALL_S, System, resume_hint


class LearnerFailed(RuntimeError):
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
            + resume_hint(run_dir))
    s.learner_restarts += 1
    if rows is not None:  # rows still waiting for an evaluation are written first (resume_metrics trims them)
        rows.flush(wait=True)
    print(f"[eapo] a learner died near step {state.version + 1} ({err}); rebuilding the learner group from "
          + ("the last checkpoint" if has_ckpt else "the start (no checkpoint yet: checkpoint_every)")
          + f" (restart {s.learner_restarts}/{cfg.learner.max_restarts})", flush=True)
    from eapo_ray.learner.group import LearnerGroup

    # The new group reuses the old one's placement group: released, its GPUs could be taken by another
    # role's pending actor (an evaluator being replaced, a rollout actor restarting) before the learners
    # ask again. Ray re-places the bundles of a dead node by itself (on learner nodes only, with
    # learner.node_resource); LearnerGroup waits for that, bounded by learner.placement_timeout_s.
    old = s.learners
    s.learners = None  # a failure below leaves only the placement group for teardown to remove
    s.learner_pg = old.pg
    try:
        old.shutdown(keep_placement=True)
    except Exception:  # noqa: BLE001 -- the group is broken anyway
        pass
    s.learners = LearnerGroup(cfg, s.run_name, generation=s.learner_restarts, pg=s.learner_pg)
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


def discarded_policy(s: System, version: int, generation: int | None) -> bool:
    """Whether a batch generated at `version` by a call submitted while learner group `generation`
    was training comes from a policy a later rebuild threw away (a version newer than the
    checkpoint that rebuild went back to)."""
    later = s.rollbacks[generation or 0:]
    return bool(later) and version > min(later)
