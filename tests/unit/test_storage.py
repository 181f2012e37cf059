"""Run directories that outlive a Ray job (eapo_ray/storage.py): where the run root resolves
under `ray job submit`, the incremental upload to a pyarrow.fs URI, pruning there, download for
resume, and credentials kept out of the config. Real files and pyarrow's local filesystem
(file:// URIs), no Ray."""
import json
import time
from pathlib import Path

import pytest

from eapo_ray.config import ConfigError, load_config
from eapo_ray.driver.checkpoints import prepare_run_dir
from eapo_ray.storage import download_tree, fetch_run, prune_remote, resolve_run_root, upload_tree


@pytest.fixture
def job_cwd(tmp_path, monkeypatch):
    """The current directory and environment of a `ray job submit --working-dir` entrypoint."""
    cwd = tmp_path / "ray" / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    return cwd


def test_a_job_run_lands_outside_rays_working_dir_copy(job_cwd, tmp_path):
    """The default run root under a Ray job is ~/eapo_runs (it was runs/ inside the working-dir
    copy, which Ray deletes); a relative run_root there is refused, naming the key."""
    name, run_dir = prepare_run_dir(load_config(None, ["run_name=j"]))
    assert run_dir == tmp_path / "home" / "eapo_runs" / "j" and (run_dir / "config.json").is_file()
    assert job_cwd not in run_dir.parents
    with pytest.raises(ConfigError, match="config key 'run_root'.*relative.*working-dir"):
        prepare_run_dir(load_config(None, ["run_root=runs", "run_name=k"]))
    assert resolve_run_root(str(tmp_path / "abs")) == tmp_path / "abs"
    assert resolve_run_root("~/r") == tmp_path / "home" / "r"


def test_outside_a_job_the_default_root_is_runs_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert resolve_run_root("") == tmp_path / "runs"
    assert resolve_run_root("other") == tmp_path / "other"


def _tree(root: Path, files: dict) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_upload_copies_only_what_changed_and_prune_mirrors_checkpoint_keep(tmp_path):
    run = tmp_path / "run"
    _tree(run, {"metrics.jsonl": "a\n", "checkpoint/latest": "step3",
                **{f"checkpoint/step{i}/model.pt": f"w{i}" for i in (1, 2, 3)},
                **{f"checkpoint/driver_state_step{i}.json": "{}" for i in (1, 2, 3)}})
    uri = f"file://{tmp_path}/store/run"
    assert upload_tree(run, uri) == 8
    assert upload_tree(run, uri) == 0  # nothing changed
    time.sleep(0.01)
    with (run / "metrics.jsonl").open("a") as f:
        f.write("b\n")
    assert upload_tree(run, uri) == 1
    assert (tmp_path / "store/run/metrics.jsonl").read_text() == "a\nb\n"
    assert upload_tree(run, str(tmp_path / "plain")) == 8  # a plain path works too
    assert prune_remote(uri, keep=2) == ["step1"]
    left = sorted(str(p.relative_to(tmp_path / "store/run")) for p in (tmp_path / "store/run").rglob("*") if p.is_file())
    assert left == ["checkpoint/driver_state_step2.json", "checkpoint/driver_state_step3.json", "checkpoint/latest",
                    "checkpoint/step2/model.pt", "checkpoint/step3/model.pt", "metrics.jsonl"]


def test_resume_from_a_storage_uri_downloads_the_run(tmp_path, monkeypatch):
    """resume=file://<store>/<name>: the run comes back under <run_root>/<name> and resumes there."""
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    src = tmp_path / "src" / "r1"
    src.mkdir(parents=True)
    cfg0 = load_config(None, [f"run_root={tmp_path / 'src'}", "run_name=r1"])
    (src / "config.json").write_text(json.dumps({"seed": cfg0.seed}))
    _tree(src, {"checkpoint/latest": "step2", "checkpoint/step2/model.pt": "w"})
    upload_tree(src, f"file://{tmp_path}/store/r1")
    local = fetch_run(f"file://{tmp_path}/store/r1", tmp_path / "here")
    assert (local / "checkpoint" / "step2" / "model.pt").read_text() == "w"
    with pytest.raises(ConfigError, match="config key 'resume': nothing is stored"):
        fetch_run(f"file://{tmp_path}/store/none", tmp_path / "here")
    assert download_tree(f"file://{tmp_path}/store/none", tmp_path / "x") == 0


@pytest.mark.parametrize("override", ["storage_path=s3://bucket/runs?access_key=A&secret_key=B",
                                      "tracking.mlflow_uri=https://me:pw@mlflow.example.com"])
def test_credentials_in_the_config_are_refused(override):
    with pytest.raises(ConfigError, match=f"config key '{override.split('=')[0]}' holds a credential"):
        load_config(None, [override])


def test_a_tracker_that_is_not_installed_is_named(monkeypatch, tmp_path):
    import sys

    from eapo_ray.config import TrackingConfig
    from eapo_ray.tracking import Trackers

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=r"tracking.wandb.*pip install 'eapo_ray\[wandb\]'"):
        Trackers(TrackingConfig(wandb=True), "r", tmp_path, {})
