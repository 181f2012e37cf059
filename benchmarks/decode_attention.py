"""The decoding step's attention: SDPA vs two matmuls (rollout/fast_llama._attend_one), alternating.

    python benchmarks/decode_attention.py [--batches 8]

Rollout batches of the bundled task (16 prompts x 8 samples, T=1, up to 160 new tokens, one
thread, seeded sampling so both variants draw with the same uniforms), each generated once with
`torch.nn.functional.scaled_dot_product_attention` in the decoding step and once with
`_attend_one`, in alternating order. Prints per batch whether the sampled tokens are the same,
then the median CPU seconds per batch and their ratio.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/decode_attention.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=8)
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from eapo_ray.config import TINY_DIR, load_config
    from eapo_ray.data import encode_prompt, train_examples
    from eapo_ray.rollout import fast_llama
    from eapo_ray.rollout.hf_engine import HFEngine

    torch.set_num_threads(1)
    cfg = load_config(None, [])
    eng = HFEngine(str(TINY_DIR / "policy"))
    ex = train_examples(cfg)
    stop = [cfg.protocol.consult_close, cfg.protocol.answer_close]
    variants = {"two matmuls": fast_llama._attend_one,
                "sdpa": lambda q, k, v, m, s: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=s)}
    cpu = {name: [] for name in variants}
    try:
        for b in range(args.batches):
            prompts = [encode_prompt(eng.tokenizer, cfg.data, e.problem) for e in ex[16 * b:16 * b + 16] for _ in range(8)]
            seeds = list(range(b * 1000, b * 1000 + len(prompts)))
            toks = {}
            for name in (list(variants) if b % 2 else list(variants)[::-1]):
                fast_llama._attend_one = variants[name]
                t = time.process_time()
                gens = eng.generate(prompts, [160] * len(prompts), 1.0, stop, seeds=seeds)
                cpu[name].append(time.process_time() - t)
                toks[name] = [g.tokens for g in gens]
            same = toks["sdpa"] == toks["two matmuls"]
            print(f"batch {b}: {sum(map(len, toks['sdpa']))} new tokens, same tokens: {same}")
    finally:
        fast_llama._attend_one = variants["two matmuls"]
    med = {name: sorted(v)[len(v) // 2] for name, v in cpu.items()}
    print(f"median CPU s per batch: sdpa {med['sdpa']:.4f}, two matmuls {med['two matmuls']:.4f}; "
          f"sdpa / two matmuls {med['sdpa'] / med['two matmuls']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
