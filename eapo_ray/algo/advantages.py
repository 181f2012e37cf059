"""Group-relative advantages (GRPO and Dr. GRPO)."""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """`rewards` [num_prompts, G] -> advantages of the same shape.

    "std": (r - mean) / (std + eps) per row (torch's unbiased std); "none": r - mean.
    A row whose rewards are all equal gives zeros.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_prompts, G], got shape {tuple(rewards.shape)}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    r = rewards.float()
    centered = r - r.mean(dim=1, keepdim=True)
    if scale == "std":
        std = r.std(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
        centered = centered / (std + eps)
    constant = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(centered), centered)
