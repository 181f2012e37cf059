"""Off-policy-corrected GRPO-family policy loss.

Notation (EAPO.md): mu = behaviour policy (the rollout engine), pi_old = the learner's
recomputed policy before the update, pi = the current policy.
u = pi / pi_old (PPO ratio, clipped), w = pi_old / mu (importance weight, no gradient).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch

Correction = Literal["none", "tis", "decoupled", "icepop"]
Agg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
CORRECTIONS = typing.get_args(Correction)
AGGS = typing.get_args(Agg)


@dataclass
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.28
    correction: Correction = "decoupled"
    is_cap: float = 5.0
    is_low: float = 0.5
    is_high: float = 5.0
    agg: Agg = "token-mean"

    def __post_init__(self):
        if self.correction not in CORRECTIONS:
            raise ValueError(f"loss.correction must be one of {CORRECTIONS}, got {self.correction!r}")
        if self.agg not in AGGS:
            raise ValueError(f"loss.agg must be one of {AGGS}, got {self.agg!r}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"loss.clip_low must be in [0, 1) and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if not (0 < self.is_low <= self.is_high and self.is_cap > 0):
            raise ValueError(f"loss needs 0 < is_low <= is_high and is_cap > 0, got {self.is_low}, {self.is_high}, {self.is_cap}")


def log_importance(old_logp: torch.Tensor, behav_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log w = log pi_old - log mu per token, and where it is finite. A token whose behaviour
    log-prob is -inf or NaN has no usable weight: its log-ratio is set to 0 here (no inf reaches
    exp, hence no 0 * inf = NaN in a backward) and `kept_mask` drops it."""
    log_w = old_logp.detach() - behav_logp.detach()
    finite = torch.isfinite(log_w)
    return torch.where(finite, log_w, torch.zeros_like(log_w)), finite


def kept_mask(old_logp, behav_logp, mask, cfg: LossConfig) -> torch.Tensor:
    """The 0/1 [B, T] tokens that enter the loss: policy tokens with a finite importance weight
    w = pi_old / mu, inside the correction's trust region (decoupled: w <= is_cap, icepop:
    is_low <= w <= is_high). It depends on pi_old and mu only, so it is known before the update."""
    log_w, finite = log_importance(old_logp, behav_logp)
    w = torch.exp(log_w)
    keep = mask * finite.to(mask.dtype)
    if cfg.correction == "decoupled":
        keep = keep * (w <= cfg.is_cap).to(mask.dtype)
    elif cfg.correction == "icepop":
        keep = keep * ((w >= cfg.is_low) & (w <= cfg.is_high)).to(mask.dtype)
    return keep


def normaliser(keep: torch.Tensor, agg: str, max_len: int | None = None) -> torch.Tensor:
    """This batch's share of the aggregation's denominator; shares add up over micro-batches and
    data-parallel ranks, so the loss of a whole batch is sum(numerators) / sum(shares):
    token-mean: kept tokens; seq-mean-token-mean: sequences with a kept token;
    seq-mean-token-sum-norm (Dr. GRPO): sequences x a constant max_len (default: T)."""
    if agg == "token-mean":
        return keep.sum()
    if agg == "seq-mean-token-mean":
        return (keep.sum(dim=1) > 0).sum().to(keep.dtype)
    if agg == "seq-mean-token-sum-norm":
        n = keep.shape[0] * (keep.shape[1] if max_len is None else max_len)
        return torch.tensor(float(n), dtype=keep.dtype, device=keep.device)
    raise ValueError(f"unknown aggregation {agg!r}; expected one of {AGGS}")


def aggregate(per_token: torch.Tensor, keep: torch.Tensor, agg: str, denom=None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss over the kept tokens (`keep` is 0/1). `denom` is the
    normaliser of the whole batch this one is part of (see `normaliser`); None: this batch's own."""
    if denom is None:
        denom = normaliser(keep, agg).clamp(min=1)
    if agg in ("token-mean", "seq-mean-token-sum-norm"):
        return (per_token * keep).sum() / denom
    if agg == "seq-mean-token-mean":
        seq = (per_token * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)  # 0 for a sequence with none kept
        return seq.sum() / denom
    raise ValueError(f"unknown aggregation {agg!r}; expected one of {AGGS}")


def policy_loss(logp, old_logp, behav_logp, advantages, mask, cfg: LossConfig, denom=None):
    """All of logp/old_logp/behav_logp/mask are [B, T]; advantages [B] or [B, T]. `denom`: the
    aggregation's normaliser for the whole (global) batch, None for this batch alone.

    Returns (loss, stats) with stats as Python floats.
    """
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    old_logp, behav_logp = old_logp.detach(), behav_logp.detach()
    u = torch.exp(logp - old_logp)
    log_w, finite = log_importance(old_logp, behav_logp)
    w = torch.exp(log_w)
    unclipped = -u * adv
    clipped = -torch.clamp(u, 1 - cfg.clip_low, 1 + cfg.clip_high) * adv
    pg = torch.maximum(unclipped, clipped)

    keep = kept_mask(old_logp, behav_logp, mask, cfg)
    if cfg.correction == "none":
        scale = torch.ones_like(w)
    elif cfg.correction == "tis":
        scale = torch.clamp(w, max=cfg.is_cap)
    else:  # decoupled, icepop: w, inside the trust region on the kept tokens
        scale = w
    # Dropped tokens must not leak NaN/inf into the sum, nor into the gradient through 0 * inf
    # (torch.where passes a zero gradient to the branch it did not pick, and 0 * inf = NaN).
    scale = torch.where(keep > 0, scale, torch.zeros_like(scale))
    per_token = torch.where(keep > 0, scale * pg, torch.zeros_like(pg))
    loss = aggregate(per_token, keep, cfg.agg, denom)

    with torch.no_grad():
        n_mask, n_keep = mask.sum().clamp(min=1), keep.sum().clamp(min=1)
        w_on_mask = w[(mask > 0) & finite]
        stats = {
            "clip_frac": float(((clipped > unclipped).to(mask.dtype) * keep).sum() / n_keep),
            "is_weight_mean": float(w_on_mask.mean()) if w_on_mask.numel() else 1.0,
            "is_weight_max": float(w_on_mask.max()) if w_on_mask.numel() else 1.0,
            "dropped_frac": float((mask - keep).sum() / n_mask),
            "kl_behav": float((-log_w * keep).sum() / n_keep),
            "kept_tokens": float(keep.sum()),
            "policy_tokens": float(mask.sum()),
        }
    return loss, stats


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, denom=None, weight=None) -> torch.Tensor:
    """Negative log-likelihood of the tokens where `mask` is 1 (the auxiliary SFT term
    on accepted expert tokens); zero when there are none. `denom`: the number of such tokens
    in the whole (global) batch, None for this batch alone. `weight`: an optional per-sample
    [B] factor (the annealed coefficient of each sample: coef x the rho it was generated under)."""
    mask = mask.to(logp.dtype)
    n = mask.sum().clamp(min=1) if denom is None else denom
    if weight is not None:
        mask = mask * weight.to(logp.dtype)[:, None]
    return -(logp * mask).sum() / n


def luffy_loss(logp, expert_logp, advantages, mask, gamma: float = 0.1, denom=None):
    """The LUFFY-style channel (Yan et al. 2025, "Learning to Reason under Off-Policy
    Guidance"): the expert's answer tokens inside an episode are trained as off-policy
    actions in the policy-gradient loss, with their own importance ratio against the expert
    (their behaviour policy) and LUFFY's policy shaping in place of PPO clipping:

        r = pi(a) / pi_expert(a),   f(r) = r / (r + gamma),   loss_t = -f(r) A

    aggregated as a token-mean over the `mask` tokens (their own normaliser `denom`, the
    number of such tokens in the whole batch; None: this batch's own). Choices, written down:
    - pi_expert is the expert's own distribution at T=1 on its generated token (the Serve
      expert's `ExpertReply.token_logprobs`); where it is unknown (NaN: a tokenizer mismatch,
      an engine without log-probs) it is taken as 1 (log 0), LUFFY's own setting (pi_phi = 1),
      so r = pi there. The expert's tokens are near-deterministic (pi_expert ~ 1), so in
      practice r ~ pi and f ~ LUFFY's f(pi).
    - No clipping and no pi_old: f is bounded in [0, 1) and its gradient
      gamma r / (r + gamma)^2 x grad log pi is largest for tokens the policy finds unlikely
      (r ~ gamma), which is LUFFY's point: it keeps low-probability expert tokens learning.
    - A is the advantage of the episode the tokens were sampled in (the group-normalised
      reward of the whole policy+expert trajectory), as for that episode's policy tokens;
      an expert token in a failed episode gets pushed down, as in LUFFY's mixed groups.
    Returns (loss, stats) with stats as Python floats."""
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    elp = torch.nan_to_num(expert_logp.detach().to(logp.dtype), nan=0.0, posinf=0.0, neginf=0.0)
    on = mask > 0
    # off the mask the log-ratio is 0 (no inf reaches exp, no NaN through 0 * inf in backward)
    log_r = torch.where(on, (logp - elp).clamp(max=30.0), torch.zeros_like(logp))
    r = torch.exp(log_r)
    f = r / (r + gamma)
    per_token = torch.where(on, -f * adv, torch.zeros_like(f))
    n = mask.sum().clamp(min=1) if denom is None else denom
    loss = per_token.sum() / n
    with torch.no_grad():
        k = mask.sum().clamp(min=1)
        stats = {"luffy_tokens": float(mask.sum()), "luffy_shaped_mean": float((f * mask).sum() / k),
                 "luffy_ratio_mean": float((r * mask).sum() / k),
                 "luffy_unknown_frac": float((torch.isnan(expert_logp) & on).sum() / k)}
    return loss, stats
