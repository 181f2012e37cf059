"""GPU check for a machine lent with a GPU (no internet needed).

    python benchmarks/gpu_check.py                                # bundled tiny policy (small numbers)
    python benchmarks/gpu_check.py --model-size 1b                # random ~1.1B Llama: meaningful GB/s
    python benchmarks/gpu_check.py --model-size 7b --skip-train   # 7.6B shapes, broadcast part only

(a) DeepSpeed on one GPU (world size 1, init_distributed(dist_backend="nccl")), bf16, ZeRO
    --zero-stage: a few steps of next-token loss on random tokens (ms/step, tokens/s).
(b) gather the full state dict (GatheredParameters under ZeRO-3, as eapo_ray/learner.py does),
    pack it into --bucket-mb buckets (same-dtype tensors flattened into one buffer each), copy it
    to pinned CPU memory, and NCCL-broadcast the buckets GPU 0 -> GPU 1 (two processes) when
    2 GPUs are visible; with one GPU that broadcast is NOT measured (the output says so).
Missing packages are reported and their parts skipped. Ends with one summary table.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys
import time
from pathlib import Path

TINY = Path(__file__).resolve().parent.parent / "eapo_ray" / "assets" / "tiny" / "policy"
SIZES = {"1b": (2048, 5632, 22, 32, 4, 32000), "1.5b": (1536, 8960, 28, 12, 2, 151936),  # LlamaConfig:
         "7b": (3584, 18944, 28, 28, 4, 152064)}  # hidden, intermediate, layers, heads, kv heads, vocab
ROWS: list[tuple[str, str, str]] = []  # (measurement, value, note)


def row(what: str, value: str, note: str = "") -> None:
    ROWS.append((what, value, note))
    print(f"[gpu_check] {what}: {value} {note}".rstrip(), flush=True)


def have(mod: str) -> bool:
    ok = importlib.util.find_spec(mod) is not None
    if not ok:
        row(f"package {mod}", "MISSING", "the parts that need it are skipped")
    return ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync() -> None:
    __import__("torch").cuda.synchronize()


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
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), args.model  # as learner.py
    h, inter, layers, heads, kv, vocab = SIZES[args.model_size]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=max(4096, args.seq_len))
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16), f"random Llama {args.model_size}"


def train_and_pack(args):
    """(a), then the gather + pack of (b), in this process (NCCL group of world size 1)."""
    import deepspeed
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)
    model, what = build_model(args)
    row("model", what, f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f}B params")
    if args.skip_train:  # no optimizer states, so 7B shapes fit one GPU for the broadcast part
        row("(a) DeepSpeed train step", "skipped", "--skip-train: (b) packs the model's own weights, no ZeRO gather")
        t0 = time.perf_counter()
        return pack_timed(model.to("cuda", torch.bfloat16).state_dict(), args, t0, "(b) pack")
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
        return pack_timed(engine.module.state_dict(), args, t0, "(b) gather + pack")


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


def run(args) -> int:
    import torch
    import torch.distributed as dist

    n_gpu = torch.cuda.device_count()
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:  # a torch built without NCCL
        nccl = f"unavailable ({type(e).__name__})"
    row("device", torch.cuda.get_device_name(0), f"{n_gpu} visible; torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}")
    if not (have("transformers") & have("deepspeed")):
        print("error: both parts build the model with transformers and run DeepSpeed; install them "
              "(pip install -e . in this repository)", file=sys.stderr)
        return 2
    bufs, total = train_and_pack(args)
    pinned = [torch.empty(b.shape, dtype=b.dtype, pin_memory=True) for b in bufs]
    sync()
    t0 = time.perf_counter()
    for dst, b in zip(pinned, bufs):
        dst.copy_(b, non_blocking=True)
    sync()
    secs = time.perf_counter() - t0
    row("(b) GPU -> pinned CPU copy", f"{total / secs / 1e9:.1f} GB/s", f"{secs:.3f} s: the floor of the object-store "
        "path (learner.publish copies to CPU, then ray.put)")
    secs = timed_broadcasts(bufs, args.repeats)
    row("(b) broadcast, world size 1", f"{secs * 1000:.2f} ms", "NO data moves with one rank: call overhead only")
    meta = [(b.dtype, b.numel()) for b in bufs]
    del bufs, pinned
    torch.cuda.empty_cache()
    dist.destroy_process_group()
    if n_gpu < 2:
        row("(b) NCCL broadcast GPU -> GPU", "NOT MEASURED", "one GPU visible: NCCL cannot put two ranks on one device")
        return 0
    import torch.multiprocessing as mp

    out = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_bcast_worker, args=(meta, free_port(), args.repeats, out), nprocs=2, join=True)
    secs = out.get()
    row("(b) NCCL broadcast GPU0 -> GPU1", f"{total / secs / 1e9:.1f} GB/s",
        f"{secs:.3f} s per full model in {len(meta)} buckets, 2 processes on one node")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TINY), help="an HF causal-LM directory (default: the bundled tiny policy)")
    ap.add_argument("--model-size", choices=sorted(SIZES), help="instead of --model: a random Llama of these shapes")
    ap.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=5, help="timed train steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bucket-mb", type=int, default=512, help="bucket size, like rollout.sync_bucket_mb")
    ap.add_argument("--repeats", type=int, default=3, help="timed broadcast rounds")
    ap.add_argument("--skip-train", action="store_true", help="only (b); needed for --model-size 7b on one 80 GB GPU")
    args = ap.parse_args(argv)
    if not have("torch"):
        print("error: torch is not installed: nothing was measured", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print(f"error: no CUDA device visible (torch {torch.__version__}, CUDA build: {torch.version.cuda}); this "
              "script measures GPU paths only. Nothing was measured.", file=sys.stderr)
        return 2
    try:
        rc = run(args)
    except Exception as e:  # report what was measured before the failure
        row("FAILED", type(e).__name__, str(e)[:300])
        rc = 1
    w, v = max(len(r[0]) for r in ROWS), max(len(r[1]) for r in ROWS)
    print("\nsummary (benchmarks/gpu_check.py)\n" + "-" * 100)
    for what, value, note in ROWS:
        print(f"  {what:<{w}}  {value:>{v}}  {note}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
