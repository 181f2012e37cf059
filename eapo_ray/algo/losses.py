"""Off-policy-corrected GRPO-family policy loss.

Notation (EAPO.md): mu = behaviour policy (the rollout engine), pi_old = the learner's
recomputed policy before the update, pi = the current policy.
u = pi / pi_old (PPO ratio, clipped), w = pi_old / mu (importance weight, no gradient).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CORRECTIONS = ("none", "tis", "decoupled", "icepop")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.28
    correction: str = "decoupled"
    is_cap: float = 5.0
    is_low: float = 0.5
    is_high: float = 5.0
    agg: str = "token-mean"

    def __post_init__(self):
        if self.correction not in CORRECTIONS:
            raise ValueError(f"loss.correction must be one of {CORRECTIONS}, got {self.correction!r}")
        if self.agg not in AGGS:
            raise ValueError(f"loss.agg must be one of {AGGS}, got {self.agg!r}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"loss.clip_low must be in [0, 1) and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if not (0 < self.is_low <= self.is_high and self.is_cap > 0):
            raise ValueError(f"loss needs 0 < is_low <= is_high and is_cap > 0, got {self.is_low}, {self.is_high}, {self.is_cap}")


def aggregate(per_token: torch.Tensor, keep: torch.Tensor, agg: str) -> torch.Tensor:
    """Reduce a [B, T] per-token loss over the kept tokens (`keep` is 0/1)."""
    if agg == "token-mean":
        return (per_token * keep).sum() / keep.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        n = keep.sum(dim=1)
        seq = (per_token * keep).sum(dim=1) / n.clamp(min=1)
        has = (n > 0).float()
        return (seq * has).sum() / has.sum().clamp(min=1)
    if agg == "seq-mean-token-sum-norm":
        return (per_token * keep).sum() / keep.numel()
    raise ValueError(f"unknown aggregation {agg!r}; expected one of {AGGS}")


def policy_loss(logp, old_logp, behav_logp, advantages, mask, cfg: LossConfig):
    """All of logp/old_logp/behav_logp/mask are [B, T]; advantages [B] or [B, T].

    Returns (loss, stats) with stats as Python floats.
    """
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    old_logp, behav_logp = old_logp.detach(), behav_logp.detach()
    u = torch.exp(logp - old_logp)
    w = torch.exp(old_logp - behav_logp)
    unclipped = -u * adv
    clipped = -torch.clamp(u, 1 - cfg.clip_low, 1 + cfg.clip_high) * adv
    pg = torch.maximum(unclipped, clipped)

    keep = mask
    if cfg.correction == "none":
        per_token = pg
    elif cfg.correction == "tis":
        per_token = torch.clamp(w, max=cfg.is_cap) * pg
    elif cfg.correction == "decoupled":
        keep = mask * (w <= cfg.is_cap).to(mask.dtype)
        per_token = w * pg
    else:  # icepop
        keep = mask * ((w >= cfg.is_low) & (w <= cfg.is_high)).to(mask.dtype)
        per_token = w * pg
    # Dropped tokens must not leak NaN/inf into the sum through 0 * inf.
    per_token = torch.where(keep > 0, per_token, torch.zeros_like(per_token))
    loss = aggregate(per_token, keep, cfg.agg)

    with torch.no_grad():
        n_mask, n_keep = mask.sum().clamp(min=1), keep.sum().clamp(min=1)
        w_on_mask = w[mask > 0]
        stats = {
            "clip_frac": float(((clipped > unclipped).to(mask.dtype) * keep).sum() / n_keep),
            "is_weight_mean": float(w_on_mask.mean()) if w_on_mask.numel() else 1.0,
            "is_weight_max": float(w_on_mask.max()) if w_on_mask.numel() else 1.0,
            "dropped_frac": float((mask - keep).sum() / n_mask),
            "kl_behav": float(((behav_logp - old_logp) * keep).sum() / n_keep),
            "kept_tokens": float(keep.sum()),
        }
    return loss, stats


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the tokens where `mask` is 1 (the auxiliary SFT term
    on accepted expert tokens); zero when there are none."""
    mask = mask.to(logp.dtype)
    return -(logp * mask).sum() / mask.sum().clamp(min=1)
