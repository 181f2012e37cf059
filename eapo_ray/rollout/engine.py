"""Generation engines behind one interface, so a vLLM backend drops in beside the
transformers one. An engine works on token ids only: the ids it returns are the ids
the learner trains on, never re-tokenized text."""
from __future__ import annotations

import asyncio
import threading
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
    seeded_sampling: bool = False  # generate takes seeds= (one per prompt): batch-invariant sampling (algo.sampling)

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
                        ban: list[str] = (), seed: int | None = None) -> Generation:
        """One request, awaitable, so many episodes can be in flight at once. Here concurrent
        requests are gathered into one batched `generate` in a thread; engines with their own
        scheduler (vLLM) override this. `seed`: with `seeded_sampling`, the request's tokens
        depend on it and on the request alone, not on the batch it lands in (ignored otherwise)."""
        loop = asyncio.get_running_loop()
        if getattr(self, "_batcher", None) is None or self._batcher.loop is not loop:
            self._batcher = _MicroBatcher(self, loop)  # one per event loop: futures belong to their loop
        return await self._batcher.submit(prompt, max_new_tokens, (temperature, tuple(stop), tuple(ban)), seed)


class _MicroBatcher:
    """Collects the requests that arrive while the engine is busy (or within a few ms of
    each other) and runs them as one `generate` call; requests with different sampling
    settings go into different batches. Bound to one event loop. A request whose caller
    was cancelled is skipped; if the drain task itself dies, every waiter gets the error.

    With an engine that `joins_running_batch` (the transformers engine's fast path), requests
    with the batch's settings that arrive while it decodes join it at its next step, and each
    request is answered as soon as its own sequence ends, not when the whole batch does.

    With an engine that has `seeded_sampling`, every request goes out with a seed (an unseeded
    request's drawn from torch's RNG when its batch starts or it joins one)."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, settle_s: float = 0.002):
        self.engine, self.loop, self.settle_s = engine, loop, settle_s
        self.pending: list = []  # (key, prompt, max_new_tokens, future, seed or None)
        self.task: asyncio.Task | None = None
        self.lock = threading.Lock()  # `pending` is also taken from the engine's thread (joins)

    async def submit(self, prompt, max_new_tokens, key, seed=None):
        fut = self.loop.create_future()
        with self.lock:
            self.pending.append((key, prompt, max_new_tokens, fut, seed))
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._drain())
        return await fut

    async def _drain(self):
        batch: list = []
        try:
            while True:
                n = -1
                while n != len(self.pending):  # wait until no more requests are arriving
                    n = len(self.pending)
                    await asyncio.sleep(self.settle_s)
                with self.lock:
                    self.pending = [x for x in self.pending if not x[3].done()]  # callers that gave up
                    if not self.pending:
                        return
                    key = self.pending[0][0]
                    batch = [x for x in self.pending if x[0] == key]
                    self.pending = [x for x in self.pending if x[0] != key]
                joins = getattr(self.engine, "joins_running_batch", False)
                kwargs = {"seeds": [_seed(x) for x in batch]} if self.engine.seeded_sampling else {}
                if joins:
                    kwargs.update(more=lambda k=key, b=batch: self._take(k, b), on_done=lambda i, g, b=batch:
                                  self.loop.call_soon_threadsafe(_settle_one, b[i], g))
                try:
                    gens = await asyncio.to_thread(self.engine.generate, [x[1] for x in batch], [x[2] for x in batch],
                                                   key[0], list(key[1]), list(key[2]), **kwargs)
                except Exception as e:  # noqa: BLE001 -- handed to every waiting request
                    _settle(batch, error=e)
                else:
                    _settle(batch, results=gens)
                batch = []
        except BaseException as e:  # cancelled (the loop is closing) or a bug: no waiter may hang
            err = e if isinstance(e, Exception) else RuntimeError("engine batcher stopped")
            with self.lock:
                rest, self.pending = self.pending, []
            _settle(batch + rest, error=err)
            raise

    def _take(self, key, batch: list) -> list:
        """From the engine's thread, between decoding steps: the waiting requests with `key`,
        moved into the running `batch` (their indices follow its current ones), as
        (prompt, max_new_tokens, seed: None unless the engine has `seeded_sampling`)."""
        if not self.pending:
            return []
        with self.lock:
            took = [x for x in self.pending if x[0] == key and not x[3].done()]
            if took:
                self.pending = [x for x in self.pending if x[0] != key or x[3].done()]
        batch.extend(took)
        return [(x[1], x[2], _seed(x) if self.engine.seeded_sampling else None) for x in took]


def _seed(entry) -> int:
    """A pending request's seed; an unseeded one's drawn from torch's RNG."""
    return entry[4] if entry[4] is not None else int(torch.randint(0, 2**62, ()))


def _settle_one(entry, result) -> None:
    if not entry[3].done():
        entry[3].set_result(result)


def _settle(entries, results=None, error=None) -> None:
    """Resolve the futures of `entries` that are still waiting (a cancelled caller's is done)."""
    for k, x in enumerate(entries):
        if not x[3].done():
            if error is not None:
                x[3].set_exception(error)
            else:
                x[3].set_result(results[k])


def _contains_any(text: str, strings) -> bool:
    return any(s in text for s in strings)


def _tail(tokenizer, toks: list[int], strings) -> str:
    """The decoded tail of `toks`, long enough to hold any of `strings` that ends in its last
    token (every token decodes to at least one character; special tokens to their text)."""
    n = max((len(x) for x in strings), default=0) + 2
    return tokenizer.decode(toks[-n:]) if toks else ""


def hits_stop(tokenizer, toks: list[int], stop) -> bool:
    """Whether the generated `toks` now contain a stop string, wherever it ends: the last
    token may complete it and carry more text (SmolLM2 spells `</answer>.` as `</`,
    `answer`, `>.`). Checked after every token, so a hit is always in the last token."""
    stop = [s for s in stop if s]
    return bool(stop) and _contains_any(_tail(tokenizer, toks, stop), stop)


def token_texts(tokenizer) -> list[str]:
    """Every token's text as it reads inside a sequence (after another token: SentencePiece
    drops a leading space only at the start), special tokens as their text."""
    vocab = len(tokenizer)
    anchor = (tokenizer.encode("a", add_special_tokens=False) or [None])[-1]
    if anchor is None:
        return tokenizer.batch_decode([[i] for i in range(vocab)])
    head = tokenizer.decode([anchor])
    both = tokenizer.batch_decode([[anchor, i] for i in range(vocab)])
    alone = None
    out = []
    for i, t in enumerate(both):
        if t.startswith(head):
            out.append(t[len(head):])
        else:  # a decoder that rewrites across the boundary: fall back to the token alone
            alone = alone or tokenizer.batch_decode([[j] for j in range(vocab)])
            out.append(alone[i])
    return out


class StringBan:
    """Bans strings at the text level, whatever tokens would spell them. After generated text
    T (no banned string in it yet), token v would complete banned string b iff v's text
    contains b, or T ends with b[:j] and v's text starts with b[j:] (0 < j < len(b)).
    `banned(toks)` lists those tokens (mask them before sampling); `completes(toks, v)` checks
    one choice by decoding, the exact test, for tokenizers whose texts do not simply add up."""

    def __init__(self, tokenizer, ban, texts: list[str] | None = None):
        self.tokenizer, self.ban = tokenizer, tuple(b for b in ban if b)
        self.texts = texts if texts is not None else token_texts(tokenizer)
        self.always = [v for v, t in enumerate(self.texts) if _contains_any(t, self.ban)]
        self._starting: dict[str, list[int]] = {}

    def _starts_with(self, prefix: str) -> list[int]:
        if prefix not in self._starting:
            self._starting[prefix] = [v for v, t in enumerate(self.texts) if t.startswith(prefix)]
        return self._starting[prefix]

    def banned(self, toks: list[int]) -> list[int]:
        tail = _tail(self.tokenizer, toks, self.ban)
        ids = list(self.always)
        for b in self.ban:
            for j in range(1, len(b)):
                if tail.endswith(b[:j]):
                    ids += self._starts_with(b[j:])
        return ids

    def completes(self, toks: list[int], v: int) -> bool:
        return _contains_any(_tail(self.tokenizer, toks + [int(v)], self.ban), self.ban)
