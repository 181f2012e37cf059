"""The paper table end to end at a small budget: real launcher subprocesses (local Ray, Serve,
DeepSpeed) for the training rows, distillation, evaluation, outputs, and resume."""
import json
import os

import pytest

from experiments import paper_table as P


@pytest.mark.slow
def test_paper_table_small_budget(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "table"
    small = ["--set", "data.num_heldout=24", "data.num_train=200", "rollout.prompts_per_batch=4", "buffer.capacity=2",
             "eval.every=1"]
    args = ["--out", str(out), "--steps", "2", "--eval-samples", "2", "--budget-min", "10"]
    # rl is the eapo row's launcher with the expert off (config delta only): not rerun here, for the CI budget
    assert P.main(["--rows", "base", "distill", "eapo", "--seeds", "0", *args, *small]) == 0
    text = capsys.readouterr().out
    assert "[paper_table] plan: 3 rows x 1 seeds [0], 2 training steps" in text and "ETA" in text
    for name in ("table.md", "results.json", "plan.json"):
        assert (out / name).exists()
    for name in ("accuracy_vs_samples.png", "eapo_consult.png"):
        assert (out / name).stat().st_size > 5000
    res = json.loads((out / "results.json").read_text())
    eapo = res["rows"]["eapo"]["per_seed"]["0"]
    assert eapo["steps"] == 2 and eapo["samples"] > 0 and eapo["sampled_k"] == 2
    assert eapo["greedy"] == pytest.approx(eapo["launcher_greedy_end"])  # same held-out set as the launcher
    assert res["rows"]["distill"]["per_seed"]["0"]["samples"] == 64  # = 2 steps x 4 prompts x 8 samples
    assert res["expert_accuracy"]["T=0"]["consult_like"] > 0.9
    assert res["curves"]["eapo"]["heldout_accuracy"]["steps"] == [0, 1, 2]

    # a second seed for the cheapest row; the seed-0 run is resumed, not rerun
    summary = out / "runs" / "base-s0" / "summary.json"
    before = os.stat(summary).st_mtime_ns
    assert P.main(["--rows", "base", "--seeds", "0", "1", *args, *small]) == 0
    text = capsys.readouterr().out
    assert "resuming: 1 runs" in text and os.stat(summary).st_mtime_ns == before
    res = json.loads((out / "results.json").read_text())
    agg = res["rows"]["base"]["aggregate"]["greedy"]
    assert agg["n"] == 2 and set(agg["values"]) == {"0", "1"}
    assert "±" in (out / "table.md").read_text()
