"""GPU memory arithmetic (the `--plan` of eapo_ray/plan.py): pure functions of a model's shape
and the learner / vLLM settings. Bytes throughout; GB = 1e9 bytes.

Learner (DeepSpeed with torch AdamW, as learner/actor.py builds it), per parameter:
  bf16: bf16 weights 2 + bf16 gradients 2 + fp32 master 4 + Adam m, v 8 + fp32 gradient of the
        master 4. ZeRO-0 (DeepSpeed's BF16_Optimizer) already partitions master and Adam over the
        ranks but keeps a full fp32 gradient; ZeRO-1 partitions master, Adam and the fp32 gradient;
        ZeRO-2 also the bf16 gradient; ZeRO-3 everything.
  fp32: weights 4 + gradients 4 + Adam 8 (+ a partitioned fp32 master copy under ZeRO >= 1).
Plus DeepSpeed's buckets (reduce / all-gather 5e8 elements; ZeRO-3 keeps at most 1e9 gathered
parameters live), each capped at the model's size.

Activations, per token and decoder layer of a Llama/Qwen2-style block (HF eager modules, SDPA with
a memory-efficient kernel: no [L, L] scores; d = 2 for bf16 compute, 4 for fp32), what autograd
keeps for backward:
  2 RMSNorms   (4 + 2d) h each   (fp32 upcast input, normalised output, weighted output)
  attention    d (5 q + 4 kv + 2 q if kv < q)   (q, k, v; rotate_half(q, k); q, k after rope;
               k, v repeated to the query heads for GQA; output and its reshaped copy)
  SwiGLU MLP   4 d I                 (gate, up, silu(gate), their product)
where h = hidden size, q = heads x head_dim, kv = kv heads x head_dim, I = intermediate size.
Without checkpointing every layer keeps that; with learner.gradient_checkpointing each layer keeps
only its input (d h) and backward recomputes one layer at a time. The layer being differentiated
adds its gradients' temporaries, d (2 h + 2 I) per token. Outside the layers: the final norm and
the final hidden state ((4 + 2d) h + 2 d h per token) and one lm_head chunk of the log-prob forward
(learner/forward.py: LOGP_CHUNK_TOKENS positions x vocabulary, the logits in d bytes and about four
fp32 copies in log-softmax and its backward: (d + 16) V per position).

vLLM: the engine takes gpu_memory_utilization x the GPU's memory; weights / TP and its own
activation profile and CUDA graphs (VLLM_OTHER_BYTES, assumed) come out of it; the rest is KV
cache, 2 x layers x kv heads per GPU x head_dim x dtype bytes per token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GB = 1e9
CUDA_OVERHEAD_BYTES = 2e9  # per GPU process: CUDA context, NCCL communicators, allocator fragmentation (assumed)
VLLM_OTHER_BYTES = 3e9  # inside vLLM's share: activation profile, CUDA graphs, sampler (assumed)
VLLM_OUTSIDE_BYTES = 1e9  # outside vLLM's share: the CUDA context and what torch allocates beside it (assumed)
DS_BUCKET_ELEMS = 5e8  # DeepSpeed's reduce_bucket_size / allgather_bucket_size defaults
DS_MAX_LIVE_PARAMS = 1e9  # DeepSpeed ZeRO-3 stage3_max_live_parameters default
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    dtype_bytes: int = 2  # the checkpoint's dtype (vLLM's dtype: auto)
    max_positions: int = 0

    @property
    def params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        layer = attn + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int = 1) -> int:
        """KV cache bytes per token on one GPU of a TP group (kv heads are split over TP, and
        replicated when there are fewer kv heads than GPUs)."""
        return 2 * self.layers * max(1, self.kv_heads // tp) * self.head_dim * dtype_bytes


def shape_from_config(c: dict) -> ModelShape:
    """ModelShape from a Hugging Face config.json dict (Llama / Qwen2 / Mistral keys)."""
    try:
        h, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        dtype = str(c.get("torch_dtype") or c.get("dtype") or "bfloat16")
        return ModelShape(
            hidden=h, layers=int(c["num_hidden_layers"]), heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads), head_dim=int(c.get("head_dim") or h // heads),
            intermediate=int(c["intermediate_size"]), vocab=int(c["vocab_size"]),
            tied=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")),
            dtype_bytes=DTYPE_BYTES.get(dtype.replace("torch.", ""), 2),
            max_positions=int(c.get("max_position_embeddings") or 0))
    except KeyError as e:
        raise ValueError(f"model config has no {e.args[0]!r}") from None


def model_state_bytes(params: int, bf16: bool, zero_stage: int, world: int) -> dict[str, float]:
    """Weights, gradients and optimizer state per rank (see the module docstring)."""
    n, z = world, zero_stage
    w = 2 if bf16 else 4
    out = {"weights": params * w / (n if z >= 3 else 1),
           "gradients": params * w / (n if z >= 2 else 1),
           "adam m, v (fp32)": params * 8 / (n if (z >= 1 or bf16) else 1)}
    if bf16:
        out["fp32 master"] = params * 4 / n
        out["fp32 gradients"] = params * 4 / (n if z >= 1 else 1)
    elif z >= 1:
        out["fp32 master"] = params * 4 / n
    return out


def deepspeed_buffer_bytes(params: int, bf16: bool, zero_stage: int) -> float:
    w = 2 if bf16 else 4
    bucket = min(params, DS_BUCKET_ELEMS) * w
    if zero_stage == 3:
        return bucket + min(params, DS_MAX_LIVE_PARAMS) * w
    return 2 * bucket if zero_stage in (1, 2) else bucket


def layer_activation_bytes(s: ModelShape, d: int) -> float:
    """Bytes autograd keeps per token per decoder layer without checkpointing (module docstring)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    norms = 2 * (4 + 2 * d) * s.hidden
    attn = d * (5 * q + 4 * kv + (2 * q if kv < q else 0))
    return norms + attn + 4 * d * s.intermediate


def activation_bytes(s: ModelShape, tokens: int, d: int, checkpointing: bool) -> float:
    """Activations of a forward over `tokens` (padded) positions, at their peak in backward,
    without the lm_head chunk (`logits_bytes`)."""
    per_layer = d * s.hidden if checkpointing else layer_activation_bytes(s, d)
    live = (layer_activation_bytes(s, d) if checkpointing else 0) + d * (2 * s.hidden + 2 * s.intermediate)
    outside = (4 + 2 * d) * s.hidden + 2 * d * s.hidden
    return tokens * (s.layers * per_layer + live + outside)


def logits_bytes(s: ModelShape, tokens: int, d: int, chunk_tokens: int) -> float:
    """One lm_head chunk of the log-prob forward and its backward: (d + 16) x vocabulary bytes per position."""
    return min(tokens, chunk_tokens or tokens) * s.vocab * (d + 16)


def shared_cache_bytes(s: ModelShape, rows: int, prompt_tokens: int, d: int) -> float:
    """learner.share_prompts: per response row and layer, the prompt's keys/values index-selected
    for its bucket, concatenated with the response's, and repeated to the query heads (GQA)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return rows * prompt_tokens * s.layers * d * (4 * kv + (2 * q if kv < q else 0))


@dataclass(frozen=True)
class LearnerShape:
    """A learner rank's work as the memory model sees it (plan.learner_shape builds it from a config)."""
    world: int
    zero_stage: int
    bf16: bool
    gradient_checkpointing: bool
    max_tokens_per_microbatch: int
    length_buckets: bool
    share_prompts: bool
    minibatches: int
    epochs: int
    rows: int  # samples per rank per minibatch
    prompts: int  # distinct prompts among them
    prompt_tokens: int
    response_tokens: int
    chunk_tokens: int = 1024  # learner.forward.LOGP_CHUNK_TOKENS

    @property
    def longest(self) -> int:
        return self.prompt_tokens + self.response_tokens


@dataclass
class Estimate:
    """A role's memory need: named parts (bytes) and their sum; `notes` say which path / what fits."""
    parts: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return float(sum(self.parts.values()))


def learner_path(ls: LearnerShape) -> tuple[str, int, bool]:
    """Which train_step path the learner takes (learner/actor.py), the padded tokens whose
    activations are live at once in the worst case (every row at the longest sample), and whether
    that is the shared-prompt path."""
    cap, n, longest = ls.max_tokens_per_microbatch, ls.rows, ls.longest
    buckets = ls.length_buckets and cap <= 0 and ls.zero_stage < 3
    one_update = ls.epochs == 1 and ls.minibatches == 1
    if buckets and one_update and ls.share_prompts and not ls.gradient_checkpointing:
        return "_train_shared (prompts once, one backward)", n * longest, True
    if buckets and one_update:
        return "_train_buckets (every forward before any backward)", n * longest, False
    if cap <= 0:
        how = "length buckets" if buckets else "the whole minibatch"
        return f"micro-batches ({how}; worst case one bucket of {n} rows)", n * longest, False
    rows = min(n, max(1, cap // longest))
    return f"micro-batches of <= {cap} padded tokens ({rows} row(s) at the longest)", rows * longest, False


def learner_memory(s: ModelShape, ls: LearnerShape, overhead: float = CUDA_OVERHEAD_BYTES,
                   sync_buffer_bytes: float = 0.0) -> Estimate:
    """Peak memory of one learner rank: model states + DeepSpeed buffers + the train step's
    activations (or, if larger, the ZeRO-3 full-weight gather of a publish) + overhead."""
    d = 2 if ls.bf16 else 4
    est = Estimate(parts=dict(model_state_bytes(s.params, ls.bf16, ls.zero_stage, ls.world)))
    est.parts["deepspeed buffers"] = deepspeed_buffer_bytes(s.params, ls.bf16, ls.zero_stage)
    path, tokens, shared = learner_path(ls)
    act = activation_bytes(s, tokens, d, ls.gradient_checkpointing)
    if shared:  # prompts once + responses, plus the prompt keys/values each response reads
        tok = ls.prompts * ls.prompt_tokens + ls.rows * ls.response_tokens
        act_shared = activation_bytes(s, tok, d, False) + shared_cache_bytes(s, ls.rows, ls.prompt_tokens, d)
        # a model whose set-up check fails trains on the buckets path instead: the larger of the two
        act = max(act, act_shared)
    head = logits_bytes(s, tokens, d, ls.chunk_tokens)
    gather = s.params * d if ls.zero_stage == 3 else 0.0  # a publish gathers every parameter (full_state_dict)
    if gather > act + head:  # outside the train step: the larger of the two is the peak
        est.parts["full weights gathered (ZeRO-3 publish)"] = gather
        est.notes.append(f"the publish's gather is the peak; the step's activations + lm_head chunk: "
                         f"{(act + head) / GB:.1f} GB")
    else:
        est.parts["activations"], est.parts["lm_head chunk"] = act, head
    if sync_buffer_bytes:
        est.parts["NCCL weight-sync buckets (rank 0)"] = sync_buffer_bytes
    if overhead:
        est.parts["CUDA context, NCCL, fragmentation"] = overhead
    ck = "with" if ls.gradient_checkpointing else "without"
    est.notes.insert(0, f"path: {path}; {tokens} padded tokens live, {ck} gradient checkpointing")
    return est


@dataclass
class VLLMEstimate:
    budget: float  # gpu_memory_utilization x GPU memory
    weights: float  # per GPU
    other: float
    kv_cache: float
    kv_per_token: int
    outside: float  # what must fit outside vLLM's share (CUDA context, weight-sync buffers)
    gpu: float

    @property
    def kv_tokens(self) -> int:
        return max(0, int(self.kv_cache // self.kv_per_token))


def vllm_memory(s: ModelShape, gpu_bytes: float, utilization: float, tp: int, weight_dtype_bytes: int,
                kv_dtype_bytes: int | None = None, outside_extra: float = 0.0,
                other: float = VLLM_OTHER_BYTES) -> VLLMEstimate:
    """One GPU of a vLLM engine: weights / TP and `other` out of utilization x the GPU; the rest is KV cache."""
    budget = utilization * gpu_bytes
    weights = s.params * weight_dtype_bytes / tp
    return VLLMEstimate(budget=budget, weights=weights, other=other, kv_cache=budget - weights - other,
                        kv_per_token=s.kv_bytes_per_token(kv_dtype_bytes or weight_dtype_bytes, tp),
                        outside=VLLM_OUTSIDE_BYTES + outside_extra, gpu=gpu_bytes)
