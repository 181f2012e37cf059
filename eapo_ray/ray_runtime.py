"""Ray start-up, the console's noise level and the run's metric sinks (JSONL + TensorBoard;
the dashboard's metrics are eapo_ray.metrics), shared by the launcher and the evaluation CLI."""
from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

from eapo_ray.config import RunConfig

# no weight-loading bars; EAPO_QUIET: actors keep Serve's client INFO lines off the console
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "EAPO_QUIET": "1",
             "VLLM_LOGGING_LEVEL": "WARNING"}  # vLLM engines print ~40 INFO lines each at start-up and shutdown


def quiet_console(verbose: bool) -> None:
    """The driver's own loggers: Ray's and Serve's INFO lines (cluster start, Serve start and
    app deploys) only with --verbose. Warnings and errors always show."""
    import logging

    if verbose:
        return
    import ray.serve  # noqa: F401 -- its import sets its logger to INFO: quieten it after

    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def init_ray(cfg: RunConfig, required_cpus: float, reaper: bool = False) -> str:
    """Start (or join) Ray; returns the dashboard URL ("" when there is none). `reaper`: when this
    starts a private local cluster, also start eapo_ray.reaper for this process (the launcher's
    driver: every process under it is the run's)."""
    import logging

    import ray

    if ray.is_initialized():  # e.g. several runs or evaluations from one process
        return ""
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                        **({} if cfg.verbose else QUIET_ENV)}}
    # Every worker's Python logging at WARNING unless --verbose (the log files keep what is printed)
    quiet = {} if cfg.verbose else {"logging_level": logging.WARNING,
                                    "logging_config": ray.LoggingConfig(log_level="WARNING")}
    if cfg.ray_address == "auto-local" and not os.environ.get("RAY_ADDRESS"):
        # A private local cluster; never attach to a stray one on this machine.
        kwargs = dict(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(required_cpus)),
                      runtime_env=env, include_dashboard=True, dashboard_host=cfg.dashboard_host, log_to_driver=True,
                      **({"_metrics_export_port": cfg.metrics_export_port} if cfg.metrics_export_port else {}),
                      **({"dashboard_port": cfg.dashboard_port} if cfg.dashboard_port else {}), **quiet)
        try:
            ctx = ray.init(**kwargs)
        except Exception as e:  # noqa: BLE001 -- Ray raises a bare Exception for this one
            # A busy machine can miss the raylet's fixed 30 s registration deadline; try once more.
            if "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            ctx = ray.init(**kwargs)
        if reaper:
            start_reaper()  # nothing of this cluster outlives the driver, even a kill -9 of it
    else:
        ctx = ray.init(address=None if cfg.ray_address == "auto-local" else cfg.ray_address, runtime_env=env, **quiet)
    install_interrupt_handlers()  # after ray.init, which installs its own (aborting) SIGTERM handler
    url = getattr(ctx, "dashboard_url", "") or ""
    return f"http://{url}" if url and not url.startswith("http") else url


def start_reaper(*args: str):
    """Start eapo_ray.reaper for this (driver) process: in its own session, so a Ctrl-C to the
    driver's process group leaves it watching until the teardown is over. `args`: more of its
    command line (e.g. --ready FILE)."""
    import subprocess
    import sys

    import psutil

    me = psutil.Process()
    return subprocess.Popen([sys.executable, "-m", "eapo_ray.reaper", str(me.pid), repr(me.create_time()), *args],
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


class MetricsLog:
    """JSONL + TensorBoard in the run directory, and the trackers of config section `tracking`
    (eapo_ray/tracking.py: W&B, MLflow; the same rows). The Ray dashboard's metrics: eapo_ray.metrics."""

    def __init__(self, run_dir: Path, purge_step: int | None = None, cfg: RunConfig | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.trackers = None
        if cfg is not None and (cfg.tracking.wandb or cfg.tracking.mlflow):
            from eapo_ray.config import to_dict
            from eapo_ray.tracking import Trackers

            self.trackers = Trackers(cfg.tracking, cfg.run_name or run_dir.name, run_dir, to_dict(cfg))
        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        # purge_step: on resume, TensorBoard hides events at or after it that an earlier attempt wrote
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, row: dict):
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.jsonl.flush()
        for k, v in row.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        if self.trackers is not None:
            self.trackers.log(step, row)

    def close(self, failed: bool | None = None):
        """`failed`: how trackers record the run's end (None: failed if an exception is propagating)."""
        import sys

        self.jsonl.close()
        self.tb.close()
        if self.trackers is not None:
            self.trackers.close(failed=sys.exc_info()[0] is not None if failed is None else failed)
            self.trackers = None


_INTERRUPTED = threading.Event()  # a SIGINT or SIGTERM reached the driver (see install_interrupt_handlers)


def install_interrupt_handlers() -> None:
    """Ctrl-C (SIGINT) and SIGTERM (a scheduler, `kill`) both raise KeyboardInterrupt: the run's
    actors, learners and Serve app are torn down in `run`'s finally, and Ray's exit hook stops a
    local cluster. The handler also records the signal, because a KeyboardInterrupt raised while
    the main thread is inside a library's callback can be swallowed there (a test run once trained
    all 100 steps after a Ctrl-C at step 2): the launcher calls `raise_if_interrupted` at every
    training step, every poll for data and every poll for the expert at start-up, so the signal
    still stops the run; long waits (an evaluation, Serve's status) go through `wait_get` /
    `bounded_call`, which check for it every half second."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    _INTERRUPTED.clear()

    def handler(signum, frame):
        _INTERRUPTED.set()
        if signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # teardown runs once
        raise KeyboardInterrupt(f"signal {signum}")

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job started with SIGINT ignored keeps it so
        signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a SIGINT/SIGTERM arrived (whether or not its own raise got through)."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt("interrupted by a signal")


def wait_get(ref, timeout_s: float, slice_s: float = 0.5, fetch: bool = True, wait=None, get=None):
    """`ray.get(ref, timeout=timeout_s)` in slices of `slice_s` seconds with `raise_if_interrupted`
    between them, so a Ctrl-C whose KeyboardInterrupt a library swallowed does not wait out a long
    wait (an evaluation may take eval.timeout_s). Raises ray's GetTimeoutError past `timeout_s`.
    `fetch=False`: only wait until it is ready (returns None). `wait` / `get`: ray.wait / ray.get."""
    import ray

    wait, get = wait or ray.wait, get or ray.get
    deadline = time.monotonic() + timeout_s
    while True:
        raise_if_interrupted()
        left = deadline - time.monotonic()
        ready, _ = wait([ref], num_returns=1, timeout=max(0.0, min(slice_s, left)))
        if ready:
            return get(ref, timeout=max(1.0, deadline - time.monotonic())) if fetch else None
        if left <= 0:
            raise ray.exceptions.GetTimeoutError(f"not ready after {timeout_s:g} s")


def bounded_call(fn, timeout_s: float, what: str, slice_s: float = 0.5, check_interrupt: bool = True):
    """fn() for a library call that has no timeout of its own (serve.status() and serve.delete()
    are ray.gets on Serve's controller, unbounded), waited for at most `timeout_s` seconds with
    `raise_if_interrupted` every `slice_s` (unless `check_interrupt` is false: the teardown after
    a Ctrl-C). Raises TimeoutError naming `what`. A call that never returns is left in its daemon
    thread (it does not hold up the process's exit)."""
    box: dict = {}
    done = threading.Event()

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name=f"bounded:{what}", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not done.wait(max(0.0, min(slice_s, deadline - time.monotonic()))):
        if check_interrupt:
            raise_if_interrupted()
        if time.monotonic() >= deadline and not done.is_set():
            raise TimeoutError(f"{what} did not return within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]
