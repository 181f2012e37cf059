"""Operations: the accounting that closes and the Grafana dashboard over the run's metrics.
(A launch's console, its metrics on Ray's Prometheus endpoint and its accounting block:
test_e2e's default run.)"""
import json
from pathlib import Path

import pytest

from eapo_ray import metrics
from eapo_ray.accounting import Accounting, AccountingError, check

ROOT = Path(__file__).resolve().parents[2]


def _stats(worker, samples, kept):
    return {"worker": worker, "samples": samples, "kept_samples": kept}


def test_accounting_closes_over_driver_buffer_and_learner_counts():
    a = Accounting()
    for kept in (32, 0, 24, 32, 16):  # the 0: dynamic sampling dropped every group (never produced)
        a.rollout(_stats(0, 32, kept))
    a.step([32], lost_batches=0, learner_samples=32)
    a.step([24], lost_batches=1, learner_samples=0)  # the learner could not read it
    buffer = {"dropped_stale": 1, "dropped_samples": 32, "size": 0, "size_samples": 0}
    block = a.close(buffer, pending=[16], in_flight=2)
    assert block["closes"] and block["batches"] == {"produced": 4, "trained": 1, "rolled_back": 0, "dropped_stale": 1,
                                                   "dropped_discarded": 0, "buffered_at_end": 1, "lost": 1}
    assert block["samples"] == {"produced": 104, "trained": 32, "rolled_back": 0, "dropped_stale": 32,
                                "dropped_discarded": 0, "buffered_at_end": 16, "lost": 24}
    assert block["filtered_samples"] == 0 + 32 + 8 + 0 + 16 and block["in_flight_at_end"] == 2
    check(block)

    # a batch that vanished between the driver and the learner (nobody counted it) is caught
    bad = a.close(buffer, pending=[], in_flight=0)
    assert not bad["closes"] and "produced 4 != trained 1" in bad["error"]
    with pytest.raises(AccountingError, match="does not close in batches"):
        check(bad)


def test_accounting_after_a_learner_rebuild_counts_thrown_away_training_as_rolled_back():
    """Steps 1-3 trained, the learners die and come back from the step-1 checkpoint: the training of
    steps 2 and 3 is gone (rolled_back, not trained); a batch from the discarded version 3 that
    arrives afterwards is dropped (dropped_discarded); the redone steps 2-3 count as trained."""
    a = Accounting()
    for _ in range(6):
        a.rollout(_stats(0, 32, 32))
    for v in (1, 2, 3):
        a.step([32], lost_batches=0, learner_samples=32, version=v)
    a.rollback(1)
    a.discarded(32)  # made by version 3, which no longer exists
    for v in (2, 3):
        a.step([32], lost_batches=0, learner_samples=32, version=v)
    block = a.close({"dropped_stale": 0, "dropped_samples": 0, "size": 0, "size_samples": 0}, pending=[], in_flight=0)
    assert block["batches"] == {"produced": 6, "trained": 3, "rolled_back": 2, "dropped_stale": 0,
                                "dropped_discarded": 1, "buffered_at_end": 0, "lost": 0}
    assert block["closes"] and block["samples"]["trained"] == 96 and block["samples"]["rolled_back"] == 64


def test_grafana_dashboard_is_generated_and_charts_every_metric():
    shipped = json.loads((ROOT / "cluster" / "grafana_eapo.json").read_text())
    assert shipped == metrics.grafana_dashboard(), "regenerate: python -m eapo_ray.metrics grafana"
    exprs = " ".join(t["expr"] for p in shipped["panels"] for t in p["targets"])
    for name, (kind, *_rest) in metrics.SPECS.items():
        assert f"ray_{name}{'_bucket' if kind == 'histogram' else ''}{{" in exprs, name
    assert len({p["id"] for p in shipped["panels"]}) == len(shipped["panels"]) == len(metrics.SPECS)


def test_batches_from_policies_a_rebuild_discarded_are_recognised():
    """A call submitted while learner group g trained (its tag) made a batch at version v: it comes
    from a discarded policy when a later rebuild went back to a checkpoint older than v."""
    from eapo_ray.driver.recovery import discarded_policy
    from eapo_ray.driver.system import System

    s = System()
    assert not discarded_policy(s, 7, 0)  # no rebuild yet
    s.rollbacks = [4]  # rebuild 1 went back to version 4
    assert discarded_policy(s, 5, 0) and not discarded_policy(s, 4, 0)  # v4's weights are the checkpoint's
    assert not discarded_policy(s, 5, 1)  # submitted after the rebuild: new weights
    s.rollbacks = [4, 2]  # rebuild 2 went back further, to 2
    assert discarded_policy(s, 3, 0) and discarded_policy(s, 3, 1) and not discarded_policy(s, 3, 2)
