"""The log-prob forward the learners train through: `PolicyLogProbs`, the causal LM as DeepSpeed
sees it, with a forward that returns token log-probs chunk by chunk (never the [B, L, V] logits),
and its shared-prompt path (learner.share_prompts) with the checks of where that path applies."""
from __future__ import annotations

import math

import torch

from eapo_ray.algo.batching import collate, collate_prompts, collate_responses, split_shared
from eapo_ray.algo.logprobs import aligned_token_logprobs, hidden_token_logprobs

LOGP_CHUNK_TOKENS = 1024  # positions per lm_head chunk: the logits held at once are this x vocabulary


class PolicyLogProbs(torch.nn.Module):
    """The policy as DeepSpeed sees it: the causal LM's own submodules under their own names (so
    parameter names, checkpoints and weight sync are those of the HF model), with a forward that
    returns the [B, L-1] next-token log-probs at the sampling temperature, computed chunk by chunk
    from the final hidden states: never the [B, L, V] logits. Runs inside the engine's forward, so
    ZeRO-3 gathers the head's parameters for every chunk on every rank alike."""

    def __init__(self, lm: torch.nn.Module, temperature: float):
        super().__init__()
        c = lm.config
        if getattr(c, "final_logit_softcapping", None) or getattr(c, "logit_scale", None) not in (None, 1, 1.0):
            raise ValueError(f"{type(lm).__name__}: logits = lm_head(hidden) is assumed (no soft-capping or scale)")
        for name, child in lm.named_children():
            self.add_module(name, child)
        head = lm.get_output_embeddings()
        self.base_name = lm.base_model_prefix
        self.head_name = next(n for n, m in lm.named_children() if m is head)
        self.temperature = temperature
        if list(self.state_dict()) != list(lm.state_dict()):
            raise ValueError(f"{type(lm).__name__} has parameters outside its submodules")

    def forward(self, input_ids=None, attention_mask=None, num_chunks: int = 1, shared: dict | None = None):
        """[B, L-1] log-probs of input_ids[:, 1:]; or, with `shared` (learner.share_prompts), the
        list of [B_k, R_k] response log-probs of `shared_forward`."""
        if shared is not None:
            return self.shared_forward(**shared)
        base = getattr(self, self.base_name)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return hidden_token_logprobs(hidden, getattr(self, self.head_name), input_ids, self.temperature, num_chunks)

    def shared_forward(self, prompt_ids, prompt_mask, prompt_len, buckets: list, chunk_tokens: int = 0) -> list:
        """Each distinct prompt computed once ([U, P] right-padded, algo.batching.collate_prompts),
        its keys/values then reused by every response of it: `buckets` are
        algo.batching.collate_responses dicts ([B, R] response_ids / response_mask and [B]
        prompt_index are read); each bucket's lm_head runs in chunks of `chunk_tokens` positions
        (0: one chunk).
        Returns per bucket the [B, R] log-probs of the response tokens (position k scores token
        k). The same numbers as the plain forward of prompt + response (float order aside: the
        learner checks this at set-up); gradients reach the prompt's computation through its
        keys/values from every response that reads them."""
        from transformers import DynamicCache

        base, head = getattr(self, self.base_name), getattr(self, self.head_name)
        U, P = prompt_ids.shape
        pos = torch.arange(P, device=prompt_ids.device).expand(U, P)
        out = base(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        last = out.last_hidden_state[torch.arange(U, device=prompt_ids.device), prompt_len - 1]  # [U, H]: scores token 0
        logps = []
        for b in buckets:
            ids, idx = b["response_ids"], b["prompt_index"]
            R = ids.shape[1]
            hidden = last.index_select(0, idx)[:, None]  # [B, 1, H]: scores response token 0
            if R > 1:  # the response's last position scores nothing (no token follows it): not fed
                cache = DynamicCache()
                for i, (k, v) in enumerate(kv):
                    cache.update(k.index_select(0, idx), v.index_select(0, idx), i)
                rpos = prompt_len.index_select(0, idx)[:, None] + torch.arange(R - 1, device=ids.device)[None]
                mask = torch.cat([prompt_mask.index_select(0, idx), b["response_mask"][:, :R - 1]], 1)
                h = base(input_ids=ids[:, :R - 1], attention_mask=mask, position_ids=rpos, past_key_values=cache,
                         use_cache=True).last_hidden_state
                hidden = torch.cat([hidden, h], 1)  # [B, R, H]: position k scores token k
            chunks = max(1, math.ceil(ids.numel() / chunk_tokens)) if chunk_tokens else 1
            logps.append(aligned_token_logprobs(hidden, head, ids, self.temperature, chunks))
        return logps

    @staticmethod
    def shared_tokens(prompt_ids: torch.Tensor, buckets: list) -> int:
        """Tokens `shared_forward` puts through the model: every prompt position once, and each
        bucket's [B, R] responses without their last position (B x (R-1))."""
        return prompt_ids.numel() + sum(b["response_ids"][:, :-1].numel() for b in buckets)


STATIC_ROPE = (None, "default", "linear", "llama3", "yarn")  # frequencies that do not depend on the sequence length


def unshareable(config) -> str | None:
    """Why learner.share_prompts cannot be used for this model config (None: it can): a sliding
    attention window would count the prompt's right padding inside the window, and the model's own
    cache keeps only the window of a long prompt; rope that rescales with the sequence length sees
    the prompt alone in the prompt pass. The set-up check's sequences are too short to notice."""
    layers = getattr(config, "layer_types", None)
    if layers and any(t != "full_attention" for t in layers):
        return f"it has {sorted(set(layers) - {'full_attention'})} layers"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"sliding_window={config.sliding_window}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return f"rope settings {rope!r} not understood"
    nested = [v for v in rope.values() if isinstance(v, dict)]  # one dict per layer type (transformers 5)
    kinds = {r.get("rope_type", r.get("type")) for r in nested + ([rope] if len(nested) < len(rope) else [])}
    if not kinds <= set(STATIC_ROPE):
        return f"rope type {sorted(map(str, kinds))}"
    return None


def sharing_agrees(module: PolicyLogProbs, vocab_size: int, device="cpu", atol: float = 1e-4) -> bool:
    """Whether `module.shared_forward` gives the plain forward's response log-probs on a small
    random batch (two prompts of different lengths, responses of different lengths, several
    micro-batches). False for a model whose forward does not take a prompt's keys/values this way
    (it then trains with the plain forward), or that raises trying."""
    g = torch.Generator().manual_seed(0)
    tok = lambda n: torch.randint(1, vocab_size, (n,), generator=g).tolist()  # noqa: E731
    prompts, lens = [tok(7), tok(4)], [(0, 5), (0, 2), (1, 6), (1, 1), (0, 3)]
    batch = {"input_ids": [prompts[i] + tok(n) for i, n in lens], "prompt_len": [len(prompts[i]) for i, _ in lens]}
    resp = [seq[p:] for seq, p in zip(batch["input_ids"], batch["prompt_len"])]
    batch.update(policy_mask=[[1] * len(r) for r in resp], expert_mask=[[0] * len(r) for r in resp],
                 behav_logp=[[0.0] * len(r) for r in resp], advantage=[0.0] * len(resp), row=list(range(len(resp))))
    try:
        with torch.no_grad():
            b = collate(batch)
            plain = module(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).float().cpu()
            _, parts = split_shared(batch, min_rows=2)
            cols = [collate_responses(x) for x in parts]
            got = module(shared={**{k: v.to(device) for k, v in collate_prompts(prompts).items()},
                                 "buckets": [{k: v.to(device) for k, v in c.items()} for c in cols]})
            got = [x.float().cpu() for x in got]
        for x, lp in zip(parts, got, strict=True):
            for i, (row, r) in enumerate(zip(x["row"], x["response_ids"])):
                p = batch["prompt_len"][row]
                if not torch.allclose(lp[i, :len(r)], plain[row, p - 1: p - 1 + len(r)], atol=atol):
                    return False
    except Exception:  # noqa: BLE001 -- a model this path does not fit trains the plain way
        return False
    return True
