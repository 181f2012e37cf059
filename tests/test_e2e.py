"""End to end: `python -m eapo_ray.launch` on a real local Ray cluster with the Serve
expert, rollout actors, buffer and DeepSpeed (gloo) learners, on the bundled tiny models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FAST = ["eval.every=0", "data.num_heldout=24", "rollout.prompts_per_batch=4", "buffer.capacity=2"]


def launch(tmp_path, name, *overrides, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "eapo_ray.launch", f"run_root={tmp_path}", f"run_name={name}", *FAST, *overrides]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout, tmp_path / name


def test_default_run_writes_summary_metrics_checkpoint(tmp_path):
    out, run_dir = launch(tmp_path, "e2e", "steps=3")
    assert f"run directory: {run_dir}" in out and "step 3/3" in out
    s = json.loads((run_dir / "summary.json").read_text())
    for key in ("heldout_accuracy_start", "heldout_accuracy_end", "steps", "samples", "wall_seconds",
                "consult_rate_start", "consult_rate_end"):
        assert key in s
    assert s["steps"] == 3 and s["samples"] > 0 and 0 <= s["heldout_accuracy_end"] <= 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all("loss" in r for r in rows[1:]) and any("acceptance_prob" in r for r in rows[1:])
    assert list((run_dir / "tensorboard").iterdir())
    assert (run_dir / "metrics.png").stat().st_size > 1000
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(run_dir / "final") is not None

    # resume continues from the saved version
    out2, _ = launch(tmp_path, "e2e", "steps=4", f"resume={run_dir}")
    assert "step 4/4" in out2 and "step 1/4" not in out2
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


def test_two_learners_two_rollout_actors_zero3(tmp_path):
    out, run_dir = launch(tmp_path, "dp2", "steps=5", "learner.num_learners=2", "rollout.num_actors=2",
                          "learner.zero_stage=3")
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["steps"] == 5 and s["samples"] > 0
    assert set(s["rollout_batches_by_worker"]) == {"0", "1"}  # both rollout actors delivered batches
    from transformers import AutoModelForCausalLM  # ZeRO-3 shards were gathered for the HF checkpoint
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.model.embed_tokens.weight.shape[0] > 100 and model.model.embed_tokens.weight.abs().sum() > 0
