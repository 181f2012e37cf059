"""The launcher's own logic: weight sync at start, resume bookkeeping, and teardown when a
run fails half-way (on a real local Ray cluster with the Serve expert)."""
import json
import time

import pytest

from eapo_ray.config import load_config
from eapo_ray.driver import checkpoints, run, system


class _RecordingLearners:
    """Stands in for LearnerGroup's NCCL calls, which need GPUs (NCCL) to run for real."""

    def __init__(self):
        self.calls = []

    def init_weight_sync(self, workers):
        self.calls.append(("init", len(workers)))

    def sync_weights(self):
        self.calls.append(("sync",))
        return 0.0


def test_nccl_start_sends_the_learners_weights_at_once():
    """Engines start from the base model: after a resume the learner is ahead of them, so the
    first sync must happen right after the group opens, not after the next train step."""
    learners = _RecordingLearners()
    system.start_nccl_weight_sync(learners, ["w0", "w1"])
    assert learners.calls == [("init", 2), ("sync",)]


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path):
    rows = [{"step": 0, "heldout_accuracy": 0.1, "heldout_formatted": 0.5}] + \
        [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4, 5)] + [{"step": 4, "heldout_accuracy": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, last = checkpoints.resume_metrics(tmp_path, 3)
    kept = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [0, 1, 2, 3]
    assert first == last == {"accuracy": 0.1, "formatted": 0.5}  # the step-4 evaluation was after it
    # resumed with eval.enabled=false: the earlier attempt's evaluations are not this run's
    assert checkpoints.resume_metrics(tmp_path, 3, evaluations=False) == (None, None)


def test_loop_state_round_trips(tmp_path):
    st = checkpoints.LoopState(version=3, samples=96, generated=128, serial=7, by_worker={0: 4, 2: 3}, logp_gap_max=0.01)
    st.save(tmp_path / "s.json")
    assert checkpoints.LoopState.load(tmp_path / "s.json") == st


@pytest.mark.slow
def test_a_run_that_fails_half_way_tears_everything_down(ray_local, tmp_path, monkeypatch):
    """The evaluator cannot start (its held-out file is missing) after the Serve expert, the
    learners and the rollout actors are up: run() raises, and nothing it started is left. (The
    launcher now reads every data file before anything starts, which would catch this file at once:
    that check is bypassed here so that the failure comes half-way, as any other actor's start-up
    failure would.)"""
    ray = ray_local
    from ray import serve

    import eapo_ray.driver.run as driver_run

    monkeypatch.setattr(driver_run, "check_data", lambda cfg: "data: (not checked in this test)")

    cfg = load_config(None, [f"run_root={tmp_path}", "run_name=broken", f"data.heldout={tmp_path}/missing.jsonl",
                             "rollout.prompts_per_batch=2", "eval.every=0"])
    with pytest.raises(ray.exceptions.RayError):
        run.run(cfg)
    assert "broken-expert" not in serve.status().applications
    for _ in range(30):  # ray.kill is asynchronous
        alive = [n for n in ray.util.list_named_actors() if n.startswith("broken-")]
        if not alive:
            break
        time.sleep(1)
    assert not alive
    serve.shutdown()
