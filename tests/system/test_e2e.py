"""End to end: `python -m eapo_ray.launch` on a real local Ray cluster with the Serve
expert, rollout actors, buffer and DeepSpeed (gloo) learners, on the bundled tiny models:
the default run (console, Prometheus metrics, accounting, checkpoints, resume, Ctrl-C) and
the multi-learner ZeRO-3 shape."""
import http.client
import json
import re
import time
import urllib.request

import pytest
from launching import Launch, free_port, interrupt_and_check_nothing_is_left

from eapo_ray import metrics

pytestmark = pytest.mark.slow


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except (OSError, http.client.HTTPException):  # timeouts, a cut connection
        return ""


def test_default_run_console_metrics_accounting_checkpoint_then_resume_and_ctrl_c(tmp_path):
    """The default config (Serve expert on), two launches of one run, every check a launch of
    the default config needs (one run instead of three: the CI budget):

    1. 5 steps, a checkpoint every step, stale batches dropped (buffer.max_staleness=0). While
       it runs, Ray's Prometheus endpoint shows every EAPO metric tagged with the run name. The
       console has no Serve access or INFO lines, the dashboard URL and run directory once at
       the top and one progress line per step with ETA. summary.json: held-out accuracies, the
       time breakdown, and an accounting block that closes with nothing lost (stale drops
       included); metrics rows, TensorBoard, plot, the HF checkpoint, the newest 2 tags kept.
    2. resume=<run dir> with steps=100: it continues from the saved version (no replayed
       prompts, no re-evaluation of the start), then Ctrl-C (SIGINT to the process group, as a
       terminal sends it): teardown, the resume command named, exit 130, no process of the
       run left."""
    port, name = free_port(), "e2e"
    run = Launch(tmp_path, name, "steps=5", "checkpoint_every=1", f"metrics_export_port={port}", "eval.enabled=true",
                 "buffer.max_staleness=0",  # batches made during a step go stale: every accounting term in play
                 env={"RAY_metrics_report_interval_ms": "1000"})  # export every second (default 10 s)
    # every metric but the OpenAI-endpoint expert's failure counter (expert.engine openai only; this run's
    # expert is the bundled model: tests/system/test_expert_endpoint.py counts that expert's failures)
    wanted, seen = set(metrics.SPECS) - {"eapo_expert_endpoint_failures"}, set()
    try:
        while run.p.poll() is None and seen != wanted:
            text = _scrape(port)
            # accumulate: a scrape can time out on a loaded machine, and the run's metrics go when it ends
            seen |= {n for n in wanted if re.search(rf'^ray_{n}(_bucket|_count)?{{[^}}]*run="{name}"', text, re.M)}
            time.sleep(1)
        rc = run.finish()
    finally:
        run.kill_all()
    log, run_dir = run.log, run.run_dir
    assert rc == 0, log[-5000:]
    assert seen == wanted, f"missing on the Prometheus endpoint: {sorted(wanted - seen)}"

    lines = log.splitlines()
    assert "CALL __call__" not in log and "Started Serve" not in log and "Loading weights" not in log, log[:3000]
    assert not [ln for ln in lines if re.match(r"^(\x1b\[\d+m)?\(\w+ pid=\d+", ln) and " INFO " in ln], log[:3000]
    top = lines[:4]
    assert any(ln.startswith(f"[eapo] run directory: {run_dir}") for ln in top), top
    assert any(re.match(r"\[eapo\] dashboard: http://127\.0\.0\.1:\d+", ln) for ln in top), top
    progress = [ln for ln in lines if re.match(r"\[eapo\] step \d+/5 .* eta \d+m\d\ds$", ln)]
    assert [int(re.search(r"step (\d+)/", ln).group(1)) for ln in progress] == [1, 2, 3, 4, 5]

    s = json.loads((run_dir / "summary.json").read_text())
    for key in ("heldout_accuracy_start", "heldout_accuracy_end", "steps", "samples", "wall_seconds",
                "consult_rate_start", "consult_rate_end"):
        assert key in s
    assert s["steps"] == 5 and s["samples"] > 0 and 0 <= s["heldout_accuracy_end"] <= 1
    a = s["accounting"]
    assert a["closes"] and a["batches"]["lost"] == 0 and a["samples"]["lost"] == 0
    assert a["batches"]["trained"] == 5 and a["samples"]["trained"] == s["samples"]
    assert a["batches"]["dropped_stale"] >= 1 and a["samples"]["dropped_stale"] >= 1  # every term in play
    for unit in ("batches", "samples"):
        c = a[unit]
        assert c["produced"] == sum(v for k, v in c.items() if k != "produced")
    assert "[eapo] accounting: produced" in log

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert all("loss" in r for r in rows[1:]) and any("acceptance_prob" in r for r in rows[1:])
    # issue 13: the time breakdown in every row and the summary; the final evaluation on the last row
    assert all(r["time_step_s"] > 0 and 0 <= r["learner_idle_frac"] <= 1 and 0 <= r["rollout_idle_frac"] <= 1
               and r["rollout_engine_s"] > 0 and r["forward_s"] > 0 for r in rows[1:])
    assert "heldout_accuracy" in rows[-1] and rows[-1]["heldout_accuracy"] == s["heldout_accuracy_end"]
    bd = s["breakdown"]
    assert bd["steps"] == 5 and bd["loop_seconds"] == s["loop_seconds"] > 0
    assert bd["rollout_per_batch"]["engine_s"] > 0 and bd["learner_per_step"]["backward_s"] > 0
    assert bd["driver_per_step"]["step_s"] >= bd["driver_per_step"]["train_call_s"] > 0
    assert list((run_dir / "tensorboard").iterdir())
    assert (run_dir / "metrics.png").stat().st_size > 1000
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(run_dir / "final") is not None

    assert 0 <= s["logp_gap_max"] < 1e-3  # fp32 transformers engine vs fp32 learner: the same numbers
    assert all(r["share_prompts"] == 1 for r in rows[1:])  # the learner's set-up check passed: prompts computed once
    tags = sorted(p.name for p in (run_dir / "checkpoint").iterdir() if p.is_dir())
    assert tags == ["step4", "step5"]  # learner.checkpoint_keep=2 of the 5 saved
    state = json.loads((run_dir / "checkpoint" / "driver_state.json").read_text())
    assert state["version"] == 5 and state["serial"] >= 5

    # resume continues from the saved version: counters, batch serials (no replayed prompts or
    # acceptance coins), one metrics row per step, no re-evaluation of the start; then Ctrl-C
    again = Launch(tmp_path, name, "steps=100", "checkpoint_every=1", f"resume={run_dir}", "eval.enabled=true",
                   out_name="resume.out")
    try:
        again.wait_for(r"^\[eapo\] step 7/100")
        interrupt_and_check_nothing_is_left(again, "sigint-group")
    finally:
        again.kill_all()
    out2 = again.log
    assert "step 6/100" in out2 and "step 5/100" not in out2 and "held-out accuracy (policy alone) at step" not in out2
    state2 = json.loads((run_dir / "checkpoint" / "driver_state.json").read_text())
    assert state2["version"] >= 6 and state2["serial"] > state["serial"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(len(rows))) and len(rows) >= 8


def test_two_learners_three_rollout_actors_small_buffer_zero3(tmp_path):
    """More rollout actors than buffer slots, overlap on: the shape that deadlocked when actors
    blocked inside the buffer (weight updates queued behind them). No expert (not what this
    tests; its replica and Serve's controller would cost ~10 s of CPU to start)."""
    run = Launch(tmp_path, "dp2", "steps=5", "learner.num_learners=2", "rollout.num_actors=3",
                 "buffer.capacity=2", "rollout.overlap=true", "learner.zero_stage=3",
                 "rollout.num_cpus=0.25", "acceptance.kind=constant", "acceptance.start=0.0")
    assert run.finish() == 0, run.log[-5000:]
    run_dir = run.run_dir
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["steps"] == 5 and s["samples"] > 0
    # eval.enabled=false (tests/system/launching.FAST): no evaluation, none pretended
    assert s["heldout_accuracy_start"] is None and s["heldout_accuracy_end"] is None
    assert "held-out accuracy" not in run.log and "heldout_acc nan" in run.log, run.log[-3000:]
    assert "no held-out evaluation (eval.enabled=false)" in run.log, run.log[-3000:]
    assert len(s["rollout_batches_by_worker"]) >= 2  # several rollout actors delivered batches
    from transformers import AutoModelForCausalLM  # ZeRO-3 shards were gathered for the HF checkpoint
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.model.embed_tokens.weight.shape[0] > 100 and model.model.embed_tokens.weight.abs().sum() > 0
