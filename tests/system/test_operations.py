"""Operations: the accounting that closes, a readable console, the run's metrics on Ray's
Prometheus endpoint, and the Grafana dashboard over them."""
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from eapo_ray import metrics
from eapo_ray.accounting import Accounting, AccountingError, check

ROOT = Path(__file__).resolve().parents[2]
FAST = ["eval.every=0", "data.num_heldout=24", "rollout.prompts_per_batch=4", "buffer.capacity=2"]


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except (OSError, http.client.HTTPException):  # timeouts, a cut connection
        return ""


@pytest.mark.slow
def test_launch_console_metrics_and_accounting(tmp_path):
    """One tiny launch with the Serve expert: Ray's Prometheus endpoint shows every EAPO metric,
    tagged with the run name, while it runs; the console has no Serve access or INFO lines, the
    dashboard URL and run directory once at the top and one progress line per step; summary.json
    has an accounting block that closes with nothing lost, stale batches dropped included."""
    port, name = _free_port(), "ops"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_metrics_report_interval_ms"] = "1000"  # export every second (default 10 s) for a short run
    cmd = [sys.executable, "-m", "eapo_ray.launch", f"run_root={tmp_path}", f"run_name={name}", "steps=6", *FAST,
           f"metrics_export_port={port}", "buffer.max_staleness=0"]  # batches made during a step go stale
    out_path = tmp_path / "out.txt"
    with out_path.open("w") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    wanted = set(metrics.SPECS)
    seen: set = set()
    try:
        while p.poll() is None and seen != wanted:
            text = _scrape(port)
            # accumulate: a scrape can time out on a loaded machine, and the run's metrics go when it ends
            seen |= {n for n in wanted if re.search(rf'^ray_{n}(_bucket|_count)?{{[^}}]*run="{name}"', text, re.M)}
            time.sleep(1)
        p.wait(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    log = out_path.read_text()
    assert p.returncode == 0, log[-5000:]
    assert seen == wanted, f"missing on the Prometheus endpoint: {sorted(wanted - seen)}"

    lines = log.splitlines()
    assert "CALL __call__" not in log and "Started Serve" not in log and "Loading weights" not in log, log[:3000]
    assert not [ln for ln in lines if re.match(r"^(\x1b\[\d+m)?\(\w+ pid=\d+", ln) and " INFO " in ln], log[:3000]
    top = lines[:4]
    assert any(ln.startswith(f"[eapo] run directory: {tmp_path / name}") for ln in top), top
    assert any(re.match(r"\[eapo\] dashboard: http://127\.0\.0\.1:\d+", ln) for ln in top), top
    progress = [ln for ln in lines if re.match(r"\[eapo\] step \d+/6 .* eta \d+m\d\ds$", ln)]
    assert [int(re.search(r"step (\d+)/", ln).group(1)) for ln in progress] == [1, 2, 3, 4, 5, 6]

    s = json.loads((tmp_path / name / "summary.json").read_text())
    a = s["accounting"]
    assert a["closes"] and a["batches"]["lost"] == 0 and a["samples"]["lost"] == 0
    assert a["batches"]["trained"] == 6 and a["samples"]["trained"] == s["samples"]
    assert a["batches"]["dropped_stale"] >= 1 and a["samples"]["dropped_stale"] >= 1  # every term in play
    for unit in ("batches", "samples"):
        c = a[unit]
        assert c["produced"] == sum(v for k, v in c.items() if k != "produced")
    assert "[eapo] accounting: produced" in log


def test_batches_from_policies_a_rebuild_discarded_are_recognised():
    """A call submitted while learner group g trained (its tag) made a batch at version v: it comes
    from a discarded policy when a later rebuild went back to a checkpoint older than v."""
    from eapo_ray.launch import System, discarded_policy

    s = System()
    assert not discarded_policy(s, 7, 0)  # no rebuild yet
    s.rollbacks = [4]  # rebuild 1 went back to version 4
    assert discarded_policy(s, 5, 0) and not discarded_policy(s, 4, 0)  # v4's weights are the checkpoint's
    assert not discarded_policy(s, 5, 1)  # submitted after the rebuild: new weights
    s.rollbacks = [4, 2]  # rebuild 2 went back further, to 2
    assert discarded_policy(s, 3, 0) and discarded_policy(s, 3, 1) and not discarded_policy(s, 3, 2)
