"""Batch-invariant sampling (eapo_ray.algo.sampling): the counter-based uniforms, the inverse-CDF
draw, and the transformers engine drawing a seeded request's tokens the same whatever else shares
its decoding batch (tests/unit/test_episode.py checks whole episodes under expert timing)."""
import pytest
import torch

from eapo_ray.algo.sampling import counter_uniforms, inverse_cdf, turn_seed
from eapo_ray.config import TINY_DIR


def test_counter_uniforms_are_a_pure_function_of_seed_and_counter():
    a = counter_uniforms([1, 2, 3, 2**63 + 5], [0, 0, 7, 2**40])
    b = counter_uniforms([3, 1, 2**63 + 5], [7, 0, 2**40])
    assert a.dtype == torch.float64 and torch.equal(a[[2, 0, 3]], b)
    u = counter_uniforms([9] * 100_000, range(100_000))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert len(set(counter_uniforms(range(1000), [0] * 1000).tolist())) == 1000  # seeds give different streams
    assert turn_seed(5, 0) != turn_seed(5, 1) != turn_seed(6, 0)


def test_inverse_cdf_samples_the_distribution_and_never_a_masked_token():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(10), -1)
    p[3] = 0.0  # masked; the rest keep their ratios (rows need not sum to 1)
    N = 200_000
    idx = inverse_cdf(p.expand(N, 10), counter_uniforms([1] * N, range(N)))
    p = p / p.sum()
    assert int((idx == 3).sum()) == 0
    freq = torch.bincount(idx, minlength=10).double() / N
    sd = (p.double() * (1 - p.double()) / N).sqrt()
    assert ((freq - p.double()).abs() <= 5 * sd + 1e-12).all()  # a pure function of its inputs: not flaky
    # the top of the range goes to the last token with mass, not to a masked one past it
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert inverse_cdf(q, torch.tensor([1.0 - 2**-53], dtype=torch.float64)).tolist() == [1]
    assert inverse_cdf(q, torch.tensor([1.0], dtype=torch.float64)).tolist() == [1]
    assert inverse_cdf(q, torch.tensor([0.0], dtype=torch.float64)).tolist() == [0]
    # a row with no mass to draw from (NaN logits, every token masked) raises, as torch.multinomial does
    for bad in ([[float("nan")] * 4], [[0.0] * 4]):
        with pytest.raises(ValueError, match="no finite positive probability mass"):
            inverse_cdf(torch.tensor(bad), torch.tensor([0.5], dtype=torch.float64))


def test_a_seeded_request_samples_the_same_alone_in_a_batch_reordered_and_joining_a_running_one(monkeypatch):
    import asyncio
    import threading

    from eapo_ray.rollout import engine as engine_mod
    from eapo_ray.rollout.hf_engine import HFEngine

    eng = HFEngine(str(TINY_DIR / "policy"))
    tok = eng.tokenizer
    prompts = [tok(f"Q:{a}*{b}+{c}\nA:")["input_ids"] for a, b, c in [(3, 4, 5), (12, 7, 1), (9, 9, 9), (2, 8, 6)]] * 4
    seeds = [1000 + i for i in range(len(prompts))]
    stop = ["</answer>", "</consult>"]
    torch.manual_seed(0)
    batch = eng.generate(prompts, [48] * len(prompts), 1.0, stop, seeds=seeds)
    assert len({tuple(g.tokens) for g in batch}) > 4  # the same prompt with different seeds samples differently
    torch.manual_seed(123)  # torch's RNG plays no part
    alone = [eng.generate([p], [48], 1.0, stop, seeds=[s])[0] for p, s in zip(prompts[:3], seeds[:3])]
    rev = eng.generate(prompts[::-1], [48] * len(prompts), 1.0, stop, seeds=seeds[::-1])[::-1]
    for got in (alone, rev):
        for g, ref in zip(got, batch):
            assert g.tokens == ref.tokens
            assert max((abs(x - y) for x, y in zip(g.logprobs, ref.logprobs)), default=0.0) < 1e-4
    # requests that join a running batch (rollout.join_running) draw the same tokens too
    eng.join_running = True
    assert eng.joins_running_batch
    joined_n, take = [], engine_mod._MicroBatcher._take
    monkeypatch.setattr(engine_mod._MicroBatcher, "_take", lambda self, *a: joined_n.append(len(r := take(self, *a))) or r)
    step, steps, waiting = eng._fast.step, [], threading.Event()

    def stepping(*a, **k):  # the first batch waits at its 3rd step until the others are queued
        if len(steps) == 2:
            waiting.wait(60)
        steps.append(1)
        return step(*a, **k)
    monkeypatch.setattr(eng._fast, "step", stepping)

    async def staggered(first_seed):
        first = asyncio.ensure_future(eng.agenerate(prompts[0], 48, 1.0, stop, seed=first_seed))
        while len(steps) < 2 and not first.done():  # the first request is decoding
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(eng.agenerate(p, 48, 1.0, stop, seed=s)) for p, s in zip(prompts[1:], seeds[1:])]
        for _ in range(5000):  # until they are queued in the batcher
            if len(eng._batcher.pending) == len(rest):
                break
            await asyncio.sleep(0.001)
        waiting.set()
        return [await first, *await asyncio.gather(*rest)]

    def run(first_seed):
        steps.clear()
        waiting.clear()
        joined_n.clear()
        try:
            return asyncio.run(asyncio.wait_for(staggered(first_seed), 120))
        finally:
            waiting.set()
    joined = run(seeds[0])
    assert sum(joined_n) == len(prompts) - 1  # every later request joined the running batch
    for g, ref in zip(joined, batch):
        assert g.tokens == ref.tokens
    # seeded requests that join a batch begun by an unseeded one keep their seeds
    joined = run(None)
    assert sum(joined_n) == len(prompts) - 1
    for g, ref in zip(joined[1:], batch[1:]):
        assert g.tokens == ref.tokens
