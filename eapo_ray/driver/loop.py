"""The training loop: keep the rollout actors fed, take batches from the buffer, train, send the
new weights, evaluate (`PendingRows`: rows wait for their step's evaluation) and checkpoint on
schedule."""
from __future__ import annotations

import time
from collections import deque
from pathlib import Path

from eapo_ray.config import RunConfig
from eapo_ray.driver.breakdown import Breakdown
from eapo_ray.driver.checkpoints import LoopState, save_checkpoint
from eapo_ray.driver.evaluation import PendingRows, replace_hung_evaluator
from eapo_ray.driver.recovery import discarded_policy, rebuild_learners
from eapo_ray.driver.summary import buffer_stats
from eapo_ray.driver.system import BUFFER_CALL_S, System, sync_nccl_weights
from eapo_ray.ray_runtime import raise_if_interrupted, wait_get


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
            if nccl:  # drained, bounded, engines resumed in any case; a failure ends the run (WeightSyncError)
                stats["weight_sync_seconds"] = sync_nccl_weights(cfg.rollout, s.learners, s.workers, run_dir,
                                                                 f"after step {state.version}")
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
               **buffer_stats(s.buffer)}
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
