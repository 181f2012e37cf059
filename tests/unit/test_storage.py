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


def test_resume_from_a_uri_takes_the_stored_runs_config_and_checks_its_pinned_keys(tmp_path, monkeypatch, capsys):
    """resume=file://<store>/<name> through the launcher: the run is downloaded first, so the
    resume takes its saved config (seed=7 here, not the default) and refuses a changed model key,
    as a resume from a local run directory does (before the fix, a URI skipped both)."""
    from eapo_ray.launch import main

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    _, src = prepare_run_dir(load_config(None, [f"run_root={tmp_path / 'src'}", "run_name=r1", "seed=7"]))
    _tree(src, {"checkpoint/latest": "step2", "checkpoint/step2/model.pt": "w"})
    upload_tree(src, f"file://{tmp_path}/store/r1")
    here = tmp_path / "here"
    assert main(["--print-config", f"resume=file://{tmp_path}/store/r1", f"run_root={here}"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)  # stdout is the YAML alone (the download line: stderr)
    assert printed["seed"] == 7 and printed["resume"] == str(here / "r1")
    assert (here / "r1" / "checkpoint" / "step2" / "model.pt").read_text() == "w"
    assert main([f"resume=file://{tmp_path}/store/r1", f"run_root={tmp_path / 'there'}", "model.policy=other"]) == 2
    assert "config key 'model.policy'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="config key 'resume'.*storage URI"):  # not silently without its config
        load_config(None, [f"resume=file://{tmp_path}/store/r1"])


def test_fetch_run_never_overwrites_a_local_copy(tmp_path):
    """An existing <run_root>/<name> may hold newer files than the store (a checkpoint not yet
    uploaded): fetch_run refuses, naming resume=<local>, and changes nothing there. A download
    goes into <name>.download first, so an interrupted one never passes for a run directory."""
    _tree(tmp_path / "store" / "r1", {"config.json": "{}", "checkpoint/latest": "step2"})
    _tree(tmp_path / "here" / "r1", {"config.json": "{}", "checkpoint/latest": "step4"})
    with pytest.raises(ConfigError, match=f"already exists.*resume={tmp_path / 'here' / 'r1'}"):
        fetch_run(f"file://{tmp_path}/store/r1", tmp_path / "here")
    assert (tmp_path / "here/r1/checkpoint/latest").read_text() == "step4"
    _tree(tmp_path / "new" / "r1.download", {"junk": "x"})  # an interrupted earlier download
    local = fetch_run(f"file://{tmp_path}/store/r1", tmp_path / "new")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["r1"]
    assert not (local / "junk").exists() and (local / "checkpoint/latest").read_text() == "step2"


def test_every_rank_prunes_and_ranks_sharing_a_directory_do_not_trip_over_each_other(tmp_path, monkeypatch):
    """Every learner rank prunes its node's checkpoint directory after the barrier. On a node
    without `latest` (DeepSpeed's rank 0 writes it) the tag just saved is kept all the same; where
    ranks share the directory, a tag the other rank deleted between this rank's listing and its
    rmtree is not an error (the race is made to happen: the other rank's rmtree runs first)."""
    import shutil

    from eapo_ray.learner.checkpoints import prune_checkpoints

    ckpt = tmp_path / "node2" / "checkpoint"
    _tree(ckpt, {f"step{i}/zero_pp_rank_1_optim_states.pt": "s" for i in (1, 2, 3, 5)})  # no `latest`
    assert prune_checkpoints(ckpt, 1, current="step3") == ["step1", "step2"]  # step5: a stale newer tag
    assert sorted(p.name for p in ckpt.iterdir()) == ["step3", "step5"]

    shared = tmp_path / "shared" / "checkpoint"
    _tree(shared, {"latest": "step3", **{f"step{i}/f{j}": "s" for i in (1, 2, 3) for j in range(3)}})
    real_rmtree = shutil.rmtree

    def other_rank_first(path, *args, **kwargs):
        real_rmtree(path, ignore_errors=True)  # the other rank's prune got there first
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", other_rank_first)
    assert prune_checkpoints(shared, 1, current="step3") == ["step1", "step2"]
    assert sorted(p.name for p in shared.iterdir()) == ["latest", "step3"]
