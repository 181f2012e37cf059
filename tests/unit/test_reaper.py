"""eapo_ray.reaper: once the driver is gone (here SIGKILLed), the processes it had started that
still run are killed; tests/system/test_faults_in_runs.py checks the same on a real launch (Ray's
dashboard and runtime-env agents outlived a SIGKILLed driver before the reaper)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from eapo_ray import reaper

ROOT = Path(__file__).resolve().parents[2]

DRIVER = """
import subprocess, sys, time
from eapo_ray import ray_runtime
ray_runtime.start_reaper("--ready", sys.argv[1])
# a grandchild in its own session, as Ray's agents are: a signal to the driver's group misses it
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def _wait_gone(p: psutil.Process, timeout: float = 15.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if reaper._gone(p):
            return True
        time.sleep(0.2)
    return False


def test_processes_of_a_killed_driver_are_reaped(tmp_path):
    ready = tmp_path / "ready"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(ready)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = psutil.Process(int(driver.stdout.readline()))
    try:
        deadline = time.time() + 60
        while not ready.exists():  # the reaper has looked once (the child may not be born yet)...
            assert time.time() < deadline, "the reaper never started"
            time.sleep(0.1)
        time.sleep(2.5)  # ...and again after the child was (it looks every second)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        assert _wait_gone(child), "the driver's child outlived it"
    finally:
        if not reaper._gone(child):
            child.kill()


SHORT_DRIVER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])  # exits on its own
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(2)
"""


def test_a_driver_that_exits_leaves_only_its_leftovers_killed():
    """The reaper of a driver that exits normally kills what is left (the long child) and nothing
    that had already exited (the short child: not counted, no error)."""
    driver = subprocess.Popen([sys.executable, "-c", SHORT_DRIVER], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(driver.stdout.readline()))
    try:
        t = time.time()
        killed = reaper.watch(driver.pid, psutil.Process(driver.pid).create_time(), poll_s=0.1, grace_s=0.5)
        assert killed == 1 and time.time() - t < 30
        assert _wait_gone(child, 5)
    finally:
        driver.wait()
        if not reaper._gone(child):
            child.kill()


def test_a_pid_that_is_not_the_drivers_any_more_is_not_watched():
    p = psutil.Process()
    assert reaper.watch(p.pid, p.create_time() - 100.0, poll_s=0.1) == 0  # returns at once, kills nothing
