"""The expert as a real Ray Serve deployment: answers, autoscaling config, and an expert
that times out or is gone turns into "unavailable" (None), never a crash."""
import pytest

from eapo_ray.config import TINY_DIR, ExpertConfig
from eapo_ray.expert import expert_app
from eapo_ray.rollout.actor import ServeExpert

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def serve_app(ray_local):
    from ray import serve

    serve.start(proxy_location="Disabled")
    cfg = ExpertConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=3)
    serve.run(expert_app(str(TINY_DIR / "expert"), cfg), name="test-expert", route_prefix=None)
    yield "test-expert"
    serve.delete("test-expert")
    serve.shutdown()


def test_expert_answers_sub_questions(serve_app):
    ask = ServeExpert(serve_app, timeout_s=60)
    qs = ["12*7", "345+6", "100-9", "88*9", "5*5", "999-1"]
    assert ask(qs) == [str(eval(q)) for q in qs]  # the default reply_template is "{answer}"
    assert ask.failures == 0


def test_autoscaling_config_comes_from_config(serve_app):
    from ray import serve

    status = serve.status().applications[serve_app].deployments["expert"]
    assert status.status in ("HEALTHY", "UPSCALING", "DOWNSCALING")
    dep = expert_app(str(TINY_DIR / "expert"), ExpertConfig(min_replicas=2, max_replicas=5, target_ongoing_requests=7))
    auto = dep._bound_deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 5, 7)


def test_timeout_and_missing_app_give_none(serve_app):
    slow = ServeExpert(serve_app, timeout_s=1e-3)
    assert slow(["12*7"] * 8) == [None] * 8 and slow.failures == 8
    ok = ServeExpert(serve_app, timeout_s=60)
    assert ok(["2+2"]) == ["4"]  # the deployment is still healthy afterwards
