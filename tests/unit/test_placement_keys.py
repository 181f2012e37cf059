"""The placement keys (learner.node_resource, learner.placement_strategy, eval.node_resource, and
the rollout/expert node resources beside them) are checked at load, naming the key; and the
learners' bundle carries the learner resource (no Ray start)."""
import pytest

from eapo_ray.config import ConfigError, load_config
from eapo_ray.learner.group import learner_bundle


@pytest.mark.parametrize("override, message", [
    ("learner.node_resource=GPU", "config key 'learner.node_resource' must name a custom Ray resource"),
    ("eval.node_resource=node:10.0.0.1", "config key 'eval.node_resource' must name a custom Ray resource"),
    ("rollout.node_resource=two words", "config key 'rollout.node_resource' must name a custom Ray resource"),
    ("learner.placement_strategy=STRICT_SPREAD", "config key 'learner.placement_strategy' must be one of"),
])
def test_bad_placement_keys_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("other", ["rollout", "eval", "expert"])
def test_the_learners_resource_is_theirs_alone(other):
    with pytest.raises(ConfigError, match=rf"'learner.node_resource': 'gpu_a' is also {other}.node_resource"):
        load_config(None, ["learner.node_resource=gpu_a", f"{other}.node_resource=gpu_a"])
    load_config(None, ["rollout.node_resource=gpu_a", "eval.node_resource=gpu_a"])  # rollout + evaluator may share


def test_learner_bundle_asks_one_unit_of_its_node_resource():
    cfg = load_config(None, ["learner.num_gpus=1", "learner.num_cpus=8", "learner.node_resource=learner_node"])
    assert learner_bundle(cfg) == {"CPU": 8.0, "GPU": 1.0, "learner_node": 1}
    assert learner_bundle(load_config(None, [])) == {"CPU": 0.5}
