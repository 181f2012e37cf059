"""RolloutFleet.wait while an actor is restarting (no Ray cluster: the fleet's ray.wait is
replaced by one that says the restart ping has not answered yet)."""
import time

import eapo_ray.rollout.fleet as F


def test_wait_sleeps_while_the_only_actor_restarts_instead_of_spinning(monkeypatch):
    """Cold review: with every live actor waiting for its restart and nothing in flight, the old
    wait() slept min(not_before - now) < 0, i.e. not at all, so the driver spun (thousands of
    buffer round-trips a second) until the actor came back. It now sleeps the 1 s ping cadence."""
    calls = []
    monkeypatch.setattr(F.ray, "wait", lambda refs, timeout=None, **k: (calls.append(1), ([], list(refs)))[1])
    fleet = F.RolloutFleet([object()], restart_timeout_s=60.0)
    fleet.recovering[0] = (object(), time.time() + 60.0)  # its ping has not answered
    t0 = time.time()
    n = 0
    while time.time() - t0 < 1.5:
        assert fleet.wait(timeout_s=5.0) == []
        n += 1
    assert n <= 3, f"wait() returned {n} times in 1.5 s: the driver would spin"
