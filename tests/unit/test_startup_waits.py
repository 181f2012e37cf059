"""start_system's start-up waits (driver/system.py): which configs must have the rollout engines and
the evaluator up before the learners set up (`engines_first`: roles that may share a GPU, whose
vLLM memory profiling would count a learner's allocations as its own), and `wait_actors_ready`
itself, on real Ray actors whose constructors are slow or fail (stand-ins for engines loading:
a vLLM engine on a GPU cannot be built here, the wait does not care what the constructor does)."""
import time

import pytest

from eapo_ray.config import load_config
from eapo_ray.driver.system import StartupError, System, engines_first, wait_actors_ready


@pytest.mark.parametrize("overrides, first", [
    ([], False),  # CPU: nothing on a GPU
    (["rollout.num_gpus=1", "learner.num_gpus=1"], False),  # whole GPUs: no card is shared
    (["rollout.num_gpus=0.5"], True),
    (["learner.num_gpus=0.5"], True),
    (["eval.num_gpus=0.25"], True),
    (["eval.num_gpus=0.25", "eval.enabled=false"], False),  # no evaluator: its key does not count
    (["rollout.num_gpus=1", "learner.num_gpus=1", "eval.num_gpus=0.1"], True),
])
def test_engines_first_when_a_role_holds_a_fraction_of_a_gpu(overrides, first):
    assert engines_first(load_config(None, overrides)) is first


def _slow_actor_cls(ray):
    @ray.remote(num_cpus=0)
    class Slow:
        def __init__(self, delay_s: float, fail: bool = False):
            time.sleep(delay_s)  # an engine loading its model
            if fail:
                raise RuntimeError("CUDA out of memory while profiling")

        def ping(self) -> str:
            return "pong"

    return Slow


def test_wait_actors_ready_waits_for_every_constructor(ray_local):
    Slow = _slow_actor_cls(ray_local)
    s = System(workers=[Slow.remote(0.0), Slow.remote(3.0)], evaluator=Slow.remote(4.0))
    try:
        t0 = time.monotonic()
        wait_actors_ready(s, 60, with_evaluator=True)
        assert time.monotonic() - t0 >= 3.5  # the slowest (the evaluator) was waited for
        # every one of them answers at once now
        assert ray_local.get([w.ping.remote() for w in s.workers] + [s.evaluator.ping.remote()], timeout=5)
    finally:
        for a in s.workers + [s.evaluator]:
            ray_local.kill(a)


def test_wait_actors_ready_names_the_actor_and_the_key(ray_local):
    Slow = _slow_actor_cls(ray_local)
    failing = System(workers=[Slow.remote(0.0), Slow.remote(0.5, fail=True)])
    stuck = System(workers=[Slow.remote(0.0), Slow.remote(600.0)])
    try:
        with pytest.raises(StartupError, match=r"rollout actor 1 failed to start: .*CUDA out of memory"):
            wait_actors_ready(failing, 60, with_evaluator=False)
        t0 = time.monotonic()
        with pytest.raises(StartupError, match=r"rollout actor 1 not up within rollout\.restart_timeout_s=3 s"):
            wait_actors_ready(stuck, 3, with_evaluator=False)
        assert time.monotonic() - t0 < 10
    finally:
        for a in failing.workers + stuck.workers:
            ray_local.kill(a)
