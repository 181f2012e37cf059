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
        if getattr(self, "_batcher", None) is None:
            self._batcher = _MicroBatcher(self)
        return await self._batcher.submit(prompt, max_new_tokens, (temperature, tuple(stop), tuple(ban)))


class _MicroBatcher:
    """Collects the requests that arrive while the engine is busy (or within a few ms of
    each other) and runs them as one `generate` call; requests with different sampling
    settings go into different batches."""

    def __init__(self, engine: Engine, settle_s: float = 0.002):
        self.engine, self.settle_s, self.pending, self.busy = engine, settle_s, [], False

    async def submit(self, prompt, max_new_tokens, key):
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((key, prompt, max_new_tokens, fut))
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self):
        try:
            while self.pending:
                n = -1
                while n != len(self.pending):  # wait until no more requests are arriving
                    n = len(self.pending)
                    await asyncio.sleep(self.settle_s)
                key = self.pending[0][0]
                batch = [x for x in self.pending if x[0] == key]
                self.pending = [x for x in self.pending if x[0] != key]
                try:
                    gens = await asyncio.to_thread(self.engine.generate, [x[1] for x in batch], [x[2] for x in batch],
                                                   key[0], list(key[1]), list(key[2]))
                except Exception as e:  # noqa: BLE001 -- handed to every waiting request
                    for x in batch:
                        x[3].set_exception(e)
                    continue
                for x, g in zip(batch, gens):
                    x[3].set_result(g)
        finally:
            self.busy = False


class HFEngine(Engine):
    """transformers `generate` on CPU (or one GPU), batched with left padding."""

    def __init__(self, model_path: str, tokenizer=None, device: str = "cpu", dtype=torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.device = device
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.version = 0

    def _stop_ids(self, stop: list[str]) -> tuple[list[int], list[str]]:
        """Stops that are single tokens become eos ids; the rest stay strings."""
        ids, strings = [self.tokenizer.eos_token_id], []
        for s in stop:
            t = self.tokenizer.encode(s, add_special_tokens=False)
            (ids.append(t[0]) if len(t) == 1 else strings.append(s))
        return ids, strings

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature, stop, ban=()):
        from transformers import GenerationConfig

        if not prompts:
            return []
        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, n - len(p):], attn[i, n - len(p):] = torch.tensor(p), 1
        stop_ids, stop_strings = self._stop_ids(stop)
        greedy = temperature <= 0
        gen_cfg = GenerationConfig(
            max_new_tokens=max(max_new_tokens), do_sample=not greedy, temperature=None if greedy else temperature,
            top_k=None, top_p=None, eos_token_id=stop_ids, pad_token_id=self.pad_id,
            stop_strings=stop_strings or None, return_dict_in_generate=True, output_logits=True,
            bad_words_ids=[self.tokenizer.encode(s, add_special_tokens=False) for s in ban] or None)
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                  generation_config=gen_cfg, tokenizer=self.tokenizer if stop_strings else None)
        new = out.sequences[:, n:].cpu()
        logits = torch.stack(out.logits, dim=1).float().cpu()  # [B, new, V] raw
        logp = torch.log_softmax(logits / (1.0 if greedy else temperature), dim=-1)
        token_logp = logp.gather(-1, new[..., None]).squeeze(-1)
        results = []
        for i in range(len(prompts)):
            toks, lps, finish = [], [], "length"
            for j in range(min(new.shape[1], max_new_tokens[i])):
                t = int(new[i, j])
                toks.append(t)
                lps.append(float(token_logp[i, j]))
                if t in stop_ids or (stop_strings and any(self.tokenizer.decode(toks).endswith(s) for s in stop_strings)):
                    finish = "stop"
                    break
            results.append(Generation(toks, lps, finish))
        return results

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
