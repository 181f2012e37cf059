"""The run's summary.json: held-out accuracy at the start and end, counters, the time breakdown
and the accounting of every sample."""
from __future__ import annotations

import json
from pathlib import Path

from eapo_ray.config import RunConfig
from eapo_ray.driver.checkpoints import LoopState
from eapo_ray.driver.system import BUFFER_CALL_S, System


def write_summary(cfg: RunConfig, s: System, state: LoopState, run_dir: Path, ev0: dict | None, ev: dict | None,
                  wall_seconds: float, loop_seconds: float) -> dict:
    summary = {
        "heldout_accuracy_start": (ev0 or {}).get("accuracy"), "heldout_accuracy_end": (ev or {}).get("accuracy"),
        "heldout_start": ev0, "heldout_end": ev, "heldout_end_step": s.heldout_end_step,
        "heldout_end_error": s.final_eval_error, "steps": state.version, "samples": state.samples,
        "generated_samples": state.generated, "wall_seconds": wall_seconds, "loop_seconds": loop_seconds,
        "consult_rate_start": (state.first_rollout or {}).get("consult_rate", 0.0),
        "consult_rate_end": (state.last_rollout or {}).get("consult_rate", 0.0),
        "logp_gap_max": state.logp_gap_max,
        "seed": cfg.seed, "buffer": buffer_stats(s.buffer), "rollout_batches_by_worker": state.by_worker,
        "rollout_actors_retired": sorted(s.fleet.retired), "rollout_failed_calls": s.fleet.failed_calls,
        "learner_restarts": s.learner_restarts,
        "checkpoint": str(run_dir / "final"),
    }
    if s.breakdown is not None:
        summary["breakdown"] = s.breakdown.summary()
    if s.accounting is not None:
        import ray

        summary["accounting"] = s.accounting.close(ray.get(s.buffer.stats.remote(), timeout=BUFFER_CALL_S),
                                                   [p.num_samples for p in s.pending], s.fleet.num_inflight)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def buffer_stats(buffer) -> dict:
    import ray

    return {f"buffer_{k}": v for k, v in ray.get(buffer.stats.remote(), timeout=BUFFER_CALL_S).items()}
