"""Rollout actors on a real local Ray cluster: batches are owned by the driver (a crashed
actor loses nothing it finished), weight updates run beside a batch being generated (the
interleaving that deadlocked the NCCL path), and the fleet turns an actor that always fails
or batches that never keep a sample into a clear error instead of a silent spin."""
import time

import pytest
import ray as ray_mod

from eapo_ray.config import load_config
from eapo_ray.rollout.actor import batch_rng, remote_worker_cls
from eapo_ray.rollout.fleet import FleetError, RolloutFleet

SMALL = ["rollout.prompts_per_batch=2", "acceptance.kind=constant", "acceptance.start=0.0", "data.num_train=50"]


@pytest.mark.slow
def test_crashed_rollout_actor_loses_nothing_and_comes_back(ray_local):
    ray = ray_local
    cfg = load_config(None, SMALL)
    worker = remote_worker_cls().options(max_restarts=1, num_cpus=0.5).remote(cfg, 0, None)
    fleet = RolloutFleet([worker], max_failures=3)
    fleet.submit(0, step=0, serial=0)
    results = []
    while not results:
        results = fleet.wait(timeout_s=60)
    res = results[0]
    assert res.stats["samples"] >= 16 and res.stats["kept_samples"] > 0

    ray.kill(worker, no_restart=False)  # a crash, which Ray restarts
    time.sleep(2)
    batch = ray.get(res.batch, timeout=30)  # the driver owns the finished batch: it survived the actor
    assert len(batch["input_ids"]) == res.stats["kept_samples"]

    for _ in range(60):  # calls that reach the restarting actor fail and count; then it produces again
        if not fleet.inflight:
            fleet.submit(0, step=1, serial=1)
        again = [r for r in fleet.wait(timeout_s=60) if r.stats]
        if again:
            break
    assert again[0].stats["samples"] >= 16
    assert fleet.failures[0] == 0 and not fleet.retired  # a success resets the count


@pytest.mark.slow
def test_weight_update_runs_while_a_batch_is_generating(ray_local):
    """The NCCL path's control flow on CPU: learner rank 0 calls start/update/finish on every
    rollout actor right after a train step, while their `produce` calls are generating. Those
    calls must run in their own concurrency group, pause generation (drain) and resume it.
    (The NCCL transfer itself needs GPUs: here the update carries no tensors, the transformers
    engine's start/finish only pause and set the version.)"""
    ray = ray_local
    cfg = load_config(None, ["rollout.prompts_per_batch=6", "acceptance.kind=constant", "acceptance.start=0.0",
                             "data.num_train=50", "rollout.num_cpus=0.25"])
    workers = [remote_worker_cls().options(num_cpus=0.25).remote(cfg, i, None) for i in range(3)]
    try:
        ray.get([w.ping.remote() for w in workers], timeout=120)
        produce = [w.produce.remote(step=0, serial=i)[0] for i, w in enumerate(workers)]
        time.sleep(1.0)  # generation under way
        t0 = time.time()
        ray.get([w.start_weight_update.remote() for w in workers], timeout=60)
        states = ray.get([w.weight_state.remote() for w in workers], timeout=10)
        assert all(s["paused"] for s in states)
        ready, _ = ray.wait(produce, num_returns=len(produce), timeout=0)
        assert len(ready) < len(produce), "the update must not wait for the batches to finish"
        ray.get([w.finish_weight_update.remote(7) for w in workers], timeout=60)
        assert time.time() - t0 < 30
        states = ray.get([w.weight_state.remote() for w in workers], timeout=10)
        assert all(not s["paused"] and s["version"] == 7 for s in states)
        stats = ray.get(produce, timeout=300)  # generation resumed and finished
        assert all(s["samples"] >= 48 for s in stats)
    finally:
        for w in workers:
            ray.kill(w)


@ray_mod.remote(num_cpus=0)
class _BrokenWorker:
    """Fault injection: a rollout actor whose every batch raises, or keeps nothing."""

    def __init__(self, mode: str):
        self.mode = mode

    @ray_mod.method(num_returns=2)
    def produce(self, **kwargs):
        if self.mode == "raise":
            raise RuntimeError("engine exploded")
        return {"worker": 0, "kept_samples": 0, "samples": 16}, None


@pytest.mark.slow
@pytest.mark.parametrize("mode,match", [("raise", "every rollout actor has failed 3 times in a row.*engine exploded"),
                                        ("empty", "5 rollout batches in a row kept no samples")])
def test_fleet_stops_with_a_clear_error_instead_of_spinning(ray_local, mode, match):
    workers = [_BrokenWorker.remote(mode) for _ in range(2)]
    fleet = RolloutFleet(workers, max_failures=3, max_empty=5)
    t0 = time.time()
    with pytest.raises(FleetError, match=match):
        while time.time() - t0 < 60:
            for i in fleet.idle():
                fleet.submit(i, step=0)
            fleet.wait(timeout_s=5)
    assert time.time() - t0 < 60


def test_batch_rng_depends_on_seed_and_serial_only():
    a, b, c = batch_rng(0, 5), batch_rng(0, 5), batch_rng(0, 6)
    seq = [a.random() for _ in range(3)]
    assert seq == [b.random() for _ in range(3)] and seq != [c.random() for _ in range(3)]
    assert batch_rng(1, 5).random() != batch_rng(0, 5).random()


class _InstantEngine:
    tokenizer, version = None, 0

    async def agenerate(self, *args, **kwargs):
        return "done"


@pytest.mark.parametrize("cancel", [False, True])
def test_paused_generation_waits_and_a_cancelled_waiter_leaves_no_count(cancel):
    """A request that arrives during a weight update waits for the resume; one whose episode is
    cancelled while waiting must not leave an in-flight count behind (the next pause would then
    wait for a request that does not exist until pause_timeout_s)."""
    import asyncio
    import threading

    from eapo_ray.rollout.actor import PausableEngine

    gen = PausableEngine(_InstantEngine())
    gen.pause(timeout_s=1)

    async def episode():
        task = asyncio.ensure_future(gen.agenerate([1], 4, 1.0, []))
        await asyncio.sleep(0.2)
        assert not task.done()  # paused: waiting
        if cancel:
            task.cancel()
            threading.Timer(0.3, gen.resume).start()
            with pytest.raises(asyncio.CancelledError):
                await task
            return None
        gen.resume()
        return await task

    assert asyncio.run(episode()) == (None if cancel else "done")
    time.sleep(0.5)  # the waiting thread has seen the resume
    gen.pause(timeout_s=2)  # nothing in flight: returns at once
    gen.resume()
