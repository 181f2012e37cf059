"""A lean decoding step for transformers' LlamaForCausalLM (the tiny policies, SmolLM2): the same
arithmetic as the model's own forward for one new token per row, without its per-call machinery.

At the tiny policy's size (d=128, 4 layers) a decoding step is mostly per-call overhead: module
dispatch, the mask builder, rotary tables recomputed per call, the dynamic cache's `torch.cat`
of every layer's keys and values each step. This step instead keeps each layer's keys and values
in a preallocated buffer (grown by doubling, written in place), takes cos/sin from a table,
and makes one matmul for q/k/v and one for gate/up (the weights concatenated once per weight
version), and computes the one query's attention as softmax(q k^T) v in two matmuls. Every other
operation is the model's own (RMSNorm in float32, rotate-half RoPE, the boolean padding mask,
repeat_kv for grouped heads), so logits agree with the model's forward to float rounding
(tests/system/test_engine_correctness.py checks tokens and log-probs against the transformers
path). The prefill stays the model's own forward."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def supports(model) -> bool:
    """Whether `model` is a plain Llama this step reproduces (otherwise the engine uses the
    model's own forward for every step)."""
    c = getattr(model, "config", None)
    if c is None or type(model).__name__ != "LlamaForCausalLM":
        return False
    rope = getattr(c, "rope_parameters", None) or {}
    inner = getattr(model, "model", None)
    attn_impl = getattr(c, "_attn_implementation", None)
    return (rope.get("rope_type", "default") == "default" and not getattr(c, "attention_bias", False)
            and not getattr(c, "mlp_bias", False) and getattr(c, "hidden_act", "") == "silu"
            and getattr(c, "pretraining_tp", 1) == 1 and attn_impl == "sdpa"
            and inner is not None and getattr(inner.rotary_emb, "attention_scaling", 1.0) == 1.0)


class FastLlamaDecoder:
    """Decoding state for one `generate` call: per-layer key/value buffers [B, kv_heads, capacity,
    head_dim] filled up to `length`, and the fused weights of the model's current parameters."""

    def __init__(self, model):
        self.model = model
        c = model.config
        self.n_layers = c.num_hidden_layers
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.scaling = self.head_dim ** -0.5
        self._key = None
        self._weights = None
        self._rope = None  # (cos, sin) tables [positions, head_dim]
        self._current = None  # weights() at start()

    # ---- weights -------------------------------------------------------------------------------
    def _weights_key(self):
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def weights(self):
        """Per layer (ln1, Wqkv, Wo, ln2, Wgu, Wdown), final norm, embedding, lm_head; rebuilt when
        any parameter changed (load_state_dict, an optimizer step) since the last call."""
        key = self._weights_key()
        if key != self._key:
            m = self.model.model
            layers = []
            for layer in m.layers:
                a, mlp = layer.self_attn, layer.mlp
                layers.append((layer.input_layernorm.weight.detach(),
                               torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
                               a.o_proj.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                               torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                               mlp.down_proj.weight.detach()))
            self._weights = (layers, m.norm.weight.detach(), m.embed_tokens.weight.detach(),
                             self.model.lm_head.weight.detach())
            self._key = key
        return self._weights

    def rope(self, max_pos: int, dtype, device):
        """cos/sin for positions 0..max_pos-1, computed exactly as LlamaRotaryEmbedding does."""
        if self._rope is None or self._rope[0].shape[0] < max_pos or self._rope[0].dtype != dtype:
            inv_freq = self.model.model.rotary_emb.inv_freq.to(device=device, dtype=torch.float)
            n = max(2 * max_pos, 256)  # grown by doubling: not rebuilt at every later step
            freqs = torch.arange(n, device=device).float()[:, None] * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope = (emb.cos().to(dtype), emb.sin().to(dtype))
        return self._rope

    # ---- cache ---------------------------------------------------------------------------------
    def release(self):
        """Drop the call's K/V buffers (they would otherwise stay allocated between calls)."""
        self.k = self.v = None
        self._current = None

    def start(self, past, capacity: int):
        """Copy the prefill's cache (a transformers Cache) into buffers with room for `capacity` positions,
        and take the model's current weights for this call's steps (its weights do not change during
        one `generate` call)."""
        self._current = self.weights()
        self.k, self.v = [], []
        for i in range(self.n_layers):
            k, v = past.layers[i].keys, past.layers[i].values
            B, H, L, D = k.shape
            kb = k.new_empty((B, H, max(capacity, L), D))
            vb = v.new_empty((B, H, max(capacity, L), D))
            kb[:, :, :L], vb[:, :, :L] = k, v
            self.k.append(kb)
            self.v.append(vb)
        self.length = L

    def select(self, keep: torch.Tensor):
        """Keep only the rows `keep` (finished sequences leave the batch)."""
        t = self.length

        def pick(x):  # the filled positions only, into a buffer of the same capacity
            y = x.new_empty((keep.shape[0], *x.shape[1:]))
            y[:, :, :t] = x[:, :, :t].index_select(0, keep)
            return y

        self.k = [pick(x) for x in self.k]
        self.v = [pick(x) for x in self.v]

    def append(self, past):
        """Add the rows of another prefill's cache (requests joining the running batch): both sets
        of rows right-aligned at the longer length, the positions before a row's own start zero
        (and masked out by its attention mask)."""
        t, n2 = self.length, past.layers[0].keys.shape[2]
        T = max(t, n2)
        cap = T + max(self.k[0].shape[2] - t, 16)
        for i in range(self.n_layers):
            for buf, new in ((self.k, past.layers[i].keys), (self.v, past.layers[i].values)):
                old = buf[i]
                R, H, _, D = old.shape
                y = old.new_zeros((R + new.shape[0], H, cap, D))
                y[:R, :, T - t:T] = old[:, :, :t]
                y[R:, :, T - n2:T] = new
                buf[i] = y
        self.length = T

    def _grow(self):
        cap = self.k[0].shape[2]
        if self.length < cap:
            return
        new = 2 * cap
        for buf in (self.k, self.v):
            for i, x in enumerate(buf):
                y = x.new_empty((x.shape[0], x.shape[1], new, x.shape[3]))
                y[:, :, :cap] = x
                buf[i] = y

    # ---- one decoding step ---------------------------------------------------------------------
    def step(self, ids: torch.Tensor, pos: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] for one new token per row. ids, pos: [B, 1]; attn: [B, length + 1]
        (the padding mask including the new token). Writes the new keys/values into the buffers."""
        layers, norm_w, emb_w, head_w = self._current
        self._grow()
        B = ids.shape[0]
        H, KV, D, t = self.n_heads, self.n_kv, self.head_dim, self.length
        x = F.embedding(ids.view(B), emb_w)  # [B, d]: 2-D activations, one row per sequence
        dtype = x.dtype
        cos_t, sin_t = self.rope(int(pos.max()) + 1, dtype, x.device)
        p = pos.view(B)
        cos, sin = cos_t[p].view(B, 1, 1, D), sin_t[p].view(B, 1, 1, D)
        mask = attn.bool().view(B, 1, 1, t + 1)
        half = D // 2
        rep = H // KV
        for li, (ln1, wqkv, wo, ln2, wgu, wd) in enumerate(layers):
            h = _rms(x, ln1, self.eps)
            qkv = F.linear(h, wqkv).view(B, H + 2 * KV, 1, D)  # [B, heads, 1, D]
            qk, v = qkv[:, :H + KV], qkv[:, H + KV:]
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin  # RoPE on q and k at once
            q, k = qk[:, :H], qk[:, H:]
            kb, vb = self.k[li], self.v[li]
            kb[:, :, t:t + 1] = k
            vb[:, :, t:t + 1] = v
            ks, vs = kb[:, :, :t + 1], vb[:, :, :t + 1]
            if rep > 1:
                ks = ks[:, :, None].expand(B, KV, rep, t + 1, D).reshape(B, H, t + 1, D)
                vs = vs[:, :, None].expand(B, KV, rep, t + 1, D).reshape(B, H, t + 1, D)
            o = _attend_one(q, ks, vs, mask, self.scaling)
            x = x + F.linear(o.view(B, H * D), wo)
            h = _rms(x, ln2, self.eps)
            g, u = F.linear(h, wgu).chunk(2, dim=-1)
            x = x + F.linear(F.silu(g) * u, wd)
        self.length = t + 1
        return F.linear(_rms(x, norm_w, self.eps), head_w)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one new query per row: q [B, H, 1, D] over k, v [B, H, T, D] where `mask`
    [B, 1, 1, T] is True: softmax(q k^T * scale) v, the arithmetic of SDPA's math path (to float
    rounding) as two batched matmuls. At one query per row SDPA's CPU flash kernel spends most
    of its time on blocking made for long queries (BENCHMARKS.md)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, 1, T]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm, the same operations in the same order."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype)
