"""The learner's maths and collectives: chunked log-probs, global loss normalisation over
data-parallel ranks and micro-batches, pi_old once per update, ranks agreeing on what to run
(lost batches, empty shards and minibatches under ZeRO-3), gradient checkpointing actually on,
and checkpoint pruning. The slow tests run real DeepSpeed learners (Ray actors, gloo) and read
their state through `__ray_call__`; a hang fails through a timeout."""
import math
import sys
import time

import pytest
import torch
from ray import cloudpickle
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from eapo_ray.algo.batching import collate, split_by_tokens
from eapo_ray.algo.logprobs import hidden_token_logprobs, token_logprobs
from eapo_ray.algo.losses import policy_loss, sft_loss
from eapo_ray.buffer import BufferItem
from eapo_ray.config import TINY_DIR, load_config
from eapo_ray.learner.checkpoints import prune_checkpoints
from eapo_ray.learner.forward import PolicyLogProbs

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the closures below run inside the actors
POLICY = str(TINY_DIR / "policy")
HANG_S = 120  # a train step here takes seconds; a hang fails the test instead of blocking the suite


# ---- pure: chunked log-probs, micro-batches, the model wrapper, pruning ----

def test_chunked_logprobs_equal_full_values_gradients_and_keep_no_logits():
    torch.manual_seed(0)
    B, L, H, V = 3, 9, 8, 37
    head = torch.nn.Linear(H, V, bias=False)
    ids = torch.randint(0, V, (B, L))
    calls = []
    head.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    h = torch.randn(B, L, H, requires_grad=True)
    ref = token_logprobs(head(h), ids, 0.7)
    g_ref = torch.autograd.grad(ref.sum() + (ref ** 2).sum(), [h, head.weight])
    for chunks in (1, 4, 100):  # 100 > B*(L-1) positions: empty chunks still call the head
        calls.clear()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = hidden_token_logprobs(h, head, ids, 0.7, num_chunks=chunks)
        assert torch.allclose(out, ref, atol=1e-6)
        assert not [s for s in saved if s and s[-1] == V], "logits kept for backward"
        assert len(calls) == chunks
        g = torch.autograd.grad(out.sum() + (out ** 2).sum(), [h, head.weight])
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g, g_ref))
        assert len(calls) == 2 * chunks  # backward recomputed each chunk's logits
    with torch.no_grad():
        calls.clear()
        assert torch.allclose(hidden_token_logprobs(h, head, ids, 0.7, num_chunks=3), ref, atol=1e-6)
        assert len(calls) == 3


def test_policy_wrapper_is_the_hf_model():
    lm = AutoModelForCausalLM.from_pretrained(POLICY, dtype=torch.float32)
    wrapper = PolicyLogProbs(lm, temperature=0.8)
    assert list(wrapper.state_dict()) == list(lm.state_dict())
    assert [n for n, _ in wrapper.named_parameters()] == [n for n, _ in lm.named_parameters()]
    ids = torch.randint(3, 100, (2, 12))
    attn = torch.ones_like(ids)
    attn[1, 8:] = 0
    out = wrapper(ids, attn, num_chunks=3)
    ref = token_logprobs(lm(input_ids=ids, attention_mask=attn).logits, ids, 0.8)
    on = attn[:, 1:] > 0
    assert torch.allclose(out[on], ref[on], atol=1e-5)
    g = torch.autograd.grad(out[on].sum(), list(lm.parameters()))
    g_ref = torch.autograd.grad(ref[on].sum(), list(lm.parameters()))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g, g_ref))


def test_split_by_tokens_respects_the_padded_budget():
    batch = {"input_ids": [[1] * n for n in (3, 5, 2, 9, 4)], "x": list("abcde")}
    assert split_by_tokens(batch, 0) == [batch]
    parts = split_by_tokens(batch, 10)
    assert [p["x"] for p in parts] == [["a", "b"], ["c"], ["d"], ["e"]]  # 2x5, 1x2 (+9 would be 18), 9 alone
    assert [p["x"] for p in split_by_tokens(batch, 100)] == [list("abcde")]
    assert split_by_tokens({"input_ids": [], "x": []}, 10) == []


def test_prune_checkpoints_keeps_the_newest_tags(tmp_path):
    for v in (1, 2, 9, 10, 11):
        (tmp_path / f"step{v}").mkdir()
    (tmp_path / "final").mkdir()
    (tmp_path / "latest").write_text("step11")
    assert prune_checkpoints(tmp_path, 0) == []
    assert sorted(prune_checkpoints(tmp_path, 2)) == ["step1", "step2", "step9"]  # by number: step10 > step9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "latest", "step10", "step11"]
    (tmp_path / "latest").write_text("step10")  # never the tag `latest` names
    (tmp_path / "step12").mkdir()
    assert prune_checkpoints(tmp_path, 1) == ["step11"]


# ---- real learners ----

def make_batch(seed: int, lengths=((5, 7), (4, 12), (6, 3)), inf_token: bool = False) -> dict:
    """Random (prompt, response) token ids, behaviour log-probs and advantages; response
    lengths differ so that ranks and micro-batches hold different numbers of tokens."""
    g = torch.Generator().manual_seed(seed)
    b = {k: [] for k in ("input_ids", "prompt_len", "policy_mask", "expert_mask", "behav_logp", "advantage", "version")}
    for i, (p, r) in enumerate(lengths):
        b["input_ids"].append(torch.randint(3, 100, (p + r,), generator=g).tolist())
        b["prompt_len"].append(p)
        b["policy_mask"].append([int(x) for x in (torch.rand(r, generator=g) > 0.2)])
        b["expert_mask"].append([1 - m for m in b["policy_mask"][-1]])
        b["behav_logp"].append((-4.7 + torch.randn(r, generator=g)).tolist())  # the tiny models: ~log(1/106)
        b["advantage"].append(float(torch.randn((), generator=g)))
        b["version"].append(0)
    if inf_token:
        b["policy_mask"][0][0], b["behav_logp"][0][0] = 1, float("-inf")
    return b


def reference_grads(model_dir: str, batch: dict, cfg, weights: dict | None = None) -> dict:
    """The whole batch in one process, full logits, the aggregation's own normaliser (Dr. GRPO:
    sequences x max_response_tokens): what every learner layout must reproduce. `weights`: the
    learners' current parameters (when earlier steps moved them from the checkpoint's)."""
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if weights is not None:
        missing = set(dict(lm.named_parameters())) - set(weights)
        assert not missing, missing
        lm.load_state_dict(weights, strict=False)
    b = collate(batch, AutoTokenizer.from_pretrained(model_dir).pad_token_id or 0)
    logp = token_logprobs(lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["input_ids"],
                          cfg.rollout.temperature)
    denom = len(batch["input_ids"]) * cfg.rollout.max_response_tokens if cfg.loss.agg == "seq-mean-token-sum-norm" else None
    loss, _ = policy_loss(logp, logp.detach(), b["behav_logp"], b["advantage"], b["policy_mask"], cfg.loss, denom)
    loss = loss + cfg.algo.expert_sft_coef * sft_loss(logp, b["expert_mask"])
    names, params = zip(*lm.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params)))


def capture_steps(self):
    """Replace engine.step: record the (rank-averaged, unclipped) gradients, step nothing."""
    self.captured = []

    def step(*args, **kwargs):
        self.captured.append({n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                              for n, p in self.engine.module.named_parameters()})
        self.engine.zero_grad()
    self.engine.step = step


def real_steps(self):
    del self.engine.step


def set_cfg(self, section: str, **kv):
    for k, v in kv.items():
        setattr(getattr(self.cfg, section), k, v)


def call_all(group, fn, *args, **kwargs):
    import ray
    return ray.get([a.__ray_call__.remote(fn, *args, **kwargs) for a in group.actors], timeout=HANG_S)


def train(group, per_rank_boxes):
    """Each rank's train_step with its own box list (the group passes the same one to all)."""
    import ray
    return ray.get([a.train_step.remote(bx) for a, bx in zip(group.actors, per_rank_boxes)], timeout=HANG_S)


def assert_grads_close(got: dict, ref: dict):
    assert got.keys() == ref.keys()
    for n in ref:
        # float32 sums in another order (gloo's all-reduce, micro-batches): entries near zero differ by a
        # few ulps of the tensor's largest entry (3e-7 on a [-2e-3, 2e-3] tensor seen on one machine)
        atol = max(1e-7, 1e-3 * float(ref[n].abs().max()))
        assert torch.allclose(got[n], ref[n], rtol=1e-3, atol=atol), (n, (got[n] - ref[n]).abs().max())


@pytest.fixture(scope="module")
def zero0(ray_local):
    """2 learners, ZeRO-0, gradient checkpointing on, the bundled tiny policy."""
    from eapo_ray.learner.group import LearnerGroup

    cfg = load_config(None, ["learner.num_learners=2", "learner.gradient_checkpointing=true", "learner.lr=1e-2",
                             "algo.expert_sft_coef=0.1"])
    group = LearnerGroup(cfg, "correct0")
    try:
        group.setup()
        yield cfg, group
    finally:
        group.shutdown()


@pytest.mark.slow
def test_checkpointing_is_active_in_the_learner(zero0):
    cfg, group = zero0

    def watch(self):
        self.layer_calls = []
        model = getattr(self, "model", self.engine.module)  # the HF model
        layer = model.model.layers[0]  # a pre-hook: recomputation may stop before the layer's end
        layer.register_forward_pre_hook(lambda m, i: self.layer_calls.append(torch.is_grad_enabled()))
        return model.training, model.is_gradient_checkpointing

    assert call_all(group, watch) == [(True, True)] * 2
    import ray
    call_all(group, capture_steps)
    group.train_step([BufferItem(0, [ray.put(make_batch(0))], 3)])
    # epochs=1, minibatches=1: one forward with autograd, and its recomputation in backward
    assert call_all(group, lambda self: sum(self.layer_calls)) == [2, 2]


@pytest.mark.slow
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_two_learners_on_an_uneven_split_give_the_whole_batch_gradient(zero0, agg):
    """3 samples over 2 ranks (2 + 1, different token counts): the averaged gradient equals the
    1-process gradient of the whole batch; so does it with a token budget forcing 2 micro-batches
    on rank 0 and a dummy one on rank 1, with one optimizer step."""
    import ray
    cfg, group = zero0
    cfg.loss.agg = agg
    batch = make_batch(1)
    ref = reference_grads(POLICY, batch, cfg)
    call_all(group, set_cfg, "loss", agg=agg)
    call_all(group, capture_steps)
    for budget in (0, 20):
        call_all(group, set_cfg, "learner", max_tokens_per_microbatch=budget)
        stats = train(group, [[[ray.put(batch)]]] * 2)
        assert [s["learner_samples"] for s in stats] == [2, 1]
        captured = call_all(group, lambda self: self.captured)
        assert [len(c) for c in captured] == [1, 1]  # one optimizer step for the minibatch
        for c in captured:
            assert_grads_close(c[0], ref)
        call_all(group, capture_steps)
    call_all(group, set_cfg, "learner", max_tokens_per_microbatch=0)
    call_all(group, set_cfg, "loss", agg="token-mean")
    cfg.loss.agg = "token-mean"


@pytest.mark.slow
def test_ranks_agree_on_lost_batches_and_skip_globally_empty_minibatches(zero0):
    import ray
    cfg, group = zero0

    @ray.remote(num_cpus=0)
    class Owner:
        def put(self, x):
            return [ray.put(x)]

    owner = Owner.remote()
    dead = ray.get(owner.put.remote(make_batch(2)))
    ray.kill(owner)
    for _ in range(100):  # until the cluster knows the batch's owner is gone
        try:
            ray.get(dead[0], timeout=5)
            time.sleep(0.2)
        except ray.exceptions.OwnerDiedError:
            break
    else:
        pytest.fail("the killed owner's object is still readable")
    good, other = [ray.put(make_batch(2))], [ray.put(make_batch(3))]
    call_all(group, capture_steps)
    # rank 1 lost the only batch rank 0 got: both skip (before: rank 0 trained alone and hung)
    stats = train(group, [[good], [dead]])
    assert [(s["lost_batches"], s["learner_samples"]) for s in stats] == [(1, 0), (1, 0)]
    # rank 1 lost the second batch: both train on the first one only
    stats = train(group, [[other, good], [other, dead]])
    assert [(s["lost_batches"], s["learner_samples"]) for s in stats] == [(1, 2), (1, 1)]
    assert call_all(group, lambda self: len(self.captured)) == [1, 1]
    # 2 samples, 2 ranks, 2 minibatches: each rank's first minibatch is empty -> one step, not two
    call_all(group, set_cfg, "learner", minibatches=2)
    call_all(group, capture_steps)
    train(group, [[[ray.put(make_batch(4, lengths=((5, 7), (4, 12))))]]] * 2)
    assert call_all(group, lambda self: len(self.captured)) == [1, 1]
    call_all(group, set_cfg, "learner", minibatches=1)


@pytest.mark.slow
def test_epochs_keep_pi_old_and_a_minus_inf_behaviour_logp_is_harmless(zero0):
    """Two epochs with real steps (lr 1e-2): the second epoch's ratio pi/pi_old moves away from 1
    (clipping happens), which it cannot if pi_old were recomputed each epoch; a token with
    behaviour log-prob -inf is dropped, not a NaN in the weights."""
    import ray
    cfg, group = zero0
    call_all(group, real_steps)
    call_all(group, set_cfg, "learner", epochs=2)
    stats = group.train_step([BufferItem(0, [ray.put(make_batch(5, inf_token=True))], 3)])
    call_all(group, set_cfg, "learner", epochs=1)
    assert stats["clip_frac"] > 0
    assert stats["dropped_frac"] > 0 and math.isfinite(stats["kl_behav"])
    assert math.isfinite(stats["behav_gap_max"]) and stats["behav_gap_max"] >= stats["behav_gap_mean"] > 0
    version, box, _ = group.publish()
    assert all(torch.isfinite(t).all() for t in ray.get(box[0]).values())


def partitioned_model(path) -> str:
    """A small Llama whose weights ZeRO-3 really partitions (each over 1e5 elements, DeepSpeed's
    default persistence threshold; the bundled tiny model's all stay whole), untied lm_head."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=384, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=96, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(POLICY).save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_zero3_empty_shards_micro_batches_and_checkpoint_pruning(ray_local, tmp_path):
    ray = ray_local
    from eapo_ray.learner.group import LearnerGroup

    model = partitioned_model(tmp_path / "model")
    cfg = load_config(None, ["learner.num_learners=2", "learner.zero_stage=3", "learner.gradient_checkpointing=true",
                             f"model.policy={model}", "learner.checkpoint_keep=2"])
    group = LearnerGroup(cfg, "correct3")
    try:
        group.setup()
        call_all(group, lambda self: [g.__setitem__("lr", 0.0) for g in self.engine.optimizer.param_groups])

        def norm(self):
            return float(self.engine.get_global_grad_norm())

        # one sample: one rank's shard is empty and runs a dummy forward/backward
        stats = train(group, [[[ray.put(make_batch(6, lengths=((5, 7),)))]]] * 2)
        assert [s["learner_samples"] for s in stats] == [0, 1]  # round(0.5) == 0: rank 0's shard is empty
        # the global gradient (its norm, read under ZeRO-3) with and without micro-batching
        batch = make_batch(7)
        ref = reference_grads(model, batch, cfg)
        ref_norm = torch.sqrt(sum((g ** 2).sum() for g in ref.values())).item()
        for budget in (0, 20):
            call_all(group, set_cfg, "learner", max_tokens_per_microbatch=budget)
            call_all(group, lambda self: setattr(self.engine, "_global_grad_norm", None))  # no stale norm
            train(group, [[[ray.put(batch)]]] * 2)
            assert call_all(group, norm) == pytest.approx([ref_norm] * 2, rel=1e-4)
        # two epochs of two minibatches, micro-batched, empty and dummy passes mixed: finishes
        call_all(group, set_cfg, "learner", epochs=2, minibatches=2)
        train(group, [[[ray.put(make_batch(8, lengths=((5, 7), (4, 12), (6, 3), (3, 20), (4, 4))))]]] * 2)
        # checkpoints (after a real step, so the weights differ from the model's): the newest two tags stay
        call_all(group, lambda self: [g.__setitem__("lr", 1e-3) for g in self.engine.optimizer.param_groups])
        train(group, [[[ray.put(batch)]]] * 2)
        for version in (3, 4, 5):
            call_all(group, lambda self, v: setattr(self, "version", v), version)
            group.save(str(tmp_path / "run"))
        ckpt = tmp_path / "run" / "checkpoint"
        assert sorted(p.name for p in ckpt.glob("step*")) == ["step4", "step5"]
        assert (ckpt / "latest").read_text() == "step5"
        weights = ray.get(group.publish().box[0])
    finally:
        group.shutdown()
    # a new group resumes from the newest tag: same version, same weights
    group = LearnerGroup(cfg, "correct3-resumed")
    try:
        assert group.setup(str(ckpt)) == 5
        resumed = ray.get(group.publish().box[0])
        assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)
        assert not torch.equal(weights["lm_head.weight"], LlamaForCausalLM.from_pretrained(model).lm_head.weight)
    finally:
        group.shutdown()


def test_shared_prompt_forward_is_the_plain_forward_and_a_mismatch_turns_it_off():
    """learner.share_prompts' set-up check (learner.sharing_agrees) passes for the bundled Llama, a
    grouped-query Llama and a Qwen2 (attention bias), at a sampling temperature; a shared forward that
    is off by 1e-3, or raises, fails it (the learner then trains the plain way)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from eapo_ray.learner.forward import sharing_agrees

    torch.manual_seed(0)
    small = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    models = [AutoModelForCausalLM.from_pretrained(POLICY, dtype=torch.float32),
              LlamaForCausalLM(LlamaConfig(**small, num_key_value_heads=2)),
              Qwen2ForCausalLM(Qwen2Config(**small, num_key_value_heads=2))]
    for lm in models:
        lm.train()
        assert sharing_agrees(PolicyLogProbs(lm, 0.8), lm.config.vocab_size), type(lm).__name__
    wrapper = PolicyLogProbs(models[0], 1.0)
    good = wrapper.shared_forward
    wrapper.shared_forward = lambda **kw: [x + 1e-3 for x in good(**kw)]
    assert not sharing_agrees(wrapper, 106)

    def broken(**kw):
        raise TypeError("this model takes no past_key_values")
    wrapper.shared_forward = broken
    assert not sharing_agrees(wrapper, 106)


def test_shared_forward_feeds_no_response_last_position_and_matches_the_plain_forward():
    """shared_forward does not feed a response's last token (its hidden state would score nothing):
    a bucket of [B, R] responses puts B x (R - 1) tokens through the model after the prompt pass, a
    bucket of one-token responses none at all, and every response token's log-prob (and the gradient
    of their sum) is still the plain forward's."""
    from eapo_ray.algo.batching import collate_prompts, collate_responses, split_shared

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(POLICY, dtype=torch.float32)
    wrapper = PolicyLogProbs(lm, 0.8)
    g = torch.Generator().manual_seed(1)
    tok = lambda n: torch.randint(3, 106, (n,), generator=g).tolist()  # noqa: E731
    prompts, lens = [tok(9), tok(5)], [(0, 1), (1, 1), (0, 6), (1, 5), (0, 6)]
    batch = {"input_ids": [prompts[i] + tok(n) for i, n in lens], "prompt_len": [len(prompts[i]) for i, _ in lens]}
    batch.update(policy_mask=[[1] * n for _, n in lens], expert_mask=[[0] * n for _, n in lens],
                 behav_logp=[[0.0] * n for _, n in lens], advantage=[0.0] * len(lens), row=list(range(len(lens))))
    uniq, parts = split_shared(batch, min_rows=2)
    assert sorted(len(b["row"]) for b in parts) == [2, 3]  # a bucket of one-token responses and one of 5-6
    cols = [collate_responses(b) for b in parts]
    fed = []
    hook = wrapper.model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        got = wrapper(shared={**collate_prompts(uniq), "buckets": cols})
    finally:
        hook.remove()
    assert fed[0] == (2, 9)  # the prompts, once each
    assert sorted(fed[1:]) == [(3, 5)]  # the 5-6 token bucket without its last position; the 1-token one: nothing
    b = collate(batch)
    plain = wrapper(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    ours, theirs = [], []
    for x, lp in zip(parts, got):
        for i, (row, r) in enumerate(zip(x["row"], x["response_ids"])):
            p = batch["prompt_len"][row]
            ours.append(lp[i, :len(r)])
            theirs.append(plain[row, p - 1:p - 1 + len(r)])
    assert torch.allclose(torch.cat(ours), torch.cat(theirs), atol=1e-5)
    g1 = torch.autograd.grad(torch.cat(ours).sum(), list(lm.parameters()))
    g2 = torch.autograd.grad(torch.cat(theirs).sum(), list(lm.parameters()))
    for a, c in zip(g1, g2):
        assert (a - c).abs().max() <= 1e-5 * c.abs().max()  # float order aside


def test_share_prompts_is_refused_for_sliding_windows_and_length_dependent_rope():
    """Cold review: with a sliding window the prompt's right padding would sit inside the window (and the
    model's own cache keeps only the window of a long prompt); rope rescaled by the sequence length sees
    the prompt alone. The set-up check's short sequences cannot notice either, so such configs are refused."""
    from transformers import MistralConfig, Qwen2Config

    from eapo_ray.learner.forward import unshareable

    assert unshareable(LlamaConfig()) is None and unshareable(Qwen2Config()) is None
    from transformers import AutoConfig

    assert unshareable(AutoConfig.from_pretrained(POLICY)) is None
    assert unshareable(LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})) is None
    assert "sliding" in unshareable(Qwen2Config(use_sliding_window=True, sliding_window=64))
    assert "sliding_window=4096" in unshareable(MistralConfig())
    assert "dynamic" in unshareable(LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))


def make_group_batch(seed: int, prompts: int = 3, group: int = 4) -> dict:
    """`make_batch` with GRPO groups: `group` samples per prompt, responses of spread lengths."""
    g = torch.Generator().manual_seed(seed)
    heads = [torch.randint(3, 100, (4 + 2 * k,), generator=g).tolist() for k in range(prompts)]
    b = make_batch(seed, lengths=[(len(heads[k]), 2 + (5 * (k * group + j)) % 23) for k in range(prompts)
                                  for j in range(group)])
    for i, p in enumerate(b["prompt_len"]):
        b["input_ids"][i][:p] = heads[i // group]
    return b


@pytest.mark.slow
def test_shared_prompts_give_the_whole_batch_gradient_and_the_same_statistics(zero0):
    """learner.share_prompts: 3 prompts x 4 samples over 2 ranks (a group split between them), each
    distinct prompt computed once per rank: the gradient is the whole batch's (the reference), the
    loss statistics equal the plain length buckets', and fewer tokens go through the model."""
    import ray
    cfg, group = zero0
    batch = make_group_batch(7)
    weights = call_all(group, lambda self: {n: p.detach().clone() for n, p in self.engine.module.named_parameters()})[0]
    ref = reference_grads(POLICY, batch, cfg, weights)
    assert call_all(group, lambda self: self.share_prompts) == [False, False]  # activation checkpointing is on here

    def share(self, on: bool):  # the prompt pass needs its keys/values: no activation checkpointing
        self.share_prompts = on
        (self.model.gradient_checkpointing_disable if on else self.model.gradient_checkpointing_enable)()
    out = {}
    try:
        for on in (False, True):
            call_all(group, share, on)
            call_all(group, capture_steps)
            stats = train(group, [[[ray.put(batch)]]] * 2)
            for c in call_all(group, lambda self: self.captured):
                assert len(c) == 1
                assert_grads_close(c[0], ref)
            assert stats[0]["old_logp_s"] == 0.0
            out[on] = stats
    finally:
        call_all(group, share, False)
    for k in ("loss", "clip_frac", "kept_tokens", "is_weight_mean", "kl_behav", "expert_sft_loss", "behav_gap_max",
              "behav_gap_mean"):
        assert out[True][0][k] == pytest.approx(out[False][0][k], rel=1e-5, abs=1e-6), k
    for r in range(2):
        assert 0 < out[True][r]["forward_tokens"] < out[False][r]["forward_tokens"]
        assert (out[True][r]["share_prompts"], out[False][r]["share_prompts"]) == (1, 0)
    # one sample over 2 ranks: rank 1's shard is empty, its dummy pass joins the gradient reduction
    one = {k: v[:1] for k, v in batch.items()}
    ref = reference_grads(POLICY, one, cfg, weights)
    try:
        call_all(group, share, True)
        call_all(group, capture_steps)
        stats = train(group, [[[ray.put(one)]]] * 2)
        for c in call_all(group, lambda self: self.captured):
            assert_grads_close(c[0], ref)
        assert sorted(s["learner_samples"] for s in stats) == [0, 1]
        assert [s["forward_tokens"] == 0 for s in stats] == [s["learner_samples"] == 0 for s in stats]
    finally:
        call_all(group, share, False)


@pytest.mark.slow
def test_length_buckets_reuse_pi_old_and_give_the_whole_batch_gradient(zero0):
    """learner.length_buckets: 24 samples of spread lengths over 2 ranks train in several
    micro-batches of similar lengths, pi_old from their own forwards (no extra pass): the
    gradient is the whole batch's, and the loss statistics equal those of one padded pass."""
    import ray
    cfg, group = zero0
    lengths = [(3 + i % 5, 2 + (7 * i) % 40) for i in range(24)]
    batch = make_batch(6, lengths=lengths)
    # the reference at the learners' current weights: an earlier test in this module took real steps
    weights = call_all(group, lambda self: {n: p.detach().clone() for n, p in self.engine.module.named_parameters()})[0]
    ref = reference_grads(POLICY, batch, cfg, weights)
    out = {}
    for on in (False, True):
        call_all(group, set_cfg, "learner", length_buckets=on)
        call_all(group, capture_steps)
        stats = train(group, [[[ray.put(batch)]]] * 2)
        captured = call_all(group, lambda self: self.captured)
        assert [len(c) for c in captured] == [1, 1]  # one optimizer step
        for c in captured:
            assert_grads_close(c[0], ref)
        assert stats[0]["old_logp_s"] == 0.0  # pi_old reused, in both layouts
        out[on] = stats[0]
    for k in ("loss", "clip_frac", "kept_tokens", "is_weight_mean", "kl_behav", "expert_sft_loss"):
        assert out[True][k] == pytest.approx(out[False][k], rel=1e-5, abs=1e-7), k
    call_all(group, set_cfg, "learner", length_buckets=True)
