"""The run directory, checkpoints and resume: the driver's counters (`LoopState`) saved beside
each learner checkpoint, and the metric rows of a resumed run trimmed back to its checkpoint."""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eapo_ray.config import ConfigError, RunConfig, config_diff, resume_base, to_dict
from eapo_ray.driver.system import System
from eapo_ray.storage import is_uri, resolve_run_root


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
    root = resolve_run_root(cfg.run_root)  # absolute; never Ray's temporary --working-dir copy
    if is_uri(cfg.resume):  # load_config refuses one: the launcher downloads it first (storage.fetch_resume)
        raise ConfigError(f"config key 'resume': {cfg.resume} is a storage URI: download it with "
                          "eapo_ray.storage.fetch_resume before load_config (python -m eapo_ray.launch does)")
    run_name = cfg.run_name or (Path(cfg.resume).name if cfg.resume else time.strftime("eapo-%Y%m%d-%H%M%S"))
    run_dir = Path(cfg.resume).expanduser().resolve() if cfg.resume else root / run_name
    if cfg.resume:
        write_attempt_config(cfg, run_dir)
        return run_name, run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return run_name, run_dir


def has_checkpoint(run_dir: Path) -> bool:
    """Whether `run_dir` holds a learner checkpoint to resume from (DeepSpeed's `latest` names its tag)."""
    return (run_dir / "checkpoint" / "latest").is_file()


def write_attempt_config(cfg: RunConfig, run_dir: Path) -> Path:
    """A resume never overwrites the run's config.json: this attempt's config goes beside it
    (config.attempt<N>.json, N = 2, 3, ...), and what the command line changed on top of the
    config it resumed from is printed, key by key."""
    base_path, saved = resume_base(run_dir)
    n = max([1] + [int(m.group(1)) for p in run_dir.glob("config.attempt*.json")
                   if (m := re.fullmatch(r"config\.attempt(\d+)\.json", p.name))]) + 1
    path = run_dir / f"config.attempt{n}.json"
    path.write_text(json.dumps(to_dict(cfg), indent=2))
    diff = config_diff(saved, to_dict(cfg))
    where = "" if has_checkpoint(run_dir) else " (no checkpoint yet: starting over from step 0)"
    print(f"[eapo] resuming {run_dir}{where}, attempt {n}: the config of {base_path.name}"
          + (", with the command line's changes:" if diff else ", unchanged (saved as " + path.name + ")"), flush=True)
    for key, old, new in diff:
        print(f"[eapo]   {key}: {old!r} -> {new!r}", flush=True)
    if diff:
        print(f"[eapo]   (this attempt's config: {path})", flush=True)
    return path


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
    if s.app_name:  # replica bounds `python -m eapo_ray.expert scale` set from anywhere: kept for a resume
        from eapo_ray.expert_scale import mirror_record

        mirror_record(s.run_name, run_dir)
    if s.upload:  # storage_path: the checkpoint, metrics so far and config, from every node
        upload_run(s, f"the checkpoint at step {state.version}")
    tags = {p.name for p in ckpt.iterdir() if p.is_dir()}
    if f"step{state.version}" not in tags:  # the learners wrote their tags on another node: nothing to match
        return
    for p in ckpt.glob("driver_state_step*.json"):  # keep those of the tags the learners kept
        m = re.fullmatch(r"driver_state_(step\d+)\.json", p.name)
        if m and m.group(1) not in tags:
            p.unlink(missing_ok=True)


def upload_run(s: System, what: str) -> int | None:
    """s.upload() (storage.sync_run) without ending the run when it fails (a pyarrow OSError, a
    node past the sync's deadline): the failure is printed on stderr, once per sync, and the run
    goes on (the next sync uploads what this one missed). Returns the files copied, None if it failed."""
    import sys

    try:
        return s.upload()
    except Exception as e:  # noqa: BLE001 -- whatever the store raised: the run's own files are intact
        print(f"[eapo] WARNING: uploading {what} to storage_path failed, the run goes on "
              f"(its files are in the run directory): {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None


def load_driver_state(run_dir: Path, version: int) -> LoopState:
    """The driver's counters saved with checkpoint `version` (else the newest, else fresh)."""
    ckpt = run_dir / "checkpoint"
    for path in (ckpt / f"driver_state_step{version}.json", ckpt / "driver_state.json"):
        if path.exists():
            return LoopState.load(path)
    return LoopState()
