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

The NCCL path is NOT exercised by the CPU test suite (no GPU); `benchmarks/gpu_check.py`
is the check to run on a GPU machine. The engine side of it is the rollout actor's `weights`
concurrency group (`init_weight_transfer_engine`, `start/update/finish_weight_update`).
"""
from __future__ import annotations

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

        def __init__(self, actors: list, tp: int):
            super().__init__(list(actors))
            self.tp, self.version = tp, None

        def init_weight_transfer_engine(self, init_info: dict) -> None:
            ray.get([h.init_weight_transfer_engine.remote(
                WeightTransferInitRequest(init_info={**init_info, "rank_offset": 1 + i * self.tp}))
                for i, h in enumerate(self.handles)])

        def finish_weight_update(self, weight_version: str | None = None) -> None:
            ray.get([h.finish_weight_update.remote(self.version) for h in self.handles])

    return EngineFleetClient


class NCCLWeightSync:
    """One per learner rank; `send(version)` is a collective over the learner ranks."""

    def __init__(self, module: torch.nn.Module, *, rank: int, zero3: bool, actors: list, tp: int, bucket_mb: int,
                 master_address: str, master_port: int):
        check_vllm_version()
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        info = NCCLTrainerInitInfo(master_address=master_address, master_port=master_port,
                                   world_size=1 + len(actors) * tp, packed=True,
                                   packed_buffer_size_bytes=bucket_mb << 20, rank=rank)
        self.client = _client_cls()(actors, tp)
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
            info, client=self.client, source=_weight_source_cls()(module, zero3))

    def send(self, version: int) -> None:
        self.client.version = version
        self.engine.send_weights()
