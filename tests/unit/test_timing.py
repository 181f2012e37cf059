"""The per-step time breakdown's bookkeeping (issue 13): fake clocks, no Ray."""
import time
from pathlib import Path

import pytest

from eapo_ray.config import ConfigError, load_config
from eapo_ray.driver.breakdown import Breakdown
from eapo_ray.driver.evaluation import PendingRows
from eapo_ray.timing import Overlap, fraction


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_overlap_splits_wall_time_by_what_is_in_flight():
    c = FakeClock()
    o = Overlap(clock=c)
    c.t = 1.0  # 1 s idle
    o.enter("engine")
    c.t = 3.0  # 2 s engine only
    o.enter("expert")
    o.enter("expert")  # two queries in flight count once
    c.t = 4.0  # 1 s both
    o.exit("engine")
    c.t = 6.5  # 2.5 s expert only: the batch blocked on the expert
    o.exit("expert")
    o.exit("expert")
    with o.busy("reward"):
        c.t = 7.0
    assert o.idle_s() == pytest.approx(1.0)
    assert o.busy_s("engine") == pytest.approx(3.0)
    assert o.busy_s("expert") == pytest.approx(3.5)
    assert o.only_s("expert") == pytest.approx(2.5)
    assert o.busy_s("reward") == pytest.approx(0.5)
    assert o.total_s() == pytest.approx(7.0)
    assert fraction(3, 2) == 1.0 and fraction(1, 0) == 0.0 and fraction(1, 4) == 0.25


def test_pending_rows_are_written_in_step_order_with_their_own_evaluation():
    written, done = [], set()
    rows = PendingRows(lambda step, row: written.append((step, dict(row))), "t",
                       ready=lambda ref: ref in done, get=lambda ref, timeout=None: {"accuracy": ref / 10})
    rows.add(1, {"a": 1})
    rows.flush()
    rows.add(2, {"a": 2}, ref=2)  # evaluation of step 2's weights, still running
    rows.add(3, {"a": 3})
    rows.flush()
    assert [s for s, _ in written] == [1]  # step 3 waits behind step 2
    done.add(2)
    rows.add(4, {"a": 4}, ref=4)
    rows.flush()
    assert [s for s, _ in written] == [1, 2, 3]
    assert written[1][1]["heldout_accuracy"] == 0.2 and "heldout_accuracy" not in written[2][1]
    rows.flush(wait=True)
    assert written[-1] == (4, {"a": 4, "heldout_accuracy": 0.4}) and rows.last == {"accuracy": 0.4}


def test_a_failed_evaluation_is_said_and_recorded_not_replaced_by_an_older_one(capsys):
    """Cold review: a failed evaluation (e.g. a dead evaluator) was only a field in its row, and
    the run then reported an older evaluation as its final accuracy. Now it is printed, recorded
    per step (run() exits 1 when the final step's failed), and `last_step` says which step the
    last good evaluation was of."""
    import ray

    def get(ref, timeout=None):
        if ref == 2:
            raise ray.exceptions.RayActorError()
        return {"accuracy": ref / 10}

    written = []
    rows = PendingRows(lambda step, row: written.append((step, dict(row))), "t", ready=lambda ref: True, get=get)
    rows.add(1, {}, ref=1)
    assert rows.evaluating
    rows.add(2, {}, ref=2)
    rows.flush()
    assert not rows.evaluating
    assert rows.failed == {2: "RayActorError"} and rows.last == {"accuracy": 0.1} and rows.last_step == 1
    assert written[1][1]["heldout_error"] == "RayActorError" and "heldout_accuracy" not in written[1][1]
    assert "held-out evaluation of step 2 failed" in capsys.readouterr().err


def test_breakdown_sums_steps_and_idle_fractions():
    bd = Breakdown(num_actors=2)
    bd.rollout({"produce_s": 3.0, "engine_s": 2.0})
    bd.rollout({"produce_s": 1.0, "engine_s": 1.0})
    bd.step({"wait_data_s": 1.0, "train_call_s": 2.0}, {"train_seconds": 1.5, "forward_s": 0.5}, 4.0)
    assert bd.last["driver_overhead_s"] == pytest.approx(1.0)
    bd.loop_seconds = 4.0
    s = bd.summary()
    assert s["learner_idle_frac"] == pytest.approx(1 - 1.5 / 4) and s["rollout_idle_frac"] == pytest.approx(0.5)
    assert s["rollout_per_batch"]["engine_s"] == pytest.approx(1.5) and s["driver_per_step"]["step_s"] == 4.0


def test_an_evaluation_that_never_returns_fails_at_its_deadline(capsys):
    """eval.timeout_s: waiting for an evaluation (at a checkpoint, at the end, or with
    eval.overlap=false) is bounded; past the deadline the evaluation counts as failed (the final
    one failing stops the run). The old flush called ray.get(ref) with no timeout: a hung
    evaluator blocked the driver for good."""
    import ray

    timeouts = []

    def get(ref, timeout=None):  # a hung evaluator: ray.get's behaviour with a timeout
        timeouts.append(timeout)
        assert timeout is not None, "an unbounded wait"
        raise ray.exceptions.GetTimeoutError("not back")

    written, replaced = [], []
    rows = PendingRows(lambda step, row: written.append((step, dict(row))), "t", ready=lambda ref: False, get=get,
                       timeout_s=5.0, on_timeout=lambda: replaced.append(1))
    rows.add(1, {}, ref="hung")
    rows.flush()  # not back, not past its deadline: the row waits
    assert not written and timeouts == []
    rows.add(2, {}, ref="late", deadline=time.time() - 1)  # already past its deadline
    rows.flush(wait=True)
    assert 0 < timeouts[0] <= 5.0 and timeouts[1] == 0.0
    assert rows.failed == {1: "GetTimeoutError", 2: "GetTimeoutError"} and [w[0] for w in written] == [1, 2]
    assert len(replaced) == 2  # the launcher replaces the hung evaluator (calls queued behind it fail at once)
    assert "held-out evaluation of step 1 failed (GetTimeoutError" in capsys.readouterr().err


def test_checkpoint_time_is_in_the_breakdown_and_the_parts_sum_to_the_step():
    """The evaluation wait and the save at a checkpoint come after the step's row is written;
    they used to land in eval_s only (the save nowhere), so the parts summed to more than step_s
    (cold review, finding 5)."""
    bd = Breakdown(num_actors=1)
    bd.step({"wait_data_s": 1.0, "train_call_s": 2.0}, {}, 3.5)
    bd.after_row("eval_s", 0.25)
    bd.after_row("checkpoint_s", 1.25)
    d = bd.summary()["driver_per_step"]
    assert d["checkpoint_s"] == 1.25 and d["eval_s"] == 0.25 and d["step_s"] == 5.0
    assert sum(v for k, v in d.items() if k != "step_s") == pytest.approx(d["step_s"])


def test_latency_knob_and_eval_overlap_are_validated():
    cfg = load_config(None, ["expert.added_latency_s=0.2", "eval.overlap=false", "rollout.prune_finished=false",
                             "learner.length_buckets=false"])
    assert cfg.expert.added_latency_s == 0.2 and cfg.eval.overlap is False
    assert cfg.rollout.prune_finished is False and cfg.learner.length_buckets is False
    for bad in ("rollout.prune_finished=maybe", "learner.length_buckets=2"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])
    assert load_config(None, []).expert.added_latency_s == 0.0 and load_config(None, []).eval.overlap is True
    for bad in ("expert.added_latency_s=-1", "expert.added_latency_s=10"):  # timeout_s is 10
        with pytest.raises(ConfigError, match=r"expert\.added_latency_s"):
            load_config(None, [bad])


def test_breakdown_table_prints_a_run_without_evaluation():
    """benchmarks/breakdown.py on a run with eval.enabled=false (heldout_accuracy_end null)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "breakdown.py"
    spec = importlib.util.spec_from_file_location("breakdown_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runs = [{"generated_samples": 64, "loop_seconds": 2.0, "heldout_accuracy_end": None, "breakdown": {}},
            {"generated_samples": 64, "loop_seconds": 4.0, "heldout_accuracy_end": 0.25, "breakdown": {}}]
    text = mod.table(runs, ["off", "on"])
    last = text.splitlines()[-1]
    assert last.startswith("held-out accuracy end") and last.split()[-2:] == ["-", "0.250"], last
