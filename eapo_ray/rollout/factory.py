"""Which engine a config names: the one place that imports both engines."""
from __future__ import annotations

from eapo_ray.rollout.engine import Engine
from eapo_ray.rollout.hf_engine import HFEngine


def hf_options(rollout_cfg) -> dict:
    """The transformers engine's switches from a config.RolloutConfig (rollout actors and the evaluator)."""
    return {"prune_finished": rollout_cfg.prune_finished, "fast_decode": rollout_cfg.fast_decode,
            "join_running": rollout_cfg.join_running}


def make_engine(kind: str, model_path: str, vllm_cfg=None, seed: int = 0, **kwargs) -> Engine:
    """`vllm_cfg` (a config.VLLMConfig) and `seed` are used by the vLLM engine only."""
    if kind == "hf":
        return HFEngine(model_path, **kwargs)
    if kind == "vllm":
        from eapo_ray.rollout.vllm_engine import VLLMEngine  # vLLM is optional: imported when asked for

        return VLLMEngine(model_path, vllm_cfg, seed=seed, **kwargs)
    raise ValueError(f"unknown engine {kind!r} (expected 'hf' or 'vllm')")
