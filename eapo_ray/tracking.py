"""Experiment tracking: the rows the driver writes to metrics.jsonl, also sent to Weights & Biases
and/or MLflow (config section `tracking`; both off by default, each an optional extra:
`pip install 'eapo_ray[wandb]'`, `'eapo_ray[mlflow]'`).

What goes: the numeric fields of each row (bools as 0/1; strings, None and nested values are
left to metrics.jsonl), at the row's `step`: MLflow `log_metrics(row, step=step)`; W&B one history
row per metrics row with `step` as its x-axis (`define_metric("*", step_metric="step")`, so a
resumed run's rows, which restart at its checkpoint's step, are kept). The run's config goes as
W&B config / MLflow params. A resumed launch is a new tracking run with the same name.
Credentials come from the environment (WANDB_API_KEY, MLFLOW_TRACKING_*), never from the config.
A tracker that fails to start stops the launch (ConfigError naming its key); one that fails
later is warned about once and dropped for the rest of the run, and finishing each is bounded
(FINISH_TIMEOUT_S): a tracker never ends or hangs a run.
"""
from __future__ import annotations

import sys
from pathlib import Path

from eapo_ray.config import ConfigError, TrackingConfig

FINISH_TIMEOUT_S = 30.0  # each tracker's finish / end_run at most this long


def numeric(row: dict) -> dict[str, float]:
    """The fields of a metrics row that trackers take: ints, floats and bools (as 0/1)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}


def _need(module: str, key: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"config key '{key}': the {module} package is not installed "
                          f"(pip install 'eapo_ray[{module}]')") from None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Trackers:
    """The configured trackers of one launch; `log` and `close` as MetricsLog's."""

    def __init__(self, cfg: TrackingConfig, run_name: str, run_dir: Path, config: dict):
        self.wandb_run = self.mlflow = None
        self.off: set[str] = set()  # trackers whose log call failed: no more rows, still closed at the end
        if cfg.wandb:
            wandb = _need("wandb", "tracking.wandb")
            wandb_dir = Path(cfg.wandb_dir).expanduser() if cfg.wandb_dir else run_dir
            wandb_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.wandb_run = wandb.init(
                    project=cfg.project, name=run_name, dir=str(wandb_dir), config=config, reinit="create_new",
                    settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False))
            except Exception as e:  # noqa: BLE001 -- e.g. no API key online: name the key
                raise ConfigError(f"config key 'tracking.wandb': W&B could not start a run ({e}); log in "
                                  "(WANDB_API_KEY) or set WANDB_MODE=offline") from None
            self.wandb_run.define_metric("step")
            self.wandb_run.define_metric("*", step_metric="step")
            print(f"[eapo] W&B run {self.wandb_run.name} ({self.wandb_run.settings.mode}): "
                  f"{self.wandb_run.url or self.wandb_run.dir}", flush=True)
        if cfg.mlflow:
            mlflow = _need("mlflow", "tracking.mlflow")
            if cfg.mlflow_uri:
                mlflow.set_tracking_uri(cfg.mlflow_uri)
            try:
                mlflow.set_experiment(cfg.project)
                run = mlflow.start_run(run_name=run_name, tags={"eapo.run_dir": str(run_dir)})
            except Exception as e:  # noqa: BLE001 -- MlflowException, connection errors: name the key
                raise ConfigError(f"config key 'tracking.mlflow': MLflow could not start a run at "
                                  f"{mlflow.get_tracking_uri()}: {e}") from None
            self.mlflow = mlflow
            params = {k: ("" if v is None else str(v))[:500] for k, v in _flat(config).items()}
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params(dict(items[i:i + 100]))
            print(f"[eapo] MLflow run {run.info.run_id} in experiment {cfg.project!r} at "
                  f"{mlflow.get_tracking_uri()}", flush=True)

    def log(self, step: int, row: dict) -> None:
        """Each tracker's log call; one that raises (a network error, a full disk, a rejected
        metric name) is warned about once on stderr and left out for the rest of the run: the
        rows still go to metrics.jsonl and the other tracker."""
        values = numeric(row)
        if not values:
            return
        if self.wandb_run is not None and "wandb_run" not in self.off:
            self._call("wandb_run", "W&B", lambda: self.wandb_run.log({"step": step, **values}))
        if self.mlflow is not None and "mlflow" not in self.off:
            self._call("mlflow", "MLflow", lambda: self.mlflow.log_metrics(values, step=step))

    def _call(self, attr: str, name: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- any tracker failure: that tracker is dropped, the run goes on
            self.off.add(attr)
            print(f"[eapo] WARNING: {name} failed ({type(e).__name__}: {e}); no more rows go to {name} in this "
                  "run (metrics.jsonl has them all)", file=sys.stderr, flush=True)

    def close(self, failed: bool = False, timeout_s: float = FINISH_TIMEOUT_S) -> None:
        """Finish each tracker's run within about `timeout_s` seconds (W&B's finish waits for its
        upload, MLflow's end_run for its server, and the teardown that calls this ignores
        Ctrl-C); one that fails or takes longer is warned about. W&B's finish runs in a daemon
        thread (left behind past the timeout); MLflow's end_run stays in this thread (its active
        run is thread-local) with its HTTP timeout set to `timeout_s` and no retries."""
        import os

        wandb_run, mlflow = self.wandb_run, self.mlflow
        self.wandb_run = self.mlflow = None
        if wandb_run is not None:
            _bounded(lambda: wandb_run.finish(exit_code=1 if failed else 0), timeout_s, "W&B finish")
        if mlflow is not None:
            env = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(timeout_s))), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
            before = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                mlflow.end_run(status="FAILED" if failed else "FINISHED")
            except Exception as e:  # noqa: BLE001 -- the server gone: the run stays RUNNING there
                print(f"[eapo] WARNING: MLflow end_run failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            finally:
                for k, v in before.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


def _bounded(fn, timeout_s: float, what: str) -> None:
    """fn() in a daemon thread, waited for at most `timeout_s` s; a failure or a timeout is warned about."""
    import threading

    box: dict = {}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 -- reported by the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name=f"tracking:{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        print(f"[eapo] WARNING: {what} did not return within {timeout_s:g} s; left behind", file=sys.stderr, flush=True)
    elif "error" in box:
        e = box["error"]
        print(f"[eapo] WARNING: {what} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
