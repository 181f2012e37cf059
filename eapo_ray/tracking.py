"""Experiment tracking: the rows the driver writes to metrics.jsonl, also sent to Weights & Biases
and/or MLflow (config section `tracking`; both off by default, each an optional extra:
`pip install 'eapo_ray[wandb]'`, `'eapo_ray[mlflow]'`).

What goes: the numeric fields of each row (bools as 0/1; strings, None and nested values are
left to metrics.jsonl), at the row's `step`: MLflow `log_metrics(row, step=step)`; W&B one history
row per metrics row with `step` as its x-axis (`define_metric("*", step_metric="step")`, so a
resumed run's rows, which restart at its checkpoint's step, are kept). The run's config goes as
W&B config / MLflow params. A resumed launch is a new tracking run with the same name.
Credentials come from the environment (WANDB_API_KEY, MLFLOW_TRACKING_*), never from the config.
"""
from __future__ import annotations

from pathlib import Path

from eapo_ray.config import ConfigError, TrackingConfig


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
        values = numeric(row)
        if not values:
            return
        if self.wandb_run is not None:
            self.wandb_run.log({"step": step, **values})
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=step)

    def close(self, failed: bool = False) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None
        if self.mlflow is not None:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
            self.mlflow = None
