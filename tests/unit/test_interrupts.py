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
