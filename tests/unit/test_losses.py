"""policy_loss against a per-token, hand-written reference (values and gradients)."""
import math

import pytest
import torch

from eapo_ray.algo.losses import LossConfig, kept_mask, normaliser, policy_loss, sft_loss


def reference(logp, old, behav, adv, mask, cfg):
    """Loops over tokens in plain Python floats. Returns (loss, dloss/dlogp, kept)."""
    B, T = logp.shape
    adv = adv if adv.dim() == 2 else adv[:, None].expand(B, T)
    per, grad_num, kept = {}, {}, {}
    for i in range(B):
        for j in range(T):
            if mask[i, j] == 0:
                continue
            u = math.exp(logp[i, j] - old[i, j])
            w = math.exp(old[i, j] - behav[i, j])
            a = float(adv[i, j])
            lo, hi = 1 - cfg.clip_low, 1 + cfg.clip_high
            unclipped, clipped = -u * a, -min(max(u, lo), hi) * a
            pg = max(unclipped, clipped)
            # d pg / d logp: the unclipped branch (or a clipped one still inside the range) moves with u
            dpg = -u * a if (unclipped >= clipped or lo <= u <= hi) else 0.0
            if cfg.correction == "none":
                scale, keep = 1.0, True
            elif cfg.correction == "tis":
                scale, keep = min(w, cfg.is_cap), True
            elif cfg.correction == "decoupled":
                scale, keep = w, w <= cfg.is_cap
            else:
                scale, keep = w, cfg.is_low <= w <= cfg.is_high
            if keep:
                per[i, j], grad_num[i, j] = scale * pg, scale * dpg
                kept[i, j] = 1
    grad = torch.zeros(B, T, dtype=torch.float64)
    if cfg.agg == "token-mean":
        n = max(1, len(per))
        loss = sum(per.values()) / n
        for k, g in grad_num.items():
            grad[k] = g / n
    elif cfg.agg == "seq-mean-token-sum-norm":
        loss = sum(per.values()) / (B * T)
        for k, g in grad_num.items():
            grad[k] = g / (B * T)
    else:
        seqs = sorted({i for i, _ in per})
        loss = 0.0
        for i in seqs:
            toks = [k for k in per if k[0] == i]
            loss += sum(per[k] for k in toks) / len(toks) / len(seqs)
            for k in toks:
                grad[k] = grad_num[k] / len(toks) / len(seqs)
    return loss, grad, kept


def random_case(seed, adv_dims=1, B=4, T=7, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 * spread
    behav = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 1.0 * spread
    adv = torch.randn((B,) if adv_dims == 1 else (B, T), generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[0] = 0  # one sequence with no policy tokens
    return logp, old, behav, adv, mask


@pytest.mark.parametrize("correction", ["none", "tis", "decoupled", "icepop"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seed,adv_dims", [(0, 1), (1, 2), (2, 1)])
def test_value_and_gradient_match_reference(correction, agg, seed, adv_dims):
    cfg = LossConfig(correction=correction, agg=agg, is_cap=2.0, is_low=0.5, is_high=2.0)
    logp, old, behav, adv, mask = random_case(seed, adv_dims)
    x = logp.clone().requires_grad_(True)
    loss, stats = policy_loss(x, old, behav, adv, mask, cfg)
    loss.backward()
    ref_loss, ref_grad, kept = reference(logp, old, behav, adv, mask, cfg)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    assert torch.allclose(x.grad, ref_grad, atol=1e-10)
    n_mask = int(mask.sum())
    assert stats["dropped_frac"] == pytest.approx((n_mask - len(kept)) / n_mask)


def test_drops_leave_denominator_and_stats():
    cfg = LossConfig(correction="decoupled", is_cap=5.0)
    logp = torch.zeros(1, 3, requires_grad=True)
    old = torch.zeros(1, 3)
    behav = torch.tensor([[0.0, -10.0, 0.0]])  # w = e^10 on the middle token: dropped
    loss, st = policy_loss(logp, old, behav, torch.tensor([1.0]), torch.ones(1, 3), cfg)
    assert loss.item() == pytest.approx(-1.0)  # mean of the two kept tokens, each -1
    assert st["dropped_frac"] == pytest.approx(1 / 3)
    assert st["is_weight_max"] == pytest.approx(math.exp(10), rel=1e-4)
    assert st["kl_behav"] == pytest.approx(0.0)
    loss.backward()
    assert logp.grad[0, 1] == 0


def test_clip_frac_and_on_policy_ratio():
    cfg = LossConfig(correction="none")
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.5, 0.0], [-0.5, 0.0]], requires_grad=True)  # u = e^.5 > 1.28, e^-.5 < 0.8
    loss, st = policy_loss(logp, old, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2), cfg)
    assert st["clip_frac"] == pytest.approx(0.5)  # both off-ratio tokens are clipped
    assert st["is_weight_mean"] == pytest.approx(1.0)


def test_all_dropped_gives_zero_with_graph():
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), torch.zeros(1, 2), LossConfig())
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(1, 2))


def test_sft_loss_and_config_errors():
    logp = torch.log(torch.tensor([[0.5, 0.25, 1.0]]))
    assert sft_loss(logp, torch.tensor([[1, 1, 0]])).item() == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)
    assert sft_loss(logp, torch.zeros(1, 3)).item() == 0.0
    with pytest.raises(ValueError, match="correction"):
        LossConfig(correction="vtrace")
    with pytest.raises(ValueError, match="agg"):
        LossConfig(agg="sum")


@pytest.mark.parametrize("correction", ["none", "tis", "decoupled", "icepop"])
def test_nonfinite_behaviour_logp_is_dropped_without_nan(correction):
    """A -inf behaviour log-prob (w = inf) is dropped from the loss; no 0 * inf = NaN reaches
    the gradient through the branch torch.where did not pick."""
    cfg = LossConfig(correction=correction, is_cap=5.0, is_low=0.5, is_high=5.0)
    logp = torch.zeros(1, 3, requires_grad=True)
    behav = torch.tensor([[0.0, float("-inf"), 0.0]])
    loss, st = policy_loss(logp, torch.zeros(1, 3), behav, torch.tensor([1.0]), torch.ones(1, 3), cfg)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0 and logp.grad[0, 0] != 0
    assert loss.item() == pytest.approx(-1.0)  # the mean over the two finite tokens
    assert st["dropped_frac"] == pytest.approx(1 / 3)
    assert all(math.isfinite(v) for v in st.values())


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_global_normaliser_splits_into_parts_exactly(agg):
    """Rows split unevenly over ranks or micro-batches, each part normalised by the summed
    `normaliser` of all parts, add up to the whole batch's loss and gradient. Dr. GRPO's
    normaliser is sequences x a constant length, not the padded width."""
    cfg = LossConfig(correction="decoupled", agg=agg, is_cap=2.0)
    logp, old, behav, adv, mask = random_case(3, B=5, T=6)
    max_len = 9 if agg == "seq-mean-token-sum-norm" else None
    parts = [slice(0, 1), slice(1, 4), slice(4, 5)]
    keeps = [kept_mask(old[s], behav[s], mask[s], cfg) for s in parts]
    denom = sum(normaliser(k, agg, max_len) for k in keeps)
    x = logp.clone().requires_grad_(True)
    whole, _ = policy_loss(x, old, behav, adv, mask, cfg, denom=denom)
    (g_whole,) = torch.autograd.grad(whole, x)
    total = sum(policy_loss(x[s], old[s], behav[s], adv[s], mask[s], cfg, denom=denom)[0] for s in parts)
    (g_parts,) = torch.autograd.grad(total, x)
    assert total.item() == pytest.approx(whole.item(), rel=1e-12)
    assert torch.allclose(g_parts, g_whole, atol=1e-14)
    if agg == "seq-mean-token-sum-norm":
        assert float(denom) == 5 * 9
    else:  # the whole batch's own normaliser: the single-process loss
        assert whole.item() == pytest.approx(policy_loss(x, old, behav, adv, mask, cfg)[0].item(), rel=1e-12)
    assert sft_loss(logp, mask, denom=4.0).item() == pytest.approx(-(logp * mask).sum().item() / 4)


def test_luffy_loss_value_gradient_and_unknown_expert_logp():
    """loss = -mean over expert tokens of f(r) A, r = pi / pi_expert, f(r) = r / (r + gamma);
    d/dlogpi = -A gamma r / (r + gamma)^2; NaN expert log-probs count as pi_expert = 1; tokens off
    the mask get no gradient and no NaN even where their log-probs are -inf."""
    from eapo_ray.algo.losses import luffy_loss

    logp = torch.tensor([[-0.5, -2.0, -float("inf")], [-1.0, -3.0, -0.1]], requires_grad=True)
    elogp = torch.tensor([[-0.1, float("nan"), 0.0], [-0.2, -0.05, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = torch.tensor([1.5, -0.5])
    gamma = 0.1
    loss, st = luffy_loss(logp, elogp, adv, mask, gamma)
    loss.backward()
    ref, grad = 0.0, torch.zeros(2, 3)
    for (i, j), e in zip([(0, 0), (0, 1), (1, 0), (1, 1)], [-0.1, 0.0, -0.2, -0.05]):
        r = math.exp(logp[i, j].item() - e)
        ref += -r / (r + gamma) * adv[i].item() / 4
        grad[i, j] = -adv[i].item() * gamma * r / (r + gamma) ** 2 / 4
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    assert torch.allclose(logp.grad, grad, atol=1e-7)
    assert torch.isfinite(logp.grad).all()
    assert st["luffy_tokens"] == 4 and st["luffy_unknown_frac"] == pytest.approx(0.25)
    # a global denominator divides the same numerator
    loss2, _ = luffy_loss(logp.detach(), elogp, adv, mask, gamma, denom=8.0)
    assert loss2.item() == pytest.approx(ref / 2, rel=1e-6)
    # shaping: against the unshaped ratio's gradient (r A per log-prob), a low-probability
    # token's gradient is amplified (x ~10 at pi = e^-6) and a near-certain one's damped; in
    # log-prob space the gradient peaks at r = gamma
    lp = torch.tensor([[-6.0, -0.01, math.log(gamma)]], requires_grad=True)
    luffy_loss(lp, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3), gamma)[0].backward()
    gain = -lp.grad[0] * 3 / lp.detach().exp()[0]
    assert gain[0] > 9 and gain[1] < 0.1
    assert -lp.grad[0, 2] > max(-lp.grad[0, 0], -lp.grad[0, 1])


def test_sft_loss_per_sample_weight():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]]))
    mask = torch.tensor([[1, 1], [1, 0]])
    w = torch.tensor([1.0, 0.0])  # the second sample was generated with rho = 0
    assert sft_loss(logp, mask, weight=w).item() == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 3)
    assert sft_loss(logp, mask, denom=6.0, weight=w * 2).item() == pytest.approx(
        -2 * (math.log(0.5) + math.log(0.25)) / 6)


def test_learner_anneals_sft_with_each_samples_behaviour_rho_and_adds_luffy_term():
    """The learner's loss: the SFT coefficient comes from the rho each sample was generated
    under (batch column accept_prob), not from the learner's version (old code: rho at
    self.version, here 0 at version 100, so the samples generated at rho = 1 got no SFT);
    expert_token_channel=luffy adds luffy_coef x luffy_loss over the expert tokens."""
    from eapo_ray.algo.losses import luffy_loss
    from eapo_ray.config import load_config
    from eapo_ray.learner.actor import Learner
    from eapo_ray.learner.stats import StepStats

    def loss_of(overrides, b, logp):
        lr = object.__new__(Learner)
        lr.cfg = load_config(None, ["acceptance.kind=linear", "acceptance.total_steps=30"] + overrides)
        lr.version = 100  # rho(100) = 0 under the schedule
        acc = StepStats(sft=lr.cfg.algo.expert_sft_coef > 0, luffy=lr.cfg.algo.expert_token_channel == "luffy")
        return lr._loss(b, logp, logp.detach(), {"policy": 2.0, "sft": 3.0, "luffy": 3.0}, acc), acc

    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(2, 4, generator=g) - 0.1
    b = {"behav_logp": logp.clone(), "advantage": torch.tensor([1.0, -1.0]),
         "policy_mask": torch.tensor([[1.0, 0, 0, 1], [1, 0, 0, 0]]),
         "expert_mask": torch.tensor([[0.0, 1, 1, 0], [0, 1, 0, 0]]),
         "expert_logp": torch.tensor([[0.0, -0.2, float("nan"), 0], [0, -0.1, 0, 0]]),
         "accept_prob": torch.tensor([1.0, 0.5])}
    base, _ = loss_of([], b, logp)
    sft, _ = loss_of(["algo.expert_sft_coef=0.4", "algo.expert_sft_anneal=true"], b, logp)
    nll = -(logp[0, 1] + logp[0, 2]) * 0.4 * 1.0 - logp[1, 1] * 0.4 * 0.5
    assert (sft - base).item() == pytest.approx(nll.item() / 3.0, rel=1e-5)
    luffy, acc = loss_of(["algo.expert_token_channel=luffy", "algo.luffy_coef=0.5"], b, logp)
    lf, _ = luffy_loss(logp, b["expert_logp"], b["advantage"], b["expert_mask"], 0.1, denom=3.0)
    assert (luffy - base).item() == pytest.approx(0.5 * lf.item(), rel=1e-5)
    assert acc.sums["luffy_tokens"] == 3


def test_luffy_normaliser_counts_only_the_tokens_luffy_trains():
    """The LUFFY term is a token-mean over the expert tokens it trains: those of samples the
    overlong filter kept. A filtered sample (policy mask all 0) keeps its expert tokens in the
    SFT count but not in LUFFY's (cold review: the old code divided LUFFY's sum by the SFT count,
    shrinking the term by the share of expert tokens in filtered samples)."""
    from eapo_ray.config import load_config
    from eapo_ray.learner.actor import Learner

    lr = object.__new__(Learner)
    lr.cfg = load_config(None, ["algo.expert_token_channel=luffy"])
    lr.world_size, lr.version = 1, 0
    lr._all_reduce = lambda xs, op=None: list(xs)
    logp = -torch.rand(2, 4, generator=torch.Generator().manual_seed(0)) - 0.1
    b = {"behav_logp": logp.clone(), "version": torch.tensor([0, 0]),
         "policy_mask": torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0]]),  # sample 1: overlong, filtered
         "expert_mask": torch.tensor([[0.0, 1, 1, 0], [0, 1, 1, 1]])}
    norms, _ = lr._normalisers([[b]], [[logp]])
    assert norms[0]["sft"] == 5.0 and norms[0]["luffy"] == 2.0


def test_expert_token_channel_config():
    from eapo_ray.config import ConfigError, load_config

    assert load_config(None).algo.expert_token_channel == "masked"  # the paper's default
    for bad in ("algo.expert_token_channel=sft", "algo.luffy_gamma=0", "algo.luffy_coef=-1"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])
