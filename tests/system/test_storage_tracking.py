"""Run output that outlives the job (storage_path) and experiment tracking (W&B offline, MLflow's
local file store), on one real launch (local Ray, Serve, DeepSpeed on gloo)."""
import json
import math
from pathlib import Path

import pytest
from launching import Launch
from tracking_readers import mlflow_metrics, wandb_history

pytestmark = pytest.mark.slow


def _same(a, b) -> bool:
    return (isinstance(a, float) and math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-12)


def test_storage_path_gets_the_run_and_trackers_get_the_metrics_rows(tmp_path, monkeypatch):
    """steps=2, checkpoint_every=1, storage_path=file://<tmp>/store, tracking.wandb and .mlflow on:
    the store holds every file of the run directory, byte for byte (checkpoint tags, driver
    counters, metrics.jsonl, summary.json, final/); W&B's offline history and MLflow's metric
    history hold exactly metrics.jsonl's numeric fields at each row's step."""
    store = tmp_path / "store"
    run = Launch(tmp_path, "st", "steps=2", "checkpoint_every=1", f"storage_path=file://{store}",
                 "tracking.wandb=true", "tracking.mlflow=true", f"tracking.mlflow_uri=file://{tmp_path}/mlruns",
                 env={"WANDB_MODE": "offline", "MLFLOW_ALLOW_FILE_STORE": "true",
                      "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache")})
    rc = run.finish(timeout=600)
    log = run.log
    assert rc == 0, log[-5000:]
    assert f"[eapo] run storage: file://{store}/st" in log, log[-3000:]
    local = {p.relative_to(run.run_dir): p for p in run.run_dir.rglob("*") if p.is_file()}
    stored = {p.relative_to(store / "st"): p for p in (store / "st").rglob("*") if p.is_file()}
    for must in ("summary.json", "metrics.jsonl", "config.json", "checkpoint/latest", "checkpoint/driver_state.json",
                 "final/model.safetensors"):
        assert Path(must) in stored, sorted(map(str, stored))
    tag = (run.run_dir / "checkpoint" / "latest").read_text().strip()
    assert any(p.parts[:2] == ("checkpoint", tag) for p in stored), sorted(map(str, stored))
    assert set(local) == set(stored), set(local) ^ set(stored)
    # (W&B's service process may still append to its own debug logs after the run has finished)
    differ = [str(k) for k in local if local[k].read_bytes() != stored[k].read_bytes()
              and not (k.parts[0] == "wandb" and k.suffix == ".log")]
    assert not differ, differ

    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [1, 2], rows
    numeric = [{k: float(v) for k, v in r.items() if isinstance(v, (int, float))} for r in rows]

    history = wandb_history(next((run.run_dir / "wandb").glob("offline-run-*/run-*.wandb")))
    history = [{k: v for k, v in h.items() if not k.startswith("_")} for h in history]
    assert len(history) == len(rows), (len(history), len(rows))
    for want, got in zip(numeric, history):
        assert set(got) == set(want), set(got) ^ set(want)
        assert all(_same(float(got[k]), want[k]) for k in want), [(k, got[k], want[k]) for k in want]

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store without it (reading too)
    logged = mlflow_metrics(f"file://{tmp_path}/mlruns", "st")
    assert sorted(logged) == [1, 2], sorted(logged)
    for want in numeric:
        got = logged[int(want["step"])]
        want = {k: v for k, v in want.items() if k != "step"}
        assert set(got) == set(want), set(got) ^ set(want)
        assert all(_same(got[k], want[k]) for k in want), [(k, got[k], want[k]) for k in want]
    print(f"storage: {len(stored)} files stored; W&B and MLflow: {len(rows)} rows x {len(numeric[0])} metrics")
