"""Launches for the system tests: `python -m eapo_ray.launch` in a subprocess (its own local
Ray cluster unless told to join one), found and signalled by PID."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
# expert.max_replicas=1: a second replica (its start-up ~7 s of CPU on 2 cores) only where a test asks for it;
# eval.enabled=false: no evaluator actor (~6 s of CPU to start) where a test does not look at held-out
# accuracy (those launches add eval.enabled=true, evaluating at the start and the end: eval.every=0)
FAST = ["eval.every=0", "data.num_heldout=24", "rollout.prompts_per_batch=4", "buffer.capacity=2",
        "expert.max_replicas=1", "eval.enabled=false"]


class Launch:
    """A launch in its own session (so a Ctrl-C to its process group does not reach pytest)."""

    def __init__(self, tmp_path: Path, name: str, *overrides: str, ray_address: str = "", env: dict | None = None,
                 out_name: str = ""):
        """`ray_address`: join that cluster (RAY_ADDRESS) instead of starting a private one; `env`:
        extra environment variables; `out_name`: the console file (default <name>.out)."""
        self.run_dir, self.out_path = tmp_path / name, tmp_path / (out_name or f"{name}.out")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (
            {"RAY_ADDRESS": ray_address} if ray_address else {}) | (env or {})
        # a free dashboard port of its own: two launches starting at once (pytest-xdist) can race for 8265
        cmd = [sys.executable, "-m", "eapo_ray.launch", f"run_root={tmp_path}", f"run_name={name}", *FAST,
               f"dashboard_port={free_port()}", *overrides]
        with self.out_path.open("w") as out:
            self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    @property
    def log(self) -> str:
        return self.out_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 300) -> None:
        t0 = time.time()
        while not re.search(pattern, self.log, re.M):
            assert self.p.poll() is None, f"launch exited ({self.p.returncode}) before {pattern!r}:\n{self.log[-4000:]}"
            assert time.time() - t0 < timeout, f"no {pattern!r} within {timeout}s:\n{self.log[-4000:]}"
            time.sleep(0.5)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def find(self, title: str) -> psutil.Process:
        """The launch's process whose title (Ray sets ray::<Actor>...) contains `title`."""
        for proc in self.descendants():
            try:
                if title in " ".join(proc.cmdline()):
                    return proc
            except psutil.Error:
                continue
        raise AssertionError(f"no process {title!r} under the launch: "
                             f"{[' '.join(p.cmdline())[:60] for p in self.descendants()]}")

    def finish(self, timeout: float = 600) -> int:
        try:
            return self.p.wait(timeout=timeout)
        finally:
            self.kill_all()

    def kill_all(self) -> None:
        """Test teardown: nothing of this launch survives a failed test."""
        procs = self.descendants()
        if self.p.poll() is None:
            self.p.kill()
        kill(procs)

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())


def interrupt_and_check_nothing_is_left(run: Launch, how: str) -> None:
    """Send Ctrl-C to the launch's process group ("sigint-group") or SIGTERM to the driver
    ("sigterm"); it must exit 130 naming the resume command, with no teardown error, and
    every process of the run (listed just before) must be gone within 30 s."""
    procs = run.descendants()
    assert any("RolloutWorker" in cmdline(p) for p in procs)
    t0 = time.time()
    if how == "sigint-group":
        os.killpg(run.p.pid, signal.SIGINT)
    else:
        run.p.send_signal(signal.SIGTERM)
    rc = run.p.wait(timeout=120)
    took = time.time() - t0
    log = run.log
    assert rc == 130, log[-4000:]
    assert f"resume={run.run_dir}" in log and "teardown of" not in log, log[-4000:]
    left = still_alive_after(procs, 30)
    assert not left, [(p.pid, cmdline(p)[:80]) for p in left]
    print(f"{how}: exit {rc} after {took:.1f}s, {len(procs)} processes of the run all gone")


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A free TCP port for a launch's dashboard or metrics endpoint, drawn at random from
    [low, high): above Ray's worker ports (10002-19999) and below Linux's ephemeral range (from
    32768). A port the kernel hands out (bind to 0) is an ephemeral one, which any outgoing
    connection (Ray opens many) can take before the launch binds it: a 3-worker suite run lost a
    launch that way ("Failed to bind to 127.0.0.1:45775 because it's already occupied")."""
    import random
    import socket

    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def still_alive_after(procs: list[psutil.Process], timeout: float, poll_s: float = 0.5) -> list[psutil.Process]:
    """Wait up to `timeout` seconds for every process of `procs` to exit; returns those still alive."""
    deadline = time.time() + timeout
    while True:
        left = [p for p in procs if alive(p)]
        if not left or time.time() >= deadline:
            return left
        time.sleep(poll_s)


def kill(procs: list[psutil.Process]) -> None:
    """SIGKILL each, ignoring those already gone."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie; a process that exits while we look is not alive."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # exited (or a zombie) since it was listed
        return ""


