"""Batch-invariant sampling: the token a sequence draws depends on its own seed, its own position
and its own distribution only, not on which other sequences share its decoding batch or in what
order they came (which, with an expert answering at its own pace, depends on timing).

Each draw takes one uniform number from a counter-based generator, u = U(seed, counter), and
inverts the cumulative distribution: token = the first v with cdf(v) > u * cdf(V-1). With u
uniform on [0, 1) this samples exactly softmax(logits / T); a token of probability 0 (masked to
-inf) is never drawn. U is SplitMix64's output function (Steele, Lea, Flood 2014) applied to the
hashed seed plus counter times the golden-ratio increment, the top 53 bits as a float64.

"Does not depend on the batch" holds as far as the logits do: a row's logits computed in another
batch shape can differ in the last bits (other matmul blocking), and a draw whose u falls within
that difference of a CDF boundary flips. On the CPU fp32 path that is rare (the tests compare
whole episodes); with batch-size-dependent GPU kernels or bf16 it is not guaranteed.
"""
from __future__ import annotations

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 values (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def counter_uniforms(seeds, counters) -> torch.Tensor:
    """[B] float64 uniforms on [0, 1), one per (seed, counter) pair: a pure function of the pair."""
    s = np.array([int(v) & _MASK64 for v in seeds], dtype=np.uint64)
    c = np.array([int(v) & _MASK64 for v in counters], dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = _mix(_mix(s) + (c + np.uint64(1)) * _GOLDEN)
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[B] token ids drawn from the rows of `probs` [B, V] (non-negative, any positive total) with
    the uniforms `u` [B]: the first v whose cumulative mass exceeds u times the row's total.
    The cumulative sum is float64 over the whole vocabulary each call ([B, V]: cheap for the tiny
    policy, measured; ~80 MB per step at B=64 and a 152k vocabulary, not measured)."""
    cdf = probs.to(torch.float64).cumsum(-1)
    total = cdf[:, -1]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):  # torch.multinomial raises here too
        raise ValueError("inverse_cdf: a row has no finite positive probability mass (NaN logits, or every token masked)")
    target = (u.to(cdf.device) * total).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    over = idx >= probs.shape[-1]  # u * total rounded up to the total: the last token with mass
    if over.any():
        V = probs.shape[-1]
        last = V - 1 - (probs[over] > 0).flip(-1).to(torch.int8).argmax(-1)
        idx[over] = last
    return idx


def turn_seed(episode_seed: int, turn: int) -> int:
    """The seed of one generation call of an episode (its `turn`-th)."""
    return (int(episode_seed) * 1_000_003 + turn) & _MASK64
