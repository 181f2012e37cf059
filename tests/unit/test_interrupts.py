"""Ctrl-C and SIGTERM in the driver: the handler raises KeyboardInterrupt and also records the
signal, so a KeyboardInterrupt that a library swallows (raised inside its callback) still stops
the training loop at its next step or wait. (A full-suite run of the Ctrl-C test once trained all 100
steps after a SIGINT at step 2, with nothing printed.)"""
import os
import signal
import time

import pytest

from eapo_ray import ray_runtime


@pytest.fixture
def handlers():
    held = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    ray_runtime.install_interrupt_handlers()
    yield
    for sig, h in held.items():
        signal.signal(sig, h)
    ray_runtime._INTERRUPTED.clear()


def _swallowed(sig: int) -> bool:
    """Deliver `sig` to this process inside a library-like `except KeyboardInterrupt: pass`."""
    try:
        os.kill(os.getpid(), sig)
        for _ in range(100):  # the handler runs at the next bytecode boundary of the main thread
            time.sleep(0.01)
    except KeyboardInterrupt:
        return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_swallowed_interrupt_still_stops_the_loop(handlers, sig):
    ray_runtime.raise_if_interrupted()  # nothing yet
    assert _swallowed(sig)
    with pytest.raises(KeyboardInterrupt):
        ray_runtime.raise_if_interrupted()


def test_sigterm_is_ignored_after_the_first(handlers):
    assert _swallowed(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # the teardown runs once
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # a second Ctrl-C still raises


def _never_ready(refs, num_returns=1, timeout=None):
    time.sleep(timeout or 0)
    return [], list(refs)


def test_a_long_wait_is_sliced_so_a_swallowed_interrupt_ends_it(handlers):
    """The wait for an evaluation (up to eval.timeout_s, an hour by default) used to be one
    ray.get: a swallowed Ctrl-C waited it out. wait_get checks every slice: the interrupt is
    recorded 0.3 s into the wait (as a swallowed one is) and ends it."""
    import threading

    threading.Timer(0.3, ray_runtime._INTERRUPTED.set).start()
    t = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ray_runtime.wait_get("ref", 3600, slice_s=0.1, wait=_never_ready, get=lambda r, timeout=None: r)
    assert 0.25 < time.monotonic() - t < 1.5


def test_bounded_call_ends_at_a_recorded_interrupt_unless_told_not_to(handlers):
    import threading

    hung = threading.Event()
    threading.Timer(0.3, ray_runtime._INTERRUPTED.set).start()
    t = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ray_runtime.bounded_call(hung.wait, 3600, "serve.status()", slice_s=0.1)
    assert time.monotonic() - t < 1.5
    # the teardown after a Ctrl-C (check_interrupt=False): still bounded, but by its timeout only
    with pytest.raises(TimeoutError):
        ray_runtime.bounded_call(hung.wait, 0.5, "serve.delete", slice_s=0.1, check_interrupt=False)
    assert ray_runtime.bounded_call(lambda: 3, 5, "three", check_interrupt=False) == 3
    hung.set()


def test_wait_get_returns_or_times_out():
    import ray

    assert ray_runtime.wait_get("ref", 5, wait=lambda refs, **kw: (refs, []), get=lambda r, timeout: r + "!") == "ref!"
    t = time.monotonic()
    with pytest.raises(ray.exceptions.GetTimeoutError):
        ray_runtime.wait_get("ref", 0.3, slice_s=0.1, wait=_never_ready, get=lambda r, timeout: r)
    assert 0.25 < time.monotonic() - t < 2.0


def test_bounded_call_returns_raises_or_gives_up():
    import threading

    assert ray_runtime.bounded_call(lambda: 7, 5, "seven") == 7
    with pytest.raises(ZeroDivisionError):
        ray_runtime.bounded_call(lambda: 1 / 0, 5, "a division")
    hung = threading.Event()
    t = time.monotonic()
    with pytest.raises(TimeoutError, match="serve.status"):
        ray_runtime.bounded_call(hung.wait, 0.3, "serve.status()", slice_s=0.1)
    assert time.monotonic() - t < 2.0
    hung.set()


def test_a_hung_serve_controller_fails_the_expert_start_within_its_timeout(monkeypatch):
    """serve.status() (a ray.get on Serve's controller, no timeout of its own) never returns:
    wait_expert_running raises ExpertStartError after expert.start_timeout_s instead of hanging
    (the old code hung here; the thread and its join keep this test from hanging with it)."""
    import threading

    from ray import serve

    from eapo_ray.driver import system

    hung = threading.Event()
    monkeypatch.setattr(serve, "status", lambda: hung.wait())
    out = {}

    def target():
        try:
            system.wait_expert_running("x-expert", timeout_s=1.0)
        except Exception as e:  # noqa: BLE001
            out["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(15)
    hung.set()
    assert not th.is_alive(), "wait_expert_running hung on serve.status()"
    assert isinstance(out.get("error"), system.ExpertStartError) and "did not answer" in str(out["error"]), out
