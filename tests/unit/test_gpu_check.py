"""benchmarks/gpu_check.py's CPU-checkable parts: the GPU overrides it gives the 3-step launch
are valid configs for one GPU and for two, its parts fit the 8-minute budget, and a part's
subprocess reports its rows to the parent (the no-CUDA exit is in test_cluster_manifests.py)."""
import argparse
import importlib.util
from pathlib import Path

import pytest

from eapo_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(policy: str, **kw) -> argparse.Namespace:
    return argparse.Namespace(policy=policy, vllm_dtype="float32", cpu_dry_run=False, **kw)


def _cfg(config: str, overrides: list[str]):
    return load_config(config, overrides)


def test_launch_overrides_one_gpu_share_it_by_the_object_store(gc, tmp_path):
    config, ov, note = gc.launch_overrides(_args("/models/smollm2"), 1, str(tmp_path))
    cfg = _cfg(config, ov)
    assert Path(config).name == "smollm2_cpu.yaml" and cfg.steps == 3
    assert cfg.rollout.weight_sync == "object_store" and cfg.learner.backend == "nccl"
    assert 0 < cfg.learner.num_gpus + cfg.rollout.num_gpus + cfg.eval.num_gpus <= 1  # they fit one GPU
    assert cfg.rollout.vllm.gpu_memory_utilization <= 0.5 and cfg.model.policy == "/models/smollm2"
    assert "share 1 GPU" in note


def test_launch_overrides_two_gpus_use_the_nccl_weight_sync(gc, tmp_path):
    config, ov, note = gc.launch_overrides(_args("/models/smollm2"), 2, str(tmp_path))
    cfg = _cfg(config, ov)
    assert cfg.rollout.weight_sync == "nccl" and cfg.rollout.engine == "vllm"
    assert cfg.learner.num_gpus == 1 and cfg.rollout.num_gpus == 1 and cfg.learner.backend == "nccl"


def test_launch_overrides_without_smollm2_fall_back_to_the_tiny_task(gc, tmp_path):
    config, ov, note = gc.launch_overrides(_args(str(gc.TINY)), 1, str(tmp_path))
    cfg = _cfg(config, ov)
    assert Path(config).name == "tiny_cpu_vllm.yaml" and cfg.expert.engine == "hf"  # no GPU for a vLLM expert
    assert cfg.rollout.num_gpus > 0 and cfg.model.policy.endswith("policy")


def test_parts_fit_the_default_budget(gc):
    assert sum(timeout for _, _, timeout in gc.PARTS.values()) <= 480


def test_a_failing_part_subprocess_reports_a_failed_row(gc):
    """The parent runs each part as `gpu_check.py --run-part X`; rows come back through a file,
    and a failing part becomes a FAILED row and a non-zero exit, not a lost traceback."""
    args = argparse.Namespace(policy="/nonexistent/model", cpu_dry_run=True, vllm_dtype="float32")
    status, secs = gc.spawn_part("b", args, timeout=120)  # part b on a missing model: fails fast
    assert status.startswith("FAILED") and secs < 120
    failed = [r for r in gc.ROWS if r[0].endswith("FAILED")]
    assert failed and failed[-1][0].startswith("(b)")


def test_a_skipped_load_never_reads_yes(gc):
    """(c)'s verdicts: an engine that skipped the load (it already held that (generation, version),
    the bug of issue 22 item 2) still gives the base output, which alone would read "restored:
    yes"; and an output that changed for another reason must not read "reached: yes" either."""
    base, other = [[1, 2], [3, 4]], [[1, 2], [3, 5]]
    assert gc.restored(False, base, base).startswith("NO") and gc.reached(False, base, other).startswith("NO")
    assert gc.reached(True, base, other) == "yes" and gc.restored(True, base, base) == "yes"
    assert gc.reached(True, base, base).startswith("NO") and gc.restored(True, base, other).startswith("NO")


def test_vllm_config_fits_the_policys_positions(gc, tmp_path):
    """The bundled tiny policy holds 512 positions: vLLM refuses a longer max_model_len (the dry run of
    parts b and c failed on it)."""
    assert gc.vllm_config(argparse.Namespace(policy=str(gc.TINY), vllm_dtype="float32"), 0.4).max_model_len == 512
    assert gc.vllm_config(argparse.Namespace(policy=str(tmp_path), vllm_dtype="float32"), 0.4).max_model_len == 1024


def _vllm_engines_on_fractional_gpus(cfg) -> list[str]:
    out = []
    if cfg.rollout.engine == "vllm" and 0 < cfg.rollout.num_gpus < 1:
        out.append("rollout")
    if cfg.eval.enabled and cfg.eval.engine == "vllm" and 0 < cfg.eval.num_gpus < 1:
        out.append("eval")
    if cfg.expert.engine == "vllm" and 0 < cfg.expert.num_gpus < 1:
        out.append("expert")
    return out


@pytest.mark.parametrize("policy", ["/models/smollm2", "tiny"])
@pytest.mark.parametrize("vllm_evaluator", [False, True])
def test_launch_overrides_one_gpu_never_two_vllm_engines_on_it(gc, tmp_path, monkeypatch, policy, vllm_evaluator):
    """(d) on one GPU: a second vLLM engine starting beside the rollout engine and DeepSpeed on a shared
    card fails vLLM's start-up memory profiling (it counts the others' allocations as its own), so
    at most one vLLM engine holds a fraction of it, also when the base config has a vLLM evaluator
    (`vllm_evaluator`: load_config gives eval.engine=vllm as the base config's value)."""
    import eapo_ray.config

    if vllm_evaluator:
        real = eapo_ray.config.load_config
        monkeypatch.setattr(eapo_ray.config, "load_config",
                            lambda path=None, overrides=(): real(path, ["eval.engine=vllm", *(overrides or [])]))
    config, ov, _ = gc.launch_overrides(_args(str(gc.TINY) if policy == "tiny" else policy), 1, str(tmp_path))
    cfg = _cfg(config, ov)
    assert len(_vllm_engines_on_fractional_gpus(cfg)) <= 1, (_vllm_engines_on_fractional_gpus(cfg), ov)
    assert cfg.rollout.engine == "vllm" and 0 < cfg.rollout.num_gpus < 1  # the rollout engine is the one on the GPU
