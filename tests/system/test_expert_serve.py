"""The expert as a real Ray Serve deployment: answers, autoscaling config, and an expert
that times out turns into "unavailable" (None), never a crash."""
import asyncio

import pytest

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
    replies = asyncio.run(ask(qs))  # 40 queries in flight at once; the bare answers (reply_template "{answer}")
    assert ask.failures == 0
    assert sum(r == str(eval(q)) for q, r in zip(qs, replies)) >= 36  # the bundled expert is ~99% exact


def test_autoscaling_config_comes_from_config(serve_app):
    from ray import serve

    status = serve.status().applications[serve_app].deployments["expert"]
    assert status.status in ("HEALTHY", "UPSCALING", "DOWNSCALING")
    dep = expert_app(str(TINY_DIR / "expert"), ExpertConfig(min_replicas=2, max_replicas=5, target_ongoing_requests=7))
    auto = dep._bound_deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 5, 7)


def test_timeout_gives_none_and_the_expert_recovers(serve_app):
    slow = ServeExpert(serve_app, timeout_s=1e-3)
    replies = asyncio.run(slow(["12*7"] * 64))
    assert None in replies and slow.failures == replies.count(None)  # late replies are dropped, counted
    assert set(replies) <= {None, "84"}
    ok = ServeExpert(serve_app, timeout_s=60)
    assert asyncio.run(ok(["12*7"])) == ["84"]  # the deployment is still healthy afterwards
