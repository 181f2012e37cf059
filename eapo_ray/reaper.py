"""The local cluster's reaper: a small watchdog process (psutil only) the launcher starts when it
starts a private local Ray cluster. It notes the driver's descendants every `poll_s` seconds and,
once the driver is gone (a normal exit, Ctrl-C, or kill -9), kills those still running after
`grace_s`. Without it, measured on Ray 2.60, a SIGKILLed driver left Ray's dashboard agent and
runtime-env agent running (everything else of the cluster exits with the driver).

    python -m eapo_ray.reaper <driver pid>          (started by eapo_ray.ray_runtime.start_reaper)

Processes are held as psutil.Process objects, which know their creation time: a pid the system
reused for an unrelated process is never killed."""
from __future__ import annotations

import os
import sys
import time

import psutil


def watch(driver_pid: int, poll_s: float = 1.0, grace_s: float = 1.0) -> int:
    """Returns how many leftover processes it killed."""
    me = os.getpid()
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return 0
    known: dict[int, psutil.Process] = {}
    while True:
        try:
            for p in driver.children(recursive=True):
                if p.pid != me:
                    known.setdefault(p.pid, p)
        except psutil.Error:  # the driver went while we looked
            pass
        if not driver.is_running() or driver.status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(poll_s)
    time.sleep(grace_s)  # what exits by itself (Ray's own shutdown) is not killed
    killed = 0
    for p in known.values():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
                killed += 1
        except psutil.Error:
            pass
    return killed


if __name__ == "__main__":
    watch(int(sys.argv[1]))
