"""expert.added_latency_s (benchmarks only): each reply comes that much later, the answer unchanged.
The replica's reply path is called directly, its batched engine call stubbed (serve.batch needs a
Serve replica; the benchmarks exercise the real deployment: expert wait grows with L)."""
import asyncio
import time

from eapo_ray.config import load_config
from eapo_ray.expert import Expert


def test_added_latency_delays_each_reply_and_keeps_the_answer():
    cfg = load_config(None, ["expert.added_latency_s=0.3"])
    expert = object.__new__(Expert)
    expert.cfg = cfg.expert
    expert.remote = None  # a model-loading expert (engine hf), not an OpenAI-compatible endpoint

    async def batched(query):
        return f"{query}={eval(query)}"

    expert._batched = batched

    async def ask():
        t0 = time.perf_counter()
        out = await asyncio.gather(expert("12*3"), expert("7+5"))  # concurrent replies wait together
        return out, time.perf_counter() - t0

    slow, t_slow = asyncio.run(ask())
    cfg.expert.added_latency_s = 0.0
    fast, t_fast = asyncio.run(ask())
    assert slow == fast == ["12*3=36", "7+5=12"]
    assert t_slow >= 0.3 and t_slow - t_fast >= 0.25
