"""An NCCL weight sync cannot hang the run (issue 22, item 5): the driver drains every rollout
engine before the learners enter the sync (bounded by rollout.pause_timeout_s), the sync itself
has a deadline (rollout.sync_timeout_s), every engine is resumed whatever happened, and the run
ends with an `error:` line naming the resume command.

Real parts: a local Ray cluster, real rollout actors (RolloutWorker, transformers engine, tiny
policy) with their real pause/resume and weight-update methods, and the real driver path
(driver.system.sync_nccl_weights -> weight_sync.sync_engines -> LearnerGroup.sync_weights ->
learner.group.get_all with its deadline). Two stand-ins, because the real thing needs GPUs or
cannot be provoked on demand:
- `_Rank0StandIn` plays learner rank 0 inside the sync as vLLM's NCCL client drives the engines
  (start_weight_update on every engine, the broadcast, finish_weight_update): NCCL needs GPUs, so
  the broadcast is a sleep that never ends (an engine that never joins) or an error.
- `_stuck_worker_cls` is the real RolloutWorker with one request entered into its PausableEngine that
  never returns (a wedged generation), so the engine can never drain.
Every driver call runs in a daemon thread with a bound, so the old code (no drain, no deadline)
fails these tests instead of hanging them.
"""
import dataclasses
import threading
import time

import pytest
import ray as ray_mod

from eapo_ray import ray_runtime, weight_sync
from eapo_ray.config import load_config
from eapo_ray.driver import system
from eapo_ray.learner.group import LearnerGroup
from eapo_ray.rollout.actor import CONCURRENCY_GROUPS, WEIGHTS_GROUP, RolloutWorker, remote_worker_cls
from eapo_ray.weight_sync import WeightSyncError

pytestmark = pytest.mark.slow

OVERRIDES = ["rollout.prompts_per_batch=4", "acceptance.kind=constant", "acceptance.start=0.0",
             "data.num_train=50", "rollout.num_cpus=0.25", "rollout.pause_timeout_s=2", "rollout.sync_timeout_s=4"]


def _stuck_worker_cls():
    """The real rollout actor, plus a request that entered generation and never comes back (a
    local class: Ray ships it by value, the workers cannot import this test module)."""

    class _StuckWorker(RolloutWorker):
        def __init__(self, *args):
            super().__init__(*args)
            self._unstick = threading.Event()

        @ray_mod.method(concurrency_group=WEIGHTS_GROUP)
        def stick_in_weights(self, limit_s: float) -> None:
            """Hold the `weights` group as an update_weights stuck in NCCL does (stand-in: NCCL needs GPUs)."""
            self._unstick.wait(limit_s)

        @ray_mod.method(concurrency_group="control")
        def unstick(self) -> None:
            self._unstick.set()

        def hold_request(self) -> None:
            assert self.gen._try_enter()

        def release_request(self) -> None:
            with self.gen._cv:
                self.gen._inflight -= 1
                self.gen._cv.notify_all()

    return ray_mod.remote(concurrency_groups=CONCURRENCY_GROUPS)(_StuckWorker)


@ray_mod.remote(num_cpus=0, max_concurrency=2)
class _Rank0StandIn:
    """Learner rank 0's side of an NCCL sync (stand-in: NCCL needs GPUs), driving the real engines'
    weight-update methods as vLLM's client does; mode 'hang': the broadcast never ends; 'fail': it
    raises; 'ok': it completes."""

    def __init__(self, workers: list, mode: str):
        self.workers, self.mode, self.calls, self.entered = workers, mode, 0, None

    def sync_weights(self) -> float:
        self.calls += 1
        self.entered = time.time()  # the learners entered the sync (the drain is over)
        ray_mod.get([w.start_weight_update.remote() for w in self.workers], timeout=30)
        if self.mode == "hang":
            time.sleep(3600)
        if self.mode == "fail":
            raise RuntimeError("NCCL error: unhandled system error (engine 1 left the weight group)")
        ray_mod.get([w.finish_weight_update.remote(1) for w in self.workers], timeout=30)
        return 0.1

    def num_calls(self) -> int:
        return self.calls

    def entered_at(self) -> float | None:
        return self.entered


def _standin(workers: list, mode: str):
    a = _Rank0StandIn.remote(workers, mode)
    ray_mod.get(a.num_calls.remote(), timeout=120)  # started (a loaded machine starts actors slowly)
    return a


def _group(standin) -> LearnerGroup:
    """The real LearnerGroup's fan-out over one stand-in rank (its __init__ would place learners)."""
    g = object.__new__(LearnerGroup)
    g.actors = [standin]
    return g


def _bounded(fn, limit_s: float):
    """fn() in a daemon thread; (result or exception, seconds). Fails the test if it is not back
    within limit_s (the old code hangs here)."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t0 = time.time()
    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(limit_s)
    assert not th.is_alive(), f"the weight sync was still running after {limit_s} s: it hangs"
    return out.get("error", out.get("value")), time.time() - t0


@pytest.fixture(scope="module")
def fleet(ray_local):
    ray = ray_local
    cfg = load_config(None, OVERRIDES)
    # engine 1 can be made to hold a request that never ends (and let it go again)
    workers = [remote_worker_cls().options(num_cpus=0.25).remote(cfg, 0, None),
               _stuck_worker_cls().options(num_cpus=0.25).remote(cfg, 1, None)]
    try:
        ray.get([w.ping.remote() for w in workers], timeout=180)
        yield cfg, workers
    finally:
        for w in workers:
            ray.kill(w)


def _paused(workers) -> list:
    return [s["paused"] for s in ray_mod.get([w.weight_state.remote() for w in workers], timeout=30)]


def test_an_engine_that_never_drains_stops_the_sync_before_the_learners_enter_it(fleet, tmp_path):
    cfg, workers = fleet
    ray_mod.get(workers[1].hold_request.remote(), timeout=10)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "latest").write_text("step2")
    standin = _standin(workers, "ok")
    try:
        err, secs = _bounded(lambda: system.sync_nccl_weights(cfg.rollout, _group(standin), workers, tmp_path,
                                                               "after step 3"), 60)
        assert isinstance(err, WeightSyncError), err
        msg = str(err)
        assert "engine 1" in msg and "rollout.pause_timeout_s=2" in msg and "after step 3" in msg
        assert f"python -m eapo_ray.launch resume={tmp_path}" in msg
        assert secs < 30
        assert ray_mod.get(standin.num_calls.remote(), timeout=30) == 0  # no learner entered a collective
        assert _paused(workers) == [False, False]  # the engine that had drained is resumed
    finally:
        ray_mod.kill(standin)
        ray_mod.get(workers[1].release_request.remote(), timeout=10)


def test_weight_state_answers_while_a_weight_update_is_stuck(fleet):
    """weight_state is in the `control` group: a status call does not wait behind an update stuck in
    NCCL in the `weights` group (on the old code it did: GetTimeoutError here)."""
    _, workers = fleet
    stuck = workers[1].stick_in_weights.remote(120)
    try:
        time.sleep(1.0)  # the stand-in update has entered the weights group
        assert not ray_mod.wait([stuck], timeout=0)[0]  # still stuck
        assert ray_mod.get(workers[1].weight_state.remote(), timeout=20)["paused"] is False
    finally:
        ray_mod.get(workers[1].unstick.remote(), timeout=30)
        ray_mod.get(stuck, timeout=30)


def test_a_ctrl_c_stops_the_drain_at_once(fleet):
    """drain_engines polls raise_if_interrupted in short slices: a signal during a long drain raises
    KeyboardInterrupt within a second or so, not after rollout.pause_timeout_s (30 s here; the old code
    waited it out in one ray.wait)."""
    _, workers = fleet
    ray_mod.get(workers[1].hold_request.remote(), timeout=10)
    timer = threading.Timer(1.0, ray_runtime._INTERRUPTED.set)
    try:
        timer.start()
        err, secs = _bounded(lambda: weight_sync.drain_engines(workers, 30.0), 15)
        assert isinstance(err, KeyboardInterrupt), err
        assert secs < 10
    finally:
        timer.cancel()
        ray_runtime._INTERRUPTED.clear()
        ray_mod.get(workers[1].release_request.remote(), timeout=10)
        assert weight_sync.resume_engines(workers) == []
    assert _paused(workers) == [False, False]


# The broadcast cases are not about the drain: the batch in flight may take a while to drain on a loaded
# 2-core machine, so they allow it DRAIN_S (the drain's own bound is the first test's, 2 s).
DRAIN_S = 120


@pytest.mark.parametrize("mode", ["hang", "fail"])
def test_a_broadcast_that_hangs_or_fails_resumes_every_engine_and_ends_with_an_error_line(fleet, tmp_path, mode,
                                                                                         monkeypatch, capsys):
    cfg, workers = fleet
    produce = workers[0].produce.remote(step=0, serial=1)[0]  # generation under way: the drain waits for it
    time.sleep(0.5)
    standin = _standin(workers, mode)
    rc = dataclasses.replace(cfg.rollout, pause_timeout_s=DRAIN_S)
    try:
        err, secs = _bounded(lambda: system.sync_nccl_weights(rc, _group(standin), workers, tmp_path,
                                                               "after step 3"), DRAIN_S + 90)
        assert isinstance(err, WeightSyncError), err
        msg = str(err)
        ended = time.time()
        assert "did not drain" not in msg, msg
        if mode == "hang":  # the broadcast's deadline, counted from the learners' entry (the drain excluded)
            entered = ray_mod.get(standin.entered_at.remote(), timeout=30)
            assert "rollout.sync_timeout_s=4" in msg and ended - entered < 4 + 30, (ended - entered, secs)
        else:
            assert "engine 1 left the weight group" in msg
        assert "There is no checkpoint yet" in msg and "resume=" in msg  # this run dir has none
        assert ray_mod.get(standin.num_calls.remote(), timeout=30) == 1
        assert _paused(workers) == [False, False]
        assert ray_mod.get(produce, timeout=120)["samples"] > 0  # generation resumed and the batch finished

        # the launcher turns it into one `error:` line and exit 1 (not a traceback, not a hang)
        from eapo_ray import launch

        def run(cfg):
            raise err

        monkeypatch.setattr(launch, "run", run)
        assert launch.main(["steps=1"]) == 1
        assert capsys.readouterr().err.startswith("error: the NCCL weight sync after step 3 failed")
    finally:
        ray_mod.kill(standin)
