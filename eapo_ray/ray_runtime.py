"""Ray start-up and the run's metric sinks, shared by the launcher and the evaluation CLI."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from eapo_ray.config import RunConfig


def init_ray(cfg: RunConfig, required_cpus: float):
    import ray

    if ray.is_initialized():  # e.g. several runs or evaluations from one process
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}}
    if cfg.ray_address == "auto-local" and not os.environ.get("RAY_ADDRESS"):
        # A private local cluster; never attach to a stray one on this machine.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(required_cpus)),
                 runtime_env=env, include_dashboard=True, log_to_driver=True)
    else:
        ray.init(address=None if cfg.ray_address == "auto-local" else cfg.ray_address, runtime_env=env)


class MetricsLog:
    """JSONL + TensorBoard in the run directory, and Ray metrics for the dashboard."""

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        from ray.util.metrics import Gauge
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        # purge_step: on resume, TensorBoard hides events at or after it that an earlier attempt wrote
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
        self.gauges = {k: Gauge(f"eapo_{k}", description=f"EAPO {k}") for k in
                       ("reward", "consult_rate", "acceptance_prob", "heldout_accuracy", "samples_per_s", "staleness")}

    def log(self, step: int, row: dict):
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.jsonl.flush()
        for k, v in row.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
                if k in self.gauges:
                    self.gauges[k].set(float(v))

    def close(self):
        self.jsonl.close()
        self.tb.close()
