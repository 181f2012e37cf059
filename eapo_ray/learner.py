"""The learner group: N Ray actors, one torch.distributed group (gloo on CPU, NCCL on
GPU), each a DeepSpeed engine around the policy. They train data-parallel on shards of
the batches pulled from the buffer, then rank 0 publishes the full weights once to the
object store with a version number."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import ray
import torch

from eapo_ray.algo.losses import policy_loss, sft_loss
from eapo_ray.algo.sampling import collate, merge_batches, split_batch, token_logprobs
from eapo_ray.config import RunConfig


def fetch_batches(boxes: list) -> tuple[list, int]:
    """ray.get each boxed batch ref; a batch whose producer died before the learner read
    it (its owner is gone) is skipped and counted, not fatal."""
    batches, lost = [], 0
    for box in boxes:
        try:
            batches.append(ray.get(box[0]))
        except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError):
            lost += 1
    return batches, lost


def ds_config(cfg: RunConfig) -> dict:
    lc = cfg.learner
    return {
        "train_micro_batch_size_per_gpu": 1,  # we call backward/step ourselves, one minibatch at a time
        "gradient_accumulation_steps": 1,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": {"stage": lc.zero_stage},
        "bf16": {"enabled": lc.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Learner:
    def __init__(self, cfg: RunConfig, rank: int, world_size: int):
        torch.set_num_threads(cfg.learner.torch_threads)
        torch.manual_seed(cfg.seed)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.version = 0
        self.weight_sync = None

    def endpoint(self) -> tuple[str, int]:
        """This actor's node address and a free port there (rank 0 hosts the rendezvous)."""
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int, resume_dir: str = "") -> int:
        """Join the process group and build the DeepSpeed engine (collective: all ranks)."""
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size),
                          LOCAL_RANK="0" if self.cfg.learner.num_gpus else str(self.rank))

        if self.cfg.learner.backend == "gloo":
            import importlib

            # Skip DeepSpeed's JIT shared-memory all-reduce op (a 35-75 s g++ build on a new machine);
            # gloo does the collectives. (`import deepspeed.comm.torch as m` would bind the torch package.)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend=self.cfg.learner.backend, auto_mpi_discovery=False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model.policy)
        model = AutoModelForCausalLM.from_pretrained(self.cfg.model.policy, dtype=torch.float32)
        if self.cfg.learner.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        opt = torch.optim.AdamW(model.parameters(), lr=self.cfg.learner.lr, weight_decay=self.cfg.learner.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(self.cfg))
        if resume_dir:
            _, client = self.engine.load_checkpoint(resume_dir)  # the tag in its "latest" file
            self.version = int(client["version"])
        return self.version

    def _logp(self, b):
        out = self.engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return token_logprobs(out.logits, b["input_ids"], self.cfg.rollout.temperature)

    def train_step(self, boxes: list) -> dict:
        """One policy update: `boxes` = [[ref], ...] of batches from the buffer; this rank
        trains on its 1/world_size slice of their samples."""
        t0 = time.time()
        batches, lost = fetch_batches(boxes)
        if not batches:  # every rank sees the same loss, so all skip this update together
            self.version += 1
            return {"lost_batches": lost, "learner_samples": 0, "train_seconds": time.time() - t0, "staleness": 0}
        c = self.cfg
        pad = self.tokenizer.pad_token_id or 0
        shard = split_batch(merge_batches(batches), self.world_size)[self.rank]
        minis = split_batch(shard, c.learner.minibatches)
        stats_sum, n_updates = {}, 0
        for _ in range(c.learner.epochs):
            olds = []
            with torch.no_grad():
                for mb in minis:
                    olds.append(self._logp(collate(mb, pad)) if mb["input_ids"] else None)
            for mb, old in zip(minis, olds):
                if not mb["input_ids"]:  # an empty shard still joins the gradient all-reduce
                    loss = sum(p.sum() * 0.0 for p in self.engine.module.parameters())
                    self.engine.backward(loss)
                    self.engine.step()
                    continue
                b = collate(mb, pad)
                logp = self._logp(b)
                loss, st = policy_loss(logp, old, b["behav_logp"], b["advantage"], b["policy_mask"], c.loss)
                if c.algo.expert_sft_coef > 0:
                    st["expert_sft_loss"] = (sft := sft_loss(logp, b["expert_mask"])).item()
                    loss = loss + c.algo.expert_sft_coef * sft
                st["loss"] = loss.item()
                self.engine.backward(loss)
                self.engine.step()
                for k, v in st.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + v
                n_updates += 1
        self.version += 1
        stats = {k: v / max(1, n_updates) for k, v in stats_sum.items()}
        stats["learner_samples"] = len(shard["input_ids"])
        stats["lost_batches"] = lost
        stats["train_seconds"] = time.time() - t0
        stats["staleness"] = self.version - 1 - min((min(b["version"]) for b in batches), default=self.version - 1)
        return stats

    def full_state_dict(self) -> dict:
        """The unsharded weights on every rank (a collective under ZeRO-3)."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.cfg.learner.zero_stage == 3):
            return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}

    def publish(self):
        """Collective. Rank 0 returns (version, [ref to the full state dict]); others None."""
        sd = self.full_state_dict()
        return (self.version, [ray.put(sd)]) if self.rank == 0 else None

    def init_weight_sync(self, rollout_actors: list) -> None:
        """Collective. NCCL path (GPU): open vLLM's weight-transfer group with the rollout engines."""
        from eapo_ray.weight_sync import NCCLWeightSync

        r = self.cfg.rollout
        addr, port = self.endpoint() if self.rank == 0 else ("", 0)
        self.weight_sync = NCCLWeightSync(
            self.engine.module, rank=self.rank, zero3=self.cfg.learner.zero_stage == 3, actors=rollout_actors,
            tp=r.vllm.tensor_parallel_size, bucket_mb=r.sync_bucket_mb, master_address=addr, master_port=port)

    def sync_weights(self) -> float:
        """Collective. Broadcast the current weights to every rollout engine; seconds taken."""
        t0 = time.time()
        self.weight_sync.send(self.version)
        return time.time() - t0

    def save(self, run_dir: str, hf: bool = True) -> str:
        """Collective. A DeepSpeed checkpoint (for resume) and, on rank 0, an HF directory."""
        ckpt = Path(run_dir) / "checkpoint"
        self.engine.save_checkpoint(str(ckpt), tag=f"step{self.version}", client_state={"version": self.version})
        sd = self.full_state_dict()
        if hf and self.rank == 0:
            out = Path(run_dir) / "final"
            self.engine.module.save_pretrained(out, state_dict=sd)
            self.tokenizer.save_pretrained(out)
        return str(ckpt)

    def ping(self) -> str:
        return "pong"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LearnerGroup:
    """Creates the N learner actors and fans calls out to all of them."""

    def __init__(self, cfg: RunConfig, run_name: str):
        lc = cfg.learner
        n = lc.num_learners
        cls = ray.remote(Learner)
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": lc.num_cpus, **({"GPU": lc.num_gpus} if lc.num_gpus else {})}
        self.pg = placement_group([bundle] * n, strategy="PACK", name=f"{run_name}-learners")
        ray.get(self.pg.ready())
        self.actors = [
            cls.options(name=f"{run_name}-learner-{r}", num_cpus=lc.num_cpus, num_gpus=lc.num_gpus,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
                        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(lc.torch_threads)}})
            .remote(cfg, r, n)
            for r in range(n)
        ]

    def setup(self, resume_dir: str = "") -> int:
        addr, port = ray.get(self.actors[0].endpoint.remote())  # rank 0's node: learners may span nodes
        return ray.get([a.setup.remote(addr, port, resume_dir) for a in self.actors])[0]

    def init_weight_sync(self, rollout_actors: list) -> None:
        ray.get([a.init_weight_sync.remote(rollout_actors) for a in self.actors])

    def sync_weights(self) -> float:
        return ray.get([a.sync_weights.remote() for a in self.actors])[0]

    def train_step(self, items: list) -> dict:
        """items: [(version, [ref], n), ...] from the buffer; every rank gets the refs."""
        boxes = [box for _, box, _ in items]
        results = ray.get([a.train_step.remote(boxes) for a in self.actors])
        out = dict(results[0])
        out["learner_samples"] = sum(r["learner_samples"] for r in results)
        return out

    def publish(self):
        return ray.get([a.publish.remote() for a in self.actors])[0]

    def save(self, run_dir: str) -> str:
        return ray.get([a.save.remote(run_dir) for a in self.actors])[0]

    def shutdown(self):
        for a in self.actors:
            ray.kill(a)
        ray.util.remove_placement_group(self.pg)
