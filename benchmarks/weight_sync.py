"""Weight sync through the object store vs its floor, side by side in one run.

    python benchmarks/weight_sync.py [--models tiny smollm2-135m synthetic-0.5b] [--repeats 3]

For each model, on one local Ray cluster, three ways to move the same fp32 state dict from
the driver (standing in for learner rank 0) into another process (standing in for a rollout
engine), best of --repeats:

- eapo:    the project's path: `weight_sync.publish` (ray.put of the state dict) on the learner
           side, `weight_sync.load_published` in the engine's actor (ray.get + load_state_dict
           into the engine's model), i.e. what every rollout actor and the evaluator do per version.
- put+get: a plain `ray.put` of the same state dict and a `ray.get` of it in the actor (no load).
- memcpy:  one in-process copy of the same bytes into preallocated tensors (the memory floor).

Prints seconds, GB/s, and the ratios eapo / put+get and eapo / memcpy. The learner's own
gather of the weights (`Learner.full_state_dict`) is not included: under ZeRO-0 it is a
device-to-CPU copy, timed by benchmarks/gpu_check.py on a GPU.

Models: `tiny` (the bundled 1M policy), `smollm2-135m` (converted on first use, see
eapo_ray/models.py) and `synthetic-0.5b` (a randomly initialised Llama of ~0.47B parameters:
hidden 1024, 24 layers, MLP 4096, vocabulary 32000; about 1.9 GB in fp32).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from eapo_ray.config import TINY_DIR
from eapo_ray.models import resolve_model


def synthetic_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def build_model(name: str):
    """(model in fp32 on CPU, description)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if name == "synthetic-0.5b":
        torch.manual_seed(0)
        return LlamaForCausalLM(synthetic_config()).float().eval(), "random Llama, 24 x 1024"
    path = str(TINY_DIR / "policy") if name == "tiny" else resolve_model(name)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), path


class EngineSide:
    """A stand-in rollout engine in its own process: a model of the same architecture with the
    `Engine.load_weights` / `version` interface that `load_published` uses."""

    def __init__(self, name: str):
        torch.set_num_threads(1)
        self.model, _ = build_model(name)
        self.version = 0

    def load_weights(self, state_dict, version):
        self.model.load_state_dict(state_dict)
        self.version = version

    def load(self, weights) -> float:
        from eapo_ray.weight_sync import load_published

        t0 = time.perf_counter()
        assert load_published(self, weights)
        return time.perf_counter() - t0

    def get_only(self, box) -> float:
        import ray

        t0 = time.perf_counter()
        sd = ray.get(box[0])
        n = sum(v.numel() for v in sd.values())  # touch the result
        assert n > 0
        return time.perf_counter() - t0


def measure(name: str, repeats: int) -> dict:
    import ray

    from eapo_ray.weight_sync import publish

    model, desc = build_model(name)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    engine = ray.remote(EngineSide).options(num_cpus=0).remote(name)
    ray.get(engine.__ray_ready__.remote())
    eapo, putget, memcpy = [], [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        w = publish(i + 1, sd)
        t_pub = time.perf_counter() - t0
        t_load = ray.get(engine.load.remote(w))
        eapo.append(t_pub + t_load)
        del w
        t0 = time.perf_counter()
        box = [ray.put(sd)]
        t_put = time.perf_counter() - t0
        putget.append(t_put + ray.get(engine.get_only.remote(box)))
        del box
        dst = {k: torch.empty_like(v) for k, v in sd.items()}
        t0 = time.perf_counter()
        for k, v in sd.items():
            dst[k].copy_(v)
        memcpy.append(time.perf_counter() - t0)
        del dst
    ray.kill(engine)
    best = {"eapo": min(eapo), "put+get": min(putget), "memcpy": min(memcpy)}
    return {"model": name, "desc": desc, "gb": nbytes / 1e9, **best,
            "eapo/put+get": best["eapo"] / best["put+get"], "eapo/memcpy": best["eapo"] / best["memcpy"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/weight_sync.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m", "synthetic-0.5b"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import ray

    for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}.items():
        os.environ.setdefault(k, v)
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=6 * 10**9)
    try:
        print(f"{'model':16s} {'GB':>6s} {'eapo s':>8s} {'put+get s':>9s} {'memcpy s':>8s} "
              f"{'eapo GB/s':>9s} {'eapo/put+get':>12s} {'eapo/memcpy':>11s}", flush=True)
        for name in args.models:
            r = measure(name, args.repeats)
            print(f"{r['model']:16s} {r['gb']:6.3f} {r['eapo']:8.3f} {r['put+get']:9.3f} {r['memcpy']:8.3f} "
                  f"{r['gb'] / r['eapo']:9.2f} {r['eapo/put+get']:12.2f} {r['eapo/memcpy']:11.1f}", flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
