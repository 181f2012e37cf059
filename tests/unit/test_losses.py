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
