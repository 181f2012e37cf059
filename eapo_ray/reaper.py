"""The local cluster's reaper: a small watchdog process (psutil only) the launcher starts when it
starts a private local Ray cluster. It notes the driver's descendants every `poll_s` seconds and,
once the driver is gone (a normal exit, Ctrl-C, or kill -9), kills those still running after
`grace_s`. Without it, measured on Ray 2.60, a SIGKILLed driver left Ray's dashboard agent and
runtime-env agent running (everything else of the cluster exits with the driver).

    python -m eapo_ray.reaper <driver pid> <driver create_time> [--ready FILE]
    (started by eapo_ray.ray_runtime.start_reaper; --ready: touched after the first look)

Processes are held as psutil.Process objects, which know their creation time: a pid the system
reused for an unrelated process is never killed, and a driver pid that is not the driver's
(another process with that pid) is not watched."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:  # e.g. reaped between the two questions
        return True


def watch(driver_pid: int, driver_created: float | None = None, poll_s: float = 1.0, grace_s: float = 1.0,
          ready: str = "") -> int:
    """Returns how many leftover processes it killed."""
    me = os.getpid()
    try:
        driver = psutil.Process(driver_pid)
        # creation times can differ by ~1 s between two reads (psutil derives them from the boot
        # time, which it rereads); a pid reused within 2 s is not a practical concern
        if driver_created is not None and abs(driver.create_time() - driver_created) > 2.0:
            return 0  # that pid is another process now: the driver is long gone, nothing is ours
    except psutil.Error:
        return 0
    known: set[psutil.Process] = set()  # hashed by (pid, creation time)
    while True:
        try:
            known.update(p for p in driver.children(recursive=True) if p.pid != me)
        except psutil.Error:  # the driver went while we looked
            pass
        if ready:
            Path(ready).touch()
            ready = ""
        if _gone(driver):
            break
        time.sleep(poll_s)
    time.sleep(grace_s)  # what exits by itself (Ray's own shutdown) is not killed
    killed = 0
    for p in known:
        if not _gone(p):
            try:
                p.kill()  # psutil refuses if the pid now belongs to another process
                killed += 1
            except psutil.Error:
                pass
    return killed


if __name__ == "__main__":
    argv = sys.argv[1:]
    ready = argv[argv.index("--ready") + 1] if "--ready" in argv else ""
    watch(int(argv[0]), float(argv[1]), ready=ready)
