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


def test_a_config_file_is_a_delta_and_base_chains(tmp_path):
    """One truth: a file names only what it changes; `base:` starts from another file (relative
    to the file), chains, and a cycle is a clear error."""
    (tmp_path / "a.yaml").write_text("learner:\n  lr: 3.0e-5\nrollout:\n  group_size: 4\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nrollout:\n  prompts_per_batch: 2\n")
    cfg = load_config(tmp_path / "sub" / "b.yaml", ["rollout.group_size=2"])
    default = load_config(None)
    assert (cfg.learner.lr, cfg.rollout.group_size, cfg.rollout.prompts_per_batch) == (3e-5, 2, 2)
    assert cfg.rollout.temperature == default.rollout.temperature and cfg.acceptance == default.acceptance
    (tmp_path / "c.yaml").write_text("acceptance:\n  kind: step\n")  # a partial section keeps the run's defaults
    assert load_config(tmp_path / "c.yaml").acceptance.total_steps == default.acceptance.total_steps == 30
    (tmp_path / "loop1.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop1.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop1.yaml")
    (tmp_path / "nobase.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "nobase.yaml")


@pytest.mark.parametrize("override", ["rollout.engine=tgi", "expert.engine=HF", "learner.backend=mpi",
                                      "algo.adv_scale=mad", "rollout.weight_sync=rdma", "loss.agg=sum"])
def test_literal_choices_are_validated_with_the_key_and_the_choices(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}.* must be one of '"):
        load_config(None, [override])


def test_every_shipped_config_is_a_delta_on_its_base():
    """A key a file sets to the value it already has from its base (or the defaults) must say
    why in a comment on that line; otherwise it is copy-paste that drifts."""
    import re
    from pathlib import Path

    import yaml

    from eapo_ray.config import to_dict

    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert len(files) >= 10

    def leaves(d, p=""):
        for k, v in d.items():
            yield from leaves(v, p + k + ".") if isinstance(v, dict) and v else [(p + k, v)]

    for f in files:
        text = f.read_text()
        raw = yaml.safe_load(text) or {}
        base = raw.pop("base", None)
        below = to_dict(load_config(f.parent / base if base else None))
        lines, path, where = text.splitlines(), [], {}
        for i, line in enumerate(lines):
            m = re.match(r"^( *)(\w+):", line)
            if m:
                path = path[: len(m.group(1)) // 2] + [m.group(2)]
                where[".".join(path)] = i
        for key, v in leaves(raw):
            node = below
            for k in key.split("."):
                node = node[k]
            assert node != v or "  #" in lines[where[key]], f"{f.name}: '{key}: {v}' repeats its base without a reason"
