"""Generation throughput: the transformers backend vs the vLLM backend, same model, same
prompts, same sampling settings, measured side by side in one run.

    python benchmarks/engine_throughput.py [--model DIR] [--prompts 128] [--max-new-tokens 64]

Prints generated tokens/s per backend and the vLLM/HF ratio. The default model is the
bundled tiny policy (1M parameters), where per-step overhead dominates; pass a bigger
HF directory for a more realistic ratio.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from eapo_ray.config import TINY_DIR, VLLMConfig
from eapo_ray.data import render_prompt
from eapo_ray.rollout.hf_engine import HFEngine
from eapo_ray.task import sample_problems


def measure(engine, prompts, max_new_tokens: int, temperature: float, repeats: int) -> tuple[float, int]:
    engine.generate(prompts[:8], [max_new_tokens] * 8, temperature, [])  # warm-up
    t0, tokens = time.perf_counter(), 0
    for _ in range(repeats):
        gens = engine.generate(prompts, [max_new_tokens] * len(prompts), temperature, [])
        tokens += sum(len(g.tokens) for g in gens)
    return tokens / (time.perf_counter() - t0), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TINY_DIR / "policy"), help="an HF causal-LM directory")
    ap.add_argument("--prompts", type=int, default=128, help="prompts per generate call (one batch)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the HF engine")
    ap.add_argument("--dtype", default="float32", help="vLLM dtype (the HF engine runs float32)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    hf = HFEngine(args.model)
    problems = sample_problems(args.prompts, [2, 3, 4], "heldout", seed=0)
    prompts = [hf.tokenizer(render_prompt("Q:{problem}\nA:", p.problem))["input_ids"] for p in problems]
    random.Random(0).shuffle(prompts)

    from eapo_ray.rollout.vllm_engine import VLLMEngine

    t0 = time.perf_counter()
    vl = VLLMEngine(args.model, VLLMConfig(dtype=args.dtype, max_model_len=512), seed=0)
    startup = time.perf_counter() - t0
    rows = []
    for name, eng in (("transformers (HFEngine)", hf), ("vLLM (VLLMEngine)", vl)):
        tps, n = measure(eng, prompts, args.max_new_tokens, args.temperature, args.repeats)
        rows.append((name, tps, n))
        print(f"{name:26s} {tps:10.0f} tokens/s  ({n} tokens, {args.repeats} x {len(prompts)} prompts)", flush=True)
    vl.shutdown()
    print(f"vLLM engine start-up: {startup:.1f} s (not in the rate)")
    print(f"ratio vLLM / transformers: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
