"""eapo_ray.reaper: once the driver is gone (here SIGKILLed), the processes it had started that
still run are killed; tests/system/test_faults_in_runs.py checks the same on a real launch (Ray's
dashboard and runtime-env agents outlived a SIGKILLed driver before the reaper)."""
import os
import signal
import subprocess
import sys
import time

import psutil

DRIVER = """
import subprocess, sys, time
from eapo_ray import ray_runtime
ray_runtime.start_reaper()
# a grandchild in its own session, as Ray's agents are: a signal to the driver's group misses it
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_processes_of_a_killed_driver_are_reaped():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    child = psutil.Process(int(driver.stdout.readline()))
    try:
        time.sleep(1.5)  # the reaper has noted the child (it looks every second)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        deadline = time.time() + 15
        while time.time() < deadline and child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.2)
        gone = not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
        assert gone, "the driver's child outlived it"
    finally:
        if child.is_running():
            child.kill()


def test_the_reaper_leaves_when_the_driver_exits_and_spares_what_already_exited():
    """A normal exit: the reaper finds nothing left to kill and exits itself."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    from eapo_ray import reaper

    t = time.time()
    assert reaper.watch(p.pid, poll_s=0.1, grace_s=0.1) == 0
    assert time.time() - t < 10
    p.wait()
