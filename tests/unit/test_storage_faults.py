"""A run outlives its storage and its trackers failing: an upload to storage_path that fails
(a real pyarrow error) or runs past the sync's one deadline is warned about and the run goes on;
a tracker whose log call raises is dropped with one warning; finishing a tracker is bounded.
A real local Ray cluster (sync_run's tasks), pyarrow's local filesystem and MLflow's file store."""
import functools
import json
import time

import pytest

from eapo_ray.driver.checkpoints import LoopState, save_checkpoint, upload_run
from eapo_ray.driver.system import System
from eapo_ray.storage import UploadFailed, _on_every_node, sync_run


class _SavingLearners:
    """Stands in for learner.LearnerGroup.save only: it writes what a DeepSpeed save writes (tag
    directory, `latest`). A real group is a DeepSpeed start of tens of seconds; what is under
    test is the driver's handling of the upload after it."""

    def __init__(self, version):
        self.version = version

    def save(self, run_dir):
        ckpt = f"{run_dir}/checkpoint"
        import pathlib

        (pathlib.Path(ckpt) / f"step{self.version}").mkdir(parents=True, exist_ok=True)
        (pathlib.Path(ckpt) / f"step{self.version}" / "mp_rank_00_model_states.pt").write_text("w")
        (pathlib.Path(ckpt) / "latest").write_text(f"step{self.version}")


def test_a_failing_upload_does_not_end_save_checkpoint(ray_local, tmp_path, capsys):
    """storage_path names a file, so pyarrow cannot make the run's directory there (OSError):
    sync_run raises UploadFailed naming the node, save_checkpoint warns on stderr and returns
    with the checkpoint and driver state written; before the fix the OSError ended the run."""
    (tmp_path / "store").write_text("not a directory")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("{}\n")
    upload = functools.partial(sync_run, run_dir, f"file://{tmp_path}/store", "r", 2)
    with pytest.raises(UploadFailed, match="failed on 1 node.*the driver's node"):
        upload()
    s = System(learners=_SavingLearners(3), upload=upload)
    save_checkpoint(s, LoopState(version=3), run_dir)
    err = capsys.readouterr().err
    assert err.count("WARNING: uploading the checkpoint at step 3 to storage_path failed") == 1
    assert json.loads((run_dir / "checkpoint" / "driver_state_step3.json").read_text())["version"] == 3
    assert upload_run(s, "the finished run") is None
    good = System(upload=functools.partial(sync_run, run_dir, f"file://{tmp_path}/ok", "r", 2))
    assert upload_run(good, "the finished run") == 5  # metrics, driver states (2), the tag's file, latest
    assert (tmp_path / "ok" / "r" / "checkpoint" / "latest").read_text() == "step3"


def _slow_upload(seconds):
    time.sleep(seconds)


def test_a_sync_has_one_deadline(ray_local):
    """A node's upload past the sync's deadline is reported (not waited for, and not raised)."""
    t0 = time.monotonic()
    results, errors = _on_every_node(_slow_upload, 30, timeout_s=1.0)
    assert time.monotonic() - t0 < 5 and results == [] and "did not return within 1 s" in errors[0]


def _mlflow_trackers(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from eapo_ray.config import TrackingConfig
    from eapo_ray.tracking import Trackers

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = TrackingConfig(mlflow=True, mlflow_uri=f"file://{tmp_path}/mlruns", project="faults")
    return Trackers(cfg, "r", tmp_path, {"seed": 1})


def test_a_tracker_whose_log_raises_is_dropped_with_one_warning(tmp_path, monkeypatch, capsys):
    """MLflow itself rejects a metric name it cannot store ('bad!name': MlflowException): the
    first such row warns once and drops MLflow for the rest of the run, instead of ending it;
    the run is still closed as FINISHED."""
    import mlflow

    t = _mlflow_trackers(tmp_path, monkeypatch)
    run_id = mlflow.active_run().info.run_id
    t.log(1, {"loss": 0.5})
    t.log(2, {"bad!name": 1.0})
    t.log(3, {"loss": 0.25})
    err = capsys.readouterr().err
    assert err.count("WARNING: MLflow failed") == 1 and "no more rows go to MLflow" in err
    t.close(failed=False)
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]
    assert client.get_run(run_id).info.status == "FINISHED" and mlflow.active_run() is None


def test_finishing_a_tracker_is_bounded(tmp_path, monkeypatch, capsys):
    """A W&B finish that does not return (an upload to an unreachable server) is left in its
    daemon thread after the timeout, with a warning: the teardown goes on. Stands in for the W&B
    run object (its finish made to hang); the bound is what is under test."""
    from eapo_ray.tracking import Trackers

    class HangingRun:
        def finish(self, exit_code=0):
            time.sleep(60)

    t = Trackers.__new__(Trackers)
    t.wandb_run, t.mlflow, t.off = HangingRun(), None, set()
    t0 = time.monotonic()
    t.close(timeout_s=0.5)
    assert time.monotonic() - t0 < 3 and "W&B finish did not return within 0.5 s" in capsys.readouterr().err
