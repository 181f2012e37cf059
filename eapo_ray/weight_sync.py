"""Weights from the learners to the engines: the one home of both paths.

Object store (rollout.weight_sync: object_store, any device; the CPU path CI tests): learner
rank 0 `publish`es the full state dict once per version as a `PublishedWeights` record;
rollout actors and the evaluator `load_published` it into their engine (vLLM's worker side of
that load is `vllm_engine.WeightSyncExtension`).

NCCL (rollout.weight_sync: nccl, GPUs only), `NCCLWeightSync` below:

Built on vLLM's weight-transfer API (vLLM 0.32, `vllm.distributed.weight_transfer`,
backend "nccl"): learner rank 0 and every rollout engine's workers form one NCCL group
(rank 0 = the learner, engine i's workers at 1 + i*tp ...), and each sync broadcasts
the full weights in packed buckets of `rollout.sync_bucket_mb` (not one call per tensor).
Every learner rank iterates the weights in lockstep because, under ZeRO-3, gathering a
parameter is a collective; only rank 0 sends.

The NCCL broadcast is NOT exercised by the CPU test suite (no GPU); `benchmarks/gpu_check.py`
is the check to run on a GPU machine. The engine side of it is the rollout actor's `weights`
concurrency group (`init_weight_transfer_engine`, `start/update/finish_weight_update`).

Deadlines (`sync_engines`, the driver's side of every NCCL sync; tested on CPU with real rollout
actors): the driver first pauses every engine and waits for its requests to drain
(`rollout.pause_timeout_s`) while no learner is inside a collective (under ZeRO-3 ranks > 0
would otherwise sit in their gathers, against DeepSpeed's 10-minute process-group timeout, while
rank 0 waits for the drain), then runs the learners' sync under `rollout.sync_timeout_s` (vLLM's
NCCL group has no timeout of its own: an engine that never joins a broadcast would hold rank 0
forever), and resumes every engine in `finally`, through their `control` concurrency group, which
a stuck weight update cannot block. Any failure comes back as one `WeightSyncError`.
"""
from __future__ import annotations

import sys
import time
from typing import NamedTuple

import ray
import torch

from eapo_ray.rollout.vllm_engine import check_vllm_version


class PublishedWeights(NamedTuple):
    """The learner's weights in the object store, as rollout actors and the evaluator get them."""
    version: int  # the policy version (learner updates done)
    box: list  # [ObjectRef] to the full state dict {name: CPU tensor}; boxed so Ray passes the ref, not the dict
    # How many times the learner group was rebuilt from a checkpoint: after a rebuild the version
    # numbers go back and are reused for different weights, so (generation, version) names weights.
    generation: int = 0


def publish(version: int, state_dict: dict, generation: int = 0) -> PublishedWeights:
    """Learner rank 0: one `ray.put` of the full weights per version (the driver passes the record on)."""
    return PublishedWeights(version, [ray.put(state_dict)], generation)


def load_published(engine, weights: PublishedWeights | None, *, newer_only: bool = True) -> bool:
    """Engine side: load `weights` into `engine` (an Engine) if they are newer than what it holds,
    i.e. a later (generation, version) (`newer_only=False`: if they differ at all, e.g. the
    evaluator asked for an older version). The engine's `version` is set; the generation is
    kept beside it. Returns whether it loaded."""
    if weights is None:
        return False
    have = (getattr(engine, "weights_generation", 0), engine.version)
    want = (int(weights.generation), int(weights.version))
    if not (want > have if newer_only else want != have):
        return False
    engine.load_weights(ray.get(weights.box[0]), want[1])
    engine.weights_generation = want[0]
    return True


class WeightSyncError(RuntimeError):
    """An NCCL weight sync that failed or ran out of time; every engine was resumed."""


def wait_all(refs: list, timeout_s: float, slice_s: float = 0.5) -> list:
    """`ray.wait` for all of `refs`, at most `timeout_s`, in slices of `slice_s` with the driver's
    `raise_if_interrupted` between them (a Ctrl-C does not wait out the deadline). Returns the ready ones."""
    from eapo_ray.ray_runtime import raise_if_interrupted

    deadline, waiting, ready = time.monotonic() + timeout_s, list(refs), []
    while waiting:
        raise_if_interrupted()
        left = deadline - time.monotonic()
        if left <= 0:
            break
        done, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=min(slice_s, left))
        ready += done
    return ready


def drain_engines(workers: list, timeout_s: float, rpc_slack_s: float = 30.0) -> None:
    """Pause generation on every rollout actor and wait until no request is in flight, at most
    `timeout_s` (+ `rpc_slack_s` for an actor that does not answer at all), polled in short slices
    (a Ctrl-C raises KeyboardInterrupt at once). Raises WeightSyncError naming the engines that did
    not drain (the caller resumes them all)."""
    refs = {w.pause_generation.remote(timeout_s): i for i, w in enumerate(workers)}
    ready = wait_all(list(refs), timeout_s + rpc_slack_s)
    bad = [f"engine {refs[r]}: no answer within {timeout_s + rpc_slack_s:g} s" for r in refs if r not in ready]
    for r in ready:
        try:
            ray.get(r)
        except Exception as e:  # noqa: BLE001 -- TimeoutError from the actor, a dead actor, ...
            bad.append(f"engine {refs[r]}: {first_line(e)}")
    if bad:
        raise WeightSyncError(f"rollout engines did not drain for the weight update within "
                              f"rollout.pause_timeout_s={timeout_s:g} s ({'; '.join(sorted(bad))})")


def resume_engines(workers: list, timeout_s: float = 30.0) -> list[str]:
    """Resume generation on every rollout actor (idempotent), waiting at most `timeout_s`;
    returns the engines that could not be resumed (said on stderr, not raised: a dead one is
    the rollout fleet's to retire)."""
    refs = {w.resume_generation.remote(): i for i, w in enumerate(workers)}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    bad = [f"engine {refs[r]}: no answer within {timeout_s:g} s" for r in refs if r not in ready]
    for r in ready:
        try:
            ray.get(r)
        except Exception as e:  # noqa: BLE001
            bad.append(f"engine {refs[r]}: {first_line(e)}")
    if bad:
        print(f"[eapo] could not resume generation after a weight update: {'; '.join(bad)}", file=sys.stderr,
              flush=True)
    return bad


def sync_engines(learners, workers: list, *, drain_timeout_s: float, sync_timeout_s: float) -> float:
    """The driver's side of one NCCL weight sync: drain every engine (bounded), then
    `learners.sync_weights(timeout_s=sync_timeout_s)` (the broadcast, bounded), then resume every
    engine, also when a step failed. Returns the seconds taken; raises WeightSyncError."""
    t0 = time.time()
    try:
        drain_engines(workers, drain_timeout_s)
        try:
            learners.sync_weights(timeout_s=sync_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WeightSyncError(f"the learners' NCCL weight broadcast to {len(workers)} engine(s) did not finish "
                                  f"within rollout.sync_timeout_s={sync_timeout_s:g} s") from None
        except Exception as e:  # noqa: BLE001 -- a learner or an engine failed inside the sync
            raise WeightSyncError(f"the learners' NCCL weight broadcast failed: {first_line(e)}") from e
    finally:
        resume_engines(workers)
    return time.time() - t0


def first_line(e: BaseException) -> str:
    """The exception's type and the last line of its message that says something (Ray wraps the
    remote traceback; its last line is the original error)."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]


def _weight_source_cls():
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class DeepSpeedSource(WeightSource):
        """The DeepSpeed module's parameters by HF name, gathered one at a time under ZeRO-3."""

        def __init__(self, module: torch.nn.Module, zero3: bool):
            self.module, self.zero3 = module, zero3

        def metadata(self):
            return [ParamMeta(n, p.dtype, tuple(p.ds_shape if self.zero3 else p.shape))
                    for n, p in self.module.named_parameters()]

        def __iter__(self):
            import deepspeed

            for name, p in self.module.named_parameters():
                with deepspeed.zero.GatheredParameters([p], enabled=self.zero3):
                    # under ZeRO-3 the gathered storage is freed when the context exits: copy it
                    yield name, (p.data.detach().clone() if self.zero3 else p.data.detach())

    return DeepSpeedSource


def _client_cls():
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest
    from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient

    class EngineFleetClient(RayVLLMWeightSyncClient):
        """vLLM's Ray client, fanned out to independent engines: vLLM's trainer hands every
        engine rank_offset 1, which only fits one engine; here engine i gets 1 + i*tp."""

        def __init__(self, actors: list, tp: int, timeout_s: float | None = None):
            super().__init__(list(actors))
            self.tp, self.version, self.timeout_s = tp, None, timeout_s

        def init_weight_transfer_engine(self, init_info: dict) -> None:
            ray.get([h.init_weight_transfer_engine.remote(
                WeightTransferInitRequest(init_info={**init_info, "rank_offset": 1 + i * self.tp}))
                for i, h in enumerate(self.handles)], timeout=self.timeout_s)

        def start_weight_update(self) -> None:  # bounded: an engine that does not answer fails rank 0's send
            ray.get([h.start_weight_update.remote() for h in self.handles], timeout=self.timeout_s)

        def finish_weight_update(self, weight_version: str | None = None) -> None:
            ray.get([h.finish_weight_update.remote(self.version) for h in self.handles], timeout=self.timeout_s)

    return EngineFleetClient


class NCCLWeightSync:
    """One per learner rank; `send(version)` is a collective over the learner ranks."""

    def __init__(self, module: torch.nn.Module, *, rank: int, zero3: bool, actors: list, tp: int, bucket_mb: int,
                 master_address: str, master_port: int, timeout_s: float | None = None):
        check_vllm_version()
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        info = NCCLTrainerInitInfo(master_address=master_address, master_port=master_port,
                                   world_size=1 + len(actors) * tp, packed=True,
                                   packed_buffer_size_bytes=bucket_mb << 20, rank=rank)
        self.client = _client_cls()(actors, tp, timeout_s)  # its engine RPCs; the driver bounds the whole sync
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
            info, client=self.client, source=_weight_source_cls()(module, zero3))

    def send(self, version: int) -> None:
        self.client.version = version
        self.engine.send_weights()
