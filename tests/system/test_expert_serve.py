"""The expert as a real Ray Serve deployment: answers, autoscaling config, and an expert
that times out turns into "unavailable" (None), never a crash."""
import asyncio

import pytest

from eapo_ray.algo.protocol import reply_text
from eapo_ray.config import TINY_DIR, ExpertConfig
from eapo_ray.expert import expert_app
from eapo_ray.rollout.actor import ServeExpert

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def serve_app(ray_local):
    from ray import serve

    serve.start(proxy_location="Disabled")
    cfg = ExpertConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=3, reply_template="{answer}")
    serve.run(expert_app(str(TINY_DIR / "expert"), cfg), name="test-expert", route_prefix=None)
    yield "test-expert"
    serve.delete("test-expert")
    serve.shutdown()


def test_expert_answers_sub_questions(serve_app):
    import random

    rng = random.Random(0)
    qs = [f"{rng.randint(10, 110)}*{rng.randint(2, 9)}" for _ in range(20)]
    qs += [f"{rng.randint(100, 990)}+{rng.randint(1, 9)}" for _ in range(20)]
    ask = ServeExpert(serve_app, timeout_s=60)
    # 40 queries in flight at once; the bare answers (reply_template "{answer}"), as ExpertReply
    replies = [reply_text(r) for r in asyncio.run(ask(qs))]
    assert ask.failures == 0
    assert sum(r == str(eval(q)) for q, r in zip(qs, replies)) >= 36  # the bundled expert is ~99% exact


def test_autoscaling_config_comes_from_config(serve_app):
    from ray import serve

    status = serve.status().applications[serve_app].deployments["expert"]
    assert status.status in ("HEALTHY", "UPSCALING", "DOWNSCALING")
    dep = expert_app(str(TINY_DIR / "expert"), ExpertConfig(min_replicas=2, max_replicas=5, target_ongoing_requests=7,
                                                            upscale_delay_s=1.5, downscale_delay_s=9.0))
    auto = dep._bound_deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 5, 7)
    assert (auto.upscale_delay_s, auto.downscale_delay_s, auto.look_back_period_s) == (1.5, 9.0, 30.0)


def test_timeout_gives_none_and_the_expert_recovers(serve_app):
    slow = ServeExpert(serve_app, timeout_s=1e-3)
    replies = [reply_text(r) for r in asyncio.run(slow(["12*7"] * 64))]
    assert None in replies and slow.failures == replies.count(None)  # late replies are dropped, counted
    assert set(replies) <= {None, "84"}
    ok = ServeExpert(serve_app, timeout_s=60)
    assert [reply_text(r) for r in asyncio.run(ok(["12*7"]))] == ["84"]  # the deployment is still healthy afterwards


def test_an_expert_that_cannot_start_stops_the_launch_in_time(serve_app):
    """The launcher deploys the expert without blocking (its replicas load while the learners set
    up), then waits for RUNNING within expert.start_timeout_s. A replica that can never be placed
    (a GPU asked of a CPU cluster) gave a blocking serve.run that never returned; now a clear
    ExpertStartError names the app and the keys to check."""
    import time

    from ray import serve

    from eapo_ray.driver.system import ExpertStartError, wait_expert_running

    cfg = ExpertConfig(min_replicas=1, max_replicas=1, num_gpus=1.0)
    serve.run_many([serve.RunTarget(expert_app(str(TINY_DIR / "expert"), cfg), name="gpu-expert", route_prefix=None)],
                   wait_for_applications_running=False)
    t0 = time.monotonic()
    try:
        with pytest.raises(ExpertStartError, match=r"'gpu-expert' not RUNNING after 2 s.*expert.num_gpus"):
            wait_expert_running("gpu-expert", timeout_s=2.0)
        assert time.monotonic() - t0 < 10
        wait_expert_running(serve_app, timeout_s=5.0)  # a running app returns at once
    finally:
        serve.delete("gpu-expert", _blocking=False)  # a blocking delete of the never-placed replica took ~20 s


def _replicas(app: str) -> dict:
    from ray import serve

    dep = serve.status().applications[app].deployments["expert"]
    return {str(k).split(".")[-1]: v for k, v in dep.replica_states.items()}


def test_serve_autoscales_the_expert_1_to_2_and_back_under_load(ray_local):
    """Ray Serve's own autoscaler on the expert app, configured from ExpertConfig: concurrent
    queries through DeploymentHandles (12 in flight from 2 Ray tasks) take it from 1 to 2 RUNNING
    replicas; once they stop, it goes back to 1 (short delays and look-back window so the test
    sees both within a minute)."""
    import time

    from ray import serve

    ray = ray_local

    def load(app: str, in_flight: int) -> int:
        """One client, in a Ray task: `in_flight` queries at once, each replaced as soon as it is
        answered, until cancelled (a task per client would start a worker process each). The
        handles live in Ray workers: a DeploymentHandle made in the pytest process keeps a
        metrics thread that outlives Ray's shutdown; in a CI run it started a stray Ray cluster
        that broke the next test module's ray.init. Defined here so it pickles by value."""
        from ray import serve as _serve

        handle = _serve.get_app_handle(app)
        pending = [handle.remote("12*7") for _ in range(in_flight)]
        while True:
            for i, response in enumerate(pending):
                response.result(timeout_s=30)
                pending[i] = handle.remote("12*7")

    serve.start(proxy_location="Disabled")
    cfg = ExpertConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0.5,
                       downscale_delay_s=2.0, look_back_period_s=5.0, reply_template="{answer}")
    app = "autoscale-expert"
    serve.run(expert_app(str(TINY_DIR / "expert"), cfg), name=app, route_prefix=None)
    seen, clients = [], []
    t0 = time.time()
    try:
        assert _replicas(app) == {"RUNNING": 1}
        clients = [ray.remote(num_cpus=0, max_retries=0)(load).remote(app, 6) for _ in range(2)]
        while (n := _replicas(app)).get("RUNNING", 0) < 2:
            seen.append(n)
            done, _ = ray.wait(clients, timeout=0)
            if done:  # a client stopped: its error says why
                ray.get(done[0])
            assert time.time() - t0 < 60, f"no second replica within 60 s under load: {seen[-5:]}"
            time.sleep(0.5)
        t_up = time.time() - t0
        for c in clients:
            ray.cancel(c, force=True)
        t1 = time.time()
        while (n := _replicas(app)) != {"RUNNING": 1}:
            assert time.time() - t1 < 60, f"not back to 1 replica within 60 s without load: {n}"
            time.sleep(0.5)
        print(f"autoscaling: 1 -> 2 replicas {t_up:.1f}s after load began, 2 -> 1 {time.time() - t1:.1f}s after it stopped")
    finally:
        for c in clients:
            ray.cancel(c, force=True)
        serve.delete(app)
