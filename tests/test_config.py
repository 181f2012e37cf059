import pytest

from eapo_ray.config import ConfigError, load_config
from eapo_ray.launch import main


def test_default_config_loads_and_overrides_apply():
    cfg = load_config(None, ["learner.lr=3e-4", "rollout.num_actors=2", "acceptance.kind=cosine", "algo.dynamic_sampling=false"])
    assert cfg.learner.lr == 3e-4 and cfg.rollout.num_actors == 2
    assert cfg.acceptance.kind == "cosine" and cfg.algo.dynamic_sampling is False


@pytest.mark.parametrize("override,needle", [
    ("learner.lrr=1", "learner.lrr"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("learner.lr=fast", "learner.lr"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("rollout.engine=tgi", "rollout.engine"),
    ("acceptance.kind=sigmoid", "acceptance"),
    ("loss.correction=vtrace", "loss"),
    ("expert.min_replicas=3", "expert.min_replicas"),
    ("learner.zero_stage=4", "learner.zero_stage"),
    ("learner.num_learners=3", "learner.num_learners"),  # 64 samples do not split over 3
    ("data.template=no placeholder", "data.template"),
    ("steps", "key=value"),
])
def test_invalid_config_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_cli_fails_fast_on_bad_key(capsys, tmp_path):
    assert main(["learner.lrr=1"]) == 2
    assert "learner.lrr" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2]\n")
    assert main(["--config", str(bad)]) == 2
    assert "learner" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
