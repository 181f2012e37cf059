"""Generation engines behind one interface, so a vLLM backend drops in beside the
transformers one. An engine works on token ids only: the ids it returns are the ids
the learner trains on, never re-tokenized text."""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    tokens: list[int]
    logprobs: list[float]  # behaviour log-probs after temperature (0.0 when greedy)
    finish: str  # "stop" (a stop token/string) or "length"


class Engine(ABC):
    version: int = 0

    @abstractmethod
    def generate(self, prompts: list[list[int]], max_new_tokens: list[int], temperature: float,
                 stop: list[str], ban: list[str] = ()) -> list[Generation]:
        """Sample one continuation per prompt (greedy when temperature <= 0); stop after any
        string in `stop` (inclusive); never emit the strings in `ban`."""

    @abstractmethod
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the weights with the learner's (full, unsharded) state dict."""

    def shutdown(self) -> None:
        """Release the engine's processes (vLLM); nothing to do for in-process engines."""

    # The inference side of a pushed weight update (rollout.weight_sync: nccl, vLLM on GPUs).
    # The rollout actor pauses generation around start..finish; an engine without a push
    # path only takes the new version number (what the CPU tests of that control flow use).
    def init_weight_transfer_engine(self, request) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no NCCL weight transfer (it needs engine: vllm on GPUs)")

    def start_weight_update(self) -> None:
        """Called with generation paused, before the tensors arrive."""

    def update_weights(self, request) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no NCCL weight transfer (it needs engine: vllm on GPUs)")

    def finish_weight_update(self, version: int | None = None) -> None:
        """Called after the tensors arrived, before generation resumes."""
        if version is not None:
            self.version = version

    async def agenerate(self, prompt: list[int], max_new_tokens: int, temperature: float, stop: list[str],
                        ban: list[str] = ()) -> Generation:
        """One request, awaitable, so many episodes can be in flight at once. Here concurrent
        requests are gathered into one batched `generate` in a thread; engines with their own
        scheduler (vLLM) override this."""
        loop = asyncio.get_running_loop()
        if getattr(self, "_batcher", None) is None or self._batcher.loop is not loop:
            self._batcher = _MicroBatcher(self, loop)  # one per event loop: futures belong to their loop
        return await self._batcher.submit(prompt, max_new_tokens, (temperature, tuple(stop), tuple(ban)))


class _MicroBatcher:
    """Collects the requests that arrive while the engine is busy (or within a few ms of
    each other) and runs them as one `generate` call; requests with different sampling
    settings go into different batches. Bound to one event loop. A request whose caller
    was cancelled is skipped; if the drain task itself dies, every waiter gets the error."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, settle_s: float = 0.002):
        self.engine, self.loop, self.settle_s = engine, loop, settle_s
        self.pending: list = []  # (key, prompt, max_new_tokens, future)
        self.task: asyncio.Task | None = None

    async def submit(self, prompt, max_new_tokens, key):
        fut = self.loop.create_future()
        self.pending.append((key, prompt, max_new_tokens, fut))
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._drain())
        return await fut

    async def _drain(self):
        try:
            while True:
                n = -1
                while n != len(self.pending):  # wait until no more requests are arriving
                    n = len(self.pending)
                    await asyncio.sleep(self.settle_s)
                self.pending = [x for x in self.pending if not x[3].done()]  # callers that gave up
                if not self.pending:
                    return
                key = self.pending[0][0]
                batch = [x for x in self.pending if x[0] == key]
                self.pending = [x for x in self.pending if x[0] != key]
                try:
                    gens = await asyncio.to_thread(self.engine.generate, [x[1] for x in batch], [x[2] for x in batch],
                                                   key[0], list(key[1]), list(key[2]))
                except Exception as e:  # noqa: BLE001 -- handed to every waiting request
                    for x in batch:
                        if not x[3].done():
                            x[3].set_exception(e)
                    continue
                for x, g in zip(batch, gens):
                    if not x[3].done():
                        x[3].set_result(g)
        except BaseException as e:  # cancelled (the loop is closing) or a bug: no waiter may hang
            for x in self.pending:
                if not x[3].done():
                    x[3].set_exception(e if isinstance(e, Exception) else RuntimeError("engine batcher stopped"))
            self.pending = []
            raise


def _contains_any(text: str, strings) -> bool:
    return any(s in text for s in strings)


class HFEngine(Engine):
    """transformers on CPU (or one GPU): our own batched sampling loop with a KV cache, so the
    sampled distribution is exactly softmax(logits / T) over the whole vocabulary, whatever the
    checkpoint's generation_config.json says (no top-k/top-p/penalty processors), and the
    recorded log-prob is that distribution's."""

    def __init__(self, model_path: str, tokenizer=None, device: str = "cpu", dtype=torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.device = device
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = {i for i in [self.tokenizer.eos_token_id] if i is not None}
        self.version = 0

    def _window(self, toks: list[int], strings) -> str:
        """The decoded tail of `toks` long enough to contain any of `strings` that ends in it
        (every token decodes to at least one character, except special ones)."""
        n = max((len(x) for x in strings), default=0) + 2
        return self.tokenizer.decode(toks[-n:])

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature, stop, ban=()):
        if not prompts:
            return []
        B, n = len(prompts), max(len(p) for p in prompts)
        dev = self.device
        ids = torch.full((B, n), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, n - len(p):], attn[i, n - len(p):] = torch.tensor(p), 1
        ids, attn = ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        greedy = temperature <= 0
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        toks, lps = [[] for _ in range(B)], [[] for _ in range(B)]
        finish, active = ["length"] * B, [m > 0 for m in max_new_tokens]
        for _ in range(max(max_new_tokens)):
            if not any(active):
                break
            logp = torch.log_softmax(logits.float() / (1.0 if greedy else temperature), dim=-1)
            nxt = self._choose(logp, greedy, toks, active, ban)
            for i in range(B):
                if not active[i]:
                    continue
                t = int(nxt[i])
                toks[i].append(t)
                lps[i].append(0.0 if greedy else float(logp[i, t]))
                if t in self.eos_ids or (stop and _contains_any(self._window(toks[i], stop), stop)):
                    finish[i], active[i] = "stop", False
                elif len(toks[i]) >= max_new_tokens[i]:
                    active[i] = False
            if not any(active):
                break
            step_ids = torch.tensor([[int(x)] for x in nxt], dtype=torch.long, device=dev)
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=dev)], dim=1)
            pos = pos[:, -1:] + 1
            out = self.model(input_ids=step_ids, attention_mask=attn, position_ids=pos, past_key_values=past,
                             use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        return [Generation(t, lp, f) for t, lp, f in zip(toks, lps, finish)]

    def _choose(self, logp: torch.Tensor, greedy: bool, toks: list, active: list, ban) -> torch.Tensor:
        """Next token per row (argmax, or a sample from exp(logp)). With `ban`, a token that
        would complete a banned string is masked in that row's `logp` (in place, renormalised)
        and the row is drawn again, so no tokenization of a banned string can get through."""
        nxt = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1).squeeze(-1)
        if not ban:
            return nxt
        for i in range(len(toks)):
            if not active[i]:
                continue
            for _ in range(64):
                if not _contains_any(self._window(toks[i] + [int(nxt[i])], ban), ban):
                    break
                logp[i, int(nxt[i])] = -float("inf")
                logp[i] = torch.log_softmax(logp[i], dim=-1)
                nxt[i] = logp[i].argmax() if greedy else torch.multinomial(logp[i].exp(), 1)[0]
        return nxt

    def load_weights(self, state_dict, version):
        self.model.load_state_dict(state_dict)
        self.version = version


def make_engine(kind: str, model_path: str, vllm_cfg=None, seed: int = 0, **kwargs) -> Engine:
    """`vllm_cfg` (a config.VLLMConfig) and `seed` are used by the vLLM engine only."""
    if kind == "hf":
        return HFEngine(model_path, **kwargs)
    if kind == "vllm":
        from eapo_ray.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, vllm_cfg, seed=seed, **kwargs)
    raise ValueError(f"unknown engine {kind!r} (expected 'hf' or 'vllm')")
