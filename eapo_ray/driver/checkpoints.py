"""The run directory, checkpoints and resume: the driver's counters (`LoopState`) saved beside
each learner checkpoint, and the metric rows of a resumed run trimmed back to its checkpoint."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eapo_ray.config import ConfigError, RunConfig, to_dict
from eapo_ray.driver.system import System


@dataclass
class LoopState:
    """The driver's counters; saved beside each checkpoint so a resumed run continues them."""
    version: int = 0  # learner updates done (= the policy version)
    samples: int = 0  # samples trained on
    generated: int = 0  # samples generated (including dropped groups)
    serial: int = 0  # rollout batches requested so far; batch n's prompts and coins come from its serial
    by_worker: dict = field(default_factory=dict)  # rollout batches delivered per actor
    first_rollout: dict | None = None
    last_rollout: dict | None = None
    logp_gap_max: float = 0.0  # max |behaviour - learner| log-prob on policy tokens seen in the run

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "LoopState":
        data = json.loads(path.read_text())
        data["by_worker"] = {int(k): v for k, v in data.get("by_worker", {}).items()}
        return cls(**data)


def prepare_run_dir(cfg: RunConfig) -> tuple[str, Path]:
    run_name = cfg.run_name or (Path(cfg.resume).name if cfg.resume else time.strftime("eapo-%Y%m%d-%H%M%S"))
    run_dir = Path(cfg.resume).resolve() if cfg.resume else Path(cfg.run_root).resolve() / run_name
    if cfg.resume and not (run_dir / "checkpoint").is_dir():
        raise ConfigError(f"config key 'resume': {run_dir} has no checkpoint/ to resume from")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return run_name, run_dir


def resume_metrics(run_dir: Path, version: int, evaluations: bool = True) -> tuple[dict | None, dict | None]:
    """On resume: drop metric rows logged after the checkpoint (they are redone), and return
    the first and last held-out evaluations already logged (None when there are none, or when
    not `evaluations`: a run resumed with eval.enabled=false must not report an earlier attempt's)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None, None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row["step"] <= version]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    evals = [{k[len("heldout_"):]: v for k, v in row.items() if k.startswith("heldout_")}
             for row in rows if "heldout_accuracy" in row]
    return (evals[0], evals[-1]) if evals and evaluations else (None, None)


def save_checkpoint(s: System, state: LoopState, run_dir: Path) -> None:
    """The learners' checkpoint (tag step<version>) and the driver's counters for that same
    version, written first: a driver killed at any point resumes with the counters (batch
    serials, hence prompts and coins) of the checkpoint it resumes from."""
    import re

    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    state.save(ckpt / f"driver_state_step{state.version}.json")
    s.learners.save(str(run_dir))
    state.save(ckpt / "driver_state.json")  # the newest, for people and tools
    tags = {p.name for p in ckpt.iterdir() if p.is_dir()}
    for p in ckpt.glob("driver_state_step*.json"):  # keep those of the tags the learners kept
        m = re.fullmatch(r"driver_state_(step\d+)\.json", p.name)
        if m and m.group(1) not in tags:
            p.unlink(missing_ok=True)


def load_driver_state(run_dir: Path, version: int) -> LoopState:
    """The driver's counters saved with checkpoint `version` (else the newest, else fresh)."""
    ckpt = run_dir / "checkpoint"
    for path in (ckpt / f"driver_state_step{version}.json", ckpt / "driver_state.json"):
        if path.exists():
            return LoopState.load(path)
    return LoopState()
