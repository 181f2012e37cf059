"""The transformers engine: exact sampling on CPU (or one GPU) with our own KV-cache loop."""
from __future__ import annotations

import threading

import torch

from eapo_ray.algo.sampling import counter_uniforms, inverse_cdf
from eapo_ray.rollout import fast_llama
from eapo_ray.rollout.engine import Engine, Generation, StringBan, hits_stop, token_texts

PRUNE_BELOW = 0.75  # the running batch drops its finished rows once at most this fraction is active


class HFEngine(Engine):
    """transformers on CPU (or one GPU): our own batched sampling loop with a KV cache, so the
    sampled distribution is exactly softmax(logits / T) over the whole vocabulary, whatever the
    checkpoint's generation_config.json says (no top-k/top-p/penalty processors), and the
    recorded log-prob is that distribution's. A sequence ends at EOS (the tokenizer's and the
    checkpoint's eos ids, as vLLM does) or at the token that completes a stop string (kept,
    even if it carries text past the stop string); nothing is returned after it.

    With `seeds` (one per prompt) the k-th token of a sequence is drawn with the uniform
    U(seed, k) (algo.sampling): what a sequence samples does not depend on the other sequences
    in its batch, nor on when it joined it (to float rounding of its logits). Without, rows draw
    from torch's RNG (torch.multinomial). `join_running` defaults to False here (the engine alone);
    the launcher passes the config's rollout.join_running (true)."""

    seeded_sampling = True

    def __init__(self, model_path: str, tokenizer=None, device: str = "cpu", dtype=torch.float32,
                 prune_finished: bool = True, fast_decode: bool = True, join_running: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.device = device
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.eos_ids = {i for i in [self.tokenizer.eos_token_id, *gen_eos] if i is not None}
        self.version = 0
        self.prune_finished = prune_finished  # drop finished sequences from the running batch (see generate)
        self._texts: list[str] | None = None  # token_texts, computed on the first ban
        self._bans: dict[tuple, StringBan] = {}
        self._stop_tokens: dict[tuple, frozenset | None] = {}
        # decoding steps through fast_llama (a plain Llama only; the model's own forward otherwise)
        self.fast_decode = fast_decode
        self._fast = fast_llama.FastLlamaDecoder(self.model) if fast_llama.supports(self.model) else None
        self.join_running = join_running  # requests join a running batch (see generate's `more`)
        self._fast_lock = threading.Lock()

    def _stop_candidates(self, stop) -> frozenset | None:
        """The tokens that can complete a stop string: those whose text contains a stop string's
        last character (checked after every token, a new hit must end inside the new token).
        None (check every token) when a stop string ends in whitespace or a non-ASCII character,
        where decoding may rewrite across tokens."""
        key = tuple(stop)
        if key not in self._stop_tokens:
            ends = {s[-1] for s in stop if s}
            if not ends:
                self._stop_tokens[key] = frozenset()
            elif any(not c.isascii() or c.isspace() for c in ends):
                self._stop_tokens[key] = None
            else:
                if self._texts is None:
                    self._texts = token_texts(self.tokenizer)
                self._stop_tokens[key] = frozenset(v for v, t in enumerate(self._texts) if any(c in t for c in ends))
        return self._stop_tokens[key]

    def _string_ban(self, ban) -> StringBan:
        key = tuple(ban)
        if key not in self._bans:
            if self._texts is None:
                self._texts = token_texts(self.tokenizer)
            self._bans[key] = StringBan(self.tokenizer, key, self._texts)
        return self._bans[key]

    @property
    def joins_running_batch(self) -> bool:
        """Whether `generate` takes requests that arrive while it decodes (`more`): with the fast
        decoding path only, whose key/value buffers can take new rows."""
        return self.join_running and self.fast_decode and self._fast is not None

    def _prefill(self, prompts):
        """The model's own forward over the left-padded prompts: (attention mask, last position
        [B, 1], cache, last logits). With fast_decode, a prompt that appears several times (a
        group's samples) is run once and its rows copied (the same values, to float rounding)."""
        uniq, where, rows = prompts, None, {}
        if self.fast_decode:
            where = [rows.setdefault(tuple(p), len(rows)) for p in prompts]
            uniq = [list(p) for p in rows] if len(rows) < len(prompts) else prompts
        B, n = len(uniq), max(len(p) for p in uniq)
        ids = torch.full((B, n), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(uniq):
            ids[i, n - len(p):], attn[i, n - len(p):] = torch.tensor(p), 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        if uniq is not prompts:
            sel = torch.tensor(where, dtype=torch.long, device=self.device)
            attn, pos, logits = attn[sel], pos[sel], logits[sel]
            past.batch_select_indices(sel)
        return attn, pos[:, -1:], past, logits

    def generate(self, prompts, max_new_tokens, temperature, stop, ban=(), more=None, on_done=None, seeds=None):
        # the fast path's buffers belong to one call at a time: a call that overlaps another
        # (two threads on one engine) takes the model's own forward instead of waiting
        use_fast = self.fast_decode and self._fast is not None and self._fast_lock.acquire(blocking=False)
        try:
            return self._generate(prompts, max_new_tokens, temperature, stop, ban, more, on_done, use_fast, seeds)
        finally:
            if use_fast:
                self._fast.release()  # the K/V buffers go with the call (the old path freed its cache too)
                self._fast_lock.release()

    @torch.inference_mode()
    def _generate(self, prompts, max_new_tokens, temperature, stop, ban, more, on_done, use_fast, seeds=None):
        """`more` (optional, with `joins_running_batch`): called between decoding steps, returns
        [(prompt, max_new_tokens, seed)] to add to the running batch (the same sampling settings;
        seed None unless `seeds` is given); they are prefilled, join the batch and its buffers, and
        get the next indices after those already in it. `on_done(i, generation)` (optional) is
        called as soon as sequence i ends. Returns every sequence's Generation, the added ones
        last, in the order they came."""
        if not prompts:
            return []
        greedy = temperature <= 0
        sban = self._string_ban(ban) if ban else None
        can_stop = self._stop_candidates(stop)
        fast = self._fast if use_fast else None
        if not self.joins_running_batch or fast is None:
            more = None
        toks, lps, finish, active, budget = [], [], [], [], []
        seeded = seeds is not None and not greedy
        seed_of: list[int] = []

        def end(i, why):
            finish[i], active[i] = why, False
            if on_done is not None:
                on_done(i, Generation(toks[i], lps[i], why))

        def register(mnt, sds=None):
            base = len(toks)
            for k, m in enumerate(mnt):
                seed_of.append(sds[k] if sds is not None else 0)
                toks.append([])
                lps.append([])
                finish.append("length")
                active.append(True)
                budget.append(m)
            new = list(range(base, base + len(mnt)))
            for i in new:
                if budget[i] <= 0:
                    end(i, "length")
            return new

        def sample(logits, rows):
            """Draw each running row's next token, record it, end the rows that finish."""
            scaled = logits.float() / (1.0 if greedy else temperature)
            if sban is not None:  # mask every token that would complete a banned string
                for r, i in enumerate(rows):
                    if active[i]:
                        scaled[r, [v for v in sban.banned(toks[i]) if v < scaled.shape[-1]]] = -float("inf")
            logp = torch.log_softmax(scaled, dim=-1)
            # seeded: each row's k-th token from its own uniform U(seed, k)
            nxt = _draw(logp, greedy, [seed_of[i] for i in rows] if seeded else None, [len(toks[i]) for i in rows])
            # one transfer per step, not one per row (the same values)
            chosen = nxt.tolist()
            chosen_lp = None if greedy or sban is not None else logp.gather(1, nxt.view(-1, 1)).view(-1).tolist()
            for r, i in enumerate(rows):
                if not active[i]:
                    continue
                t = chosen[r]
                if sban is not None:
                    t = self._recheck_ban(sban, logp, r, t, toks[i], greedy, seed_of[i] if seeded else None)
                    if t is None:  # every token would spell a banned string: end the turn here
                        end(i, "stop")
                        continue
                    nxt[r] = t
                toks[i].append(t)
                lps[i].append(0.0 if greedy else (chosen_lp[r] if chosen_lp is not None else float(logp[r, t])))
                if t in self.eos_ids or ((can_stop is None or t in can_stop) and hits_stop(self.tokenizer, toks[i], stop)):
                    end(i, "stop")
                elif len(toks[i]) >= budget[i]:
                    end(i, "length")
            return nxt

        rows = register(max_new_tokens, seeds)  # the sequence each row of the running batch holds
        attn, pos, past, logits = self._prefill(prompts)
        if fast is not None:  # the decoding steps run on fast_llama's buffers from here
            fast.start(past, attn.shape[1] + min(max(max_new_tokens), 64))
            past = None
        while any(active[i] for i in rows):
            nxt = sample(logits, rows)
            extra = more() if more is not None else None
            if extra:  # requests that arrived meanwhile join the batch (continuous batching)
                new = register([x[1] for x in extra], [x[2] for x in extra] if seeded else None)
                a2, p2, past2, lg2 = self._prefill([x[0] for x in extra])
                nxt = torch.cat([nxt, sample(lg2, new)])
                attn = _left_pad_cat(attn, a2, fast.length)
                fast.append(past2)
                rows, pos = rows + new, torch.cat([pos, p2])
            if not any(active[i] for i in rows):
                break
            live = [r for r, i in enumerate(rows) if active[i]]
            if self.prune_finished and len(live) <= PRUNE_BELOW * len(rows):
                # drop the finished rows from the batch and its KV cache: each row's logits depend on
                # its own row only, so the others' distributions are unchanged
                keep = torch.tensor(live, dtype=torch.long, device=self.device)
                rows, nxt, attn, pos = [rows[r] for r in live], nxt[keep], attn[keep], pos[keep]
                if fast is not None:
                    fast.select(keep)
                else:
                    past.batch_select_indices(keep)
            step_ids = nxt.view(len(rows), 1).to(self.device)
            attn = torch.cat([attn, torch.ones((len(rows), 1), dtype=attn.dtype, device=self.device)], dim=1)
            pos = pos + 1
            if fast is not None:
                logits = fast.step(step_ids, pos, attn)
            else:
                out = self.model(input_ids=step_ids, attention_mask=attn, position_ids=pos, past_key_values=past,
                                 use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1]
        return [Generation(t, lp, f) for t, lp, f in zip(toks, lps, finish)]

    @staticmethod
    def _recheck_ban(sban: StringBan, logp: torch.Tensor, i: int, t: int, toks: list[int], greedy: bool,
                     seed: int | None = None):
        """The exact (decoding) test of the chosen token; the mask already caught it unless the
        tokenizer's token texts do not add up. A token that fails is masked in `logp` row i (in
        place, renormalised) and the row drawn again (with `seed`: redraw j of token k takes
        U(seed, k + j * 2**32)); None if nothing is left."""
        redraw = 0
        while sban.completes(toks, t):
            logp[i, t] = -float("inf")
            if torch.isinf(logp[i]).all():
                return None
            logp[i] = torch.log_softmax(logp[i], dim=-1)
            redraw += 1
            t = int(_draw(logp[i:i + 1], greedy, None if seed is None else [seed], [len(toks) + (redraw << 32)])[0])
        return t

    def load_weights(self, state_dict, version):
        self.model.load_state_dict(state_dict)
        self.version = version


def _draw(logp: torch.Tensor, greedy: bool, seeds: list[int] | None, counters: list[int]) -> torch.Tensor:
    """[N] tokens from the rows of `logp` [N, V]: the argmax when greedy; with `seeds`, row n's
    draw takes the uniform U(seeds[n], counters[n]) (algo.sampling); otherwise torch's RNG."""
    if greedy:
        return logp.argmax(-1)
    if seeds is not None:
        return inverse_cdf(logp.exp(), counter_uniforms(seeds, counters))
    return torch.multinomial(logp.exp(), 1).squeeze(-1)


def _left_pad_cat(a: torch.Tensor, b: torch.Tensor, length: int) -> torch.Tensor:
    """Stack two left-padded masks row-wise, both left-padded to the longer one (`length` = a's)."""
    T = max(length, b.shape[1])
    pad = lambda x: torch.cat([x.new_zeros((x.shape[0], T - x.shape[1])), x], dim=1) if x.shape[1] < T else x  # noqa: E731
    return torch.cat([pad(a), pad(b)])
