"""Per-token log-probs of the sampled tokens under softmax(logits / T): whole-logits and
chunked over the vocabulary head (so a long response never holds a [B, T, V] float tensor)."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, L, V] logits -> [B, L-1] log-probs of the next tokens, at the sampling temperature."""
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(head(hidden).float() / temperature, dim=-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1)


def hidden_token_logprobs(hidden: torch.Tensor, head, input_ids: torch.Tensor, temperature: float = 1.0,
                          num_chunks: int = 1) -> torch.Tensor:
    """`token_logprobs(head(hidden), input_ids, temperature)` from the final hidden states [B, L, H],
    without the [B, L, V] logits (see `aligned_token_logprobs`)."""
    return aligned_token_logprobs(hidden[:, :-1], head, input_ids[:, 1:], temperature, num_chunks)


def aligned_token_logprobs(hidden: torch.Tensor, head, targets: torch.Tensor, temperature: float = 1.0,
                           num_chunks: int = 1) -> torch.Tensor:
    """[B, L] log-probs of targets[:, k] under softmax(head(hidden[:, k]) / T), from hidden states
    [B, L, H] that each score the target at the same position: the B*L positions go through `head`
    (hidden -> logits) in exactly `num_chunks` chunks (some may be empty), each under activation
    checkpointing when autograd records, so that backward recomputes a chunk's logits instead of
    keeping them all."""
    B, L, H = hidden.shape
    h, targets = hidden.reshape(-1, H), targets.reshape(-1)
    size = -(-h.shape[0] // num_chunks)  # ceil
    parts = []
    for k in range(num_chunks):
        args = (h[k * size:(k + 1) * size], targets[k * size:(k + 1) * size], head, temperature)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(*args))
    return torch.cat(parts).view(B, L)
