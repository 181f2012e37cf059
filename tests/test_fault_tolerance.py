"""A rollout actor that dies: the fleet manager marks it unhealthy, Ray restarts it, and
it produces again; a batch it made before dying is lost with it (its ObjectRef's owner is
gone) and the learner skips and counts it instead of crashing."""
import time

import pytest
from ray.rllib.utils.actor_manager import FaultTolerantActorManager

from eapo_ray.buffer import TrajectoryBuffer
from eapo_ray.config import load_config
from eapo_ray.launch import _collect
from eapo_ray.learner import fetch_batches
from eapo_ray.rollout.actor import RolloutWorker

pytestmark = pytest.mark.slow


def test_crashed_rollout_actor_loses_nothing_and_comes_back(ray_local):
    ray = ray_local
    cfg = load_config(None, ["rollout.prompts_per_batch=2", "acceptance.kind=constant", "acceptance.start=0.0",
                             "data.num_train=50"])
    buf = TrajectoryBuffer.remote(4, 2)
    worker = ray.remote(RolloutWorker).options(max_restarts=1, num_cpus=0.5).remote(cfg, 0, None, buf)
    fleet = FaultTolerantActorManager([worker], max_remote_requests_in_flight_per_actor=1)
    assert fleet.foreach_actor_async("produce", kwargs={"step": 0}) == 1
    results = []
    while not results:
        results = [r.get() for r in fleet.fetch_ready_async_reqs(timeout_seconds=60) if r.ok]
    assert results[0]["samples"] >= 16

    items = ray.get(buf.get.remote(1, 0, 10.0))
    assert items and items[0][2] > 0
    ray.kill(worker, no_restart=False)  # a crash, which Ray restarts
    time.sleep(2)
    batches, lost = fetch_batches([items[0][1]])
    assert (batches, lost) == ([], 1)

    fleet.foreach_actor_async("produce", kwargs={"step": 1})
    assert all(not r.ok for r in fleet.fetch_ready_async_reqs(timeout_seconds=30))  # the call hit the dead actor
    assert fleet.num_healthy_actors() == 0
    for _ in range(60):
        _collect(fleet)
        if fleet.num_healthy_actors() == 1:
            break
        time.sleep(1)
    assert fleet.num_healthy_actors() == 1
    fleet.foreach_actor_async("produce", kwargs={"step": 1})
    again = []
    while not again:
        again = [r.get() for r in fleet.fetch_ready_async_reqs(timeout_seconds=60) if r.ok]
    assert again[0]["samples"] >= 16
