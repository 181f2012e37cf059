"""The learner actor: one rank of the DeepSpeed group. It joins the process group, builds the
engine around the policy (`forward.PolicyLogProbs`), trains its shard of each update, publishes
or broadcasts the weights and saves checkpoints; every public method is a collective."""
from __future__ import annotations

import math
import os
import socket
import sys
import time
from pathlib import Path

import ray
import torch
from torch.distributed import ReduceOp

from eapo_ray.algo.batching import (
    collate,
    collate_prompts,
    collate_responses,
    merge_batches,
    padded_tokens,
    sample_rows,
    split_batch,
    split_by_length,
    split_by_tokens,
    split_shared,
)
from eapo_ray.algo.losses import kept_mask, log_importance, luffy_loss, normaliser, policy_loss, sft_loss
from eapo_ray.algo.schedules import expert_sft_weight, replay_weight
from eapo_ray.config import RunConfig
from eapo_ray.learner.checkpoints import prune_checkpoints
from eapo_ray.learner.forward import LOGP_CHUNK_TOKENS, PolicyLogProbs, sharing_agrees, unshareable
from eapo_ray.learner.stats import StepStats, add_gap, ds_config, fetch_batches, luffy_mask


class Learner:
    def __init__(self, cfg: RunConfig, rank: int, world_size: int):
        torch.set_num_threads(cfg.learner.torch_threads)
        torch.manual_seed(cfg.seed)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.version = 0
        self.weight_sync = None
        self.share_prompts = False  # set in setup

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
        model.train()  # from_pretrained leaves eval mode, and HF checkpoints activations only in training mode
        self.model = model  # the HF model; the engine's module shares its parameters
        opt = torch.optim.AdamW(model.parameters(), lr=self.cfg.learner.lr, weight_decay=self.cfg.learner.weight_decay)
        module = PolicyLogProbs(model, self.cfg.rollout.temperature)
        lc = self.cfg.learner
        # learner.share_prompts where it applies (the default path: length buckets, no token cap, ZeRO 0-2, no
        # activation checkpointing: the prompt pass must return its keys/values) and where this model's
        # shared forward gives the plain forward's log-probs (checked on a small random batch)
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=ds_config(self.cfg))
        share = (lc.share_prompts and lc.length_buckets and lc.max_tokens_per_microbatch <= 0 and lc.zero_stage < 3
                 and lc.epochs == 1 and lc.minibatches == 1 and not lc.gradient_checkpointing)
        if share:
            why = unshareable(model.config) or (
                not sharing_agrees(self.engine.module, model.config.vocab_size, self.engine.device,
                                   atol=0.1 if lc.bf16 else 1e-4) and "its shared forward did not match the plain one")
            if why:  # said by the rank whose check failed (the all-reduce below turns it off on every rank)
                share = False
                print(f"[eapo] learner.share_prompts is off for {self.cfg.model.policy} (rank {self.rank}): {why}; "
                      "training with the plain forward", file=sys.stderr, flush=True)
        (agree,) = self._all_reduce([share], ReduceOp.MIN)  # every rank takes the same path (collectives)
        self.share_prompts = bool(agree)
        if resume_dir:
            _, client = self.engine.load_checkpoint(resume_dir)  # the tag in its "latest" file
            self.version = int(client["version"])
        return self.version

    def _all_reduce(self, values: list, op=ReduceOp.SUM) -> list[float]:
        """Collective: `values` reduced elementwise over the ranks."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.engine.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(t, op=op)
        return t.tolist()

    def _logp(self, b, num_chunks: int) -> torch.Tensor:
        """Token log-probs of a collated micro-batch; b None: a dummy 2-token forward for a rank
        with fewer micro-batches than another (ZeRO-3 gathers parameters inside forward)."""
        if b is None:
            pad = self.tokenizer.pad_token_id or 0
            ids = torch.full((1, 2), pad, dtype=torch.long, device=self.engine.device)
            b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return self.engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], num_chunks=num_chunks)

    def _normalisers(self, micro: list, olds: list) -> tuple[list, dict]:
        """Collective. Each minibatch's global loss denominators (kept tokens or sequences, Dr.
        GRPO's sequences x max_response_tokens, expert tokens for SFT), summed over its micro-batches
        and the ranks, then divided by world_size since DeepSpeed averages gradients over ranks;
        and the gap |log mu - log pi_old| on policy tokens (mean, max) over the whole step: over
        every sample (`behav_gap_*`: staleness plus numerics), and over the samples generated by
        exactly these weights (`logp_gap_*`: engine vs learner numerics, ~0 when they agree)."""
        c, shares, gap, on_gap = self.cfg, [], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]  # sum, count, max
        for mb, old in zip(micro, olds):
            pol = sft = luffy = replay = 0.0
            for b, o in zip(mb, old):
                if b is None:
                    continue
                keep = kept_mask(o, b["behav_logp"], b["policy_mask"], c.loss)
                # replay-view rows (algo.replay) carry no policy tokens; they are not sequences of the policy loss
                view = b.get("view")
                pol += float(normaliser(keep if view is None else keep[view == 0], c.loss.agg,
                                        c.rollout.max_response_tokens))
                sft += float(b["expert_mask"].sum())
                luffy += float(luffy_mask(b).sum())
                replay += float(b["replay_mask"].sum()) if "replay_mask" in b else 0.0
                log_w, finite = log_importance(o, b["behav_logp"])
                on = (b["policy_mask"] > 0) & finite
                gap = add_gap(gap, log_w, on)
                on_gap = add_gap(on_gap, log_w, on & (b["version"] == self.version)[:, None])
            shares += [pol, sft, luffy, replay]
        *shares, gsum, gcount, osum, ocount = self._all_reduce(shares + gap[:2] + on_gap[:2])
        gmax, omax = self._all_reduce([gap[2], on_gap[2]], ReduceOp.MAX)
        norms = [{"policy": max(p, 1.0) / self.world_size, "sft": max(e, 1.0) / self.world_size,
                  "luffy": max(f, 1.0) / self.world_size, "replay": max(r, 1.0) / self.world_size}
                 for p, e, f, r in zip(shares[0::4], shares[1::4], shares[2::4], shares[3::4])]
        return norms, {"behav_gap_mean": gsum / gcount if gcount else 0.0, "behav_gap_max": gmax,
                       "logp_gap_mean": osum / ocount if ocount else 0.0, "logp_gap_max": omax,
                       "logp_gap_tokens": ocount}

    def _loss(self, b, logp, old_logp, norm: dict, acc: StepStats) -> torch.Tensor:
        """This micro-batch's share of the minibatch loss (global normalisers); 0 x the log-probs
        for a dummy pass, which still joins the gradient reduction."""
        if b is None:
            return logp.sum() * 0.0
        c = self.cfg
        loss, st = policy_loss(logp, old_logp, b["behav_logp"], b["advantage"], b["policy_mask"], c.loss,
                               denom=norm["policy"])
        sft = None
        if c.algo.expert_sft_coef > 0:
            # each sample's coefficient from the rho it was generated under (its behaviour rho)
            w = expert_sft_weight(c.algo, b["accept_prob"])
            loss = loss + sft_loss(logp, b["expert_mask"], denom=norm["sft"], weight=w)
            sft = sft_loss(logp.detach(), b["expert_mask"], denom=norm["sft"])  # the unweighted NLL, logged
        if c.algo.expert_token_channel == "luffy":
            lf, lst = luffy_loss(logp, b["expert_logp"], b["advantage"], luffy_mask(b), c.algo.luffy_gamma,
                                 denom=norm["luffy"])
            loss = loss + c.algo.luffy_coef * lf
            st = {**st, "luffy_loss": float(lf.detach()), **lst}
        if c.algo.expert_token_channel in ("replay", "own_steps"):  # the views' expert-answer tokens (algo.replay)
            w = replay_weight(c.algo, b["accept_prob"], b["advantage"])
            loss = loss + sft_loss(logp, b["replay_mask"], denom=norm["replay"], weight=w)
            st = {**st, "replay_loss": float(sft_loss(logp.detach(), b["replay_mask"], denom=norm["replay"])),
                  "replay_tokens": float(b["replay_mask"].sum())}
        acc.add(st, loss.item(), None if sft is None else sft.item())
        return loss

    def train_step(self, boxes: list) -> dict:
        """One policy update: `boxes` = [[ref], ...] of batches from the buffer; this rank
        trains on its 1/world_size slice of their samples. Collective: all ranks."""
        t0 = time.time()
        lc = self.cfg.learner
        fetched = fetch_batches(boxes)
        t_fetch = time.time()
        # Train only on the batches every rank got: ranks that split different batches would run
        # different collectives and hang.
        got = self._all_reduce([b is not None for b in fetched], ReduceOp.MIN)
        batches = [b for b, ok in zip(fetched, got) if ok]
        lost = len(boxes) - len(batches)
        if not batches:  # every rank agreed on this, so all skip this update together
            self.version += 1
            return {"lost_batches": lost, "learner_samples": 0, "train_seconds": time.time() - t0, "staleness": 0,
                    "forward_tokens": 0, "share_prompts": int(self.share_prompts)}
        tm = dict.fromkeys(("old_logp_s", "forward_s", "backward_s", "optim_s"), 0.0)  # + forward_tokens
        pad = self.tokenizer.pad_token_id or 0
        shard = split_batch(merge_batches(batches), self.world_size)[self.rank]
        if self.share_prompts and lc.epochs == 1 and lc.minibatches == 1:
            return self._train_shared(shard, batches, lost, t0, t_fetch, tm)
        # learner.length_buckets (and no token cap): each minibatch in micro-batches of similar
        # lengths, all forwarded before any backward (their pi_old comes from those same forwards)
        buckets = lc.length_buckets and lc.max_tokens_per_microbatch <= 0 and lc.zero_stage < 3
        micro = [split_by_length(mb) if buckets else split_by_tokens(mb, lc.max_tokens_per_microbatch)
                 for mb in split_batch(shard, lc.minibatches)]
        # Every rank runs, per minibatch, as many forward passes as the rank that needs the most
        # (dummy ones pad), each with the same number of lm_head chunks: ZeRO-3 gathers parameters
        # inside forward. A minibatch empty on every rank takes no backward and no optimizer step.
        plan = self._all_reduce([len(m) for m in micro] + [max(map(padded_tokens, sum(micro, [])), default=0)],
                                ReduceOp.MAX)
        chunks = max(1, math.ceil(plan[-1] / LOGP_CHUNK_TOKENS))
        dev = self.engine.device
        micro = [[{k: v.to(dev) for k, v in collate(x, pad).items()} for x in m] + [None] * (int(n) - len(m))
                 for m, n in zip(micro, plan[:-1])]

        # pi_old is the policy before this update. With one epoch of one minibatch in one forward
        # pass, that forward's own log-probs are pi_old (same weights); otherwise one pass first.
        reuse = lc.epochs == 1 and len(micro) == 1 and len(micro[0]) <= 1
        # One epoch of one minibatch in length buckets: every bucket's forward runs on the same
        # weights (the step comes after the last backward), so their detached log-probs are pi_old.
        reuse_all = buckets and lc.epochs == 1 and len(micro) == 1 and len(micro[0]) > 1
        t_prep = time.time()
        tm["forward_tokens"] = sum(b["input_ids"].numel() for m in micro for b in m if b is not None)  # padded, this rank
        tm["share_prompts"] = 0
        if reuse_all:
            return self._train_buckets(micro[0], chunks, batches, shard, lost, t0, t_fetch, t_prep, tm)
        if not reuse:
            with torch.no_grad():
                olds = [[self._logp(b, chunks) for b in mb] for mb in micro]
            norms, gap = self._normalisers(micro, olds)
            tm["old_logp_s"] = time.time() - t_prep
        acc, n_updates = StepStats.of(self.cfg.algo), 0
        for _ in range(lc.epochs):
            for i, mb in enumerate(micro):
                if not mb:
                    continue
                for j, b in enumerate(mb):
                    self.engine.set_gradient_accumulation_boundary(j == len(mb) - 1)  # one step per minibatch
                    t = time.time()
                    logp = self._logp(b, chunks)
                    if reuse:
                        olds = [[logp.detach()]]
                        norms, gap = self._normalisers(micro, olds)
                    loss = self._loss(b, logp, olds[i][j], norms[i], acc)
                    t_fwd = time.time()
                    tm["forward_s"] += t_fwd - t
                    self.engine.backward(loss)
                    tm["backward_s"] += time.time() - t_fwd
                t = time.time()
                self.engine.step()
                tm["optim_s"] += time.time() - t
                n_updates += 1
        self.version += 1
        stats = {**acc.reduce(self._all_reduce, self.world_size, n_updates), **gap} if n_updates else {}
        stats["learner_samples"] = sample_rows(shard)
        stats["lost_batches"] = lost
        stats["train_seconds"] = time.time() - t0
        # the breakdown: fetch (ray.get of the batches), prep (merge, split, collate), pi_old pass (0 when
        # the update's own forward is reused), forward (+ loss), backward, optimizer step
        stats.update(fetch_s=t_fetch - t0, prep_s=t_prep - t_fetch, **tm)
        stats["staleness"] = self.version - 1 - min((min(b["version"]) for b in batches), default=self.version - 1)
        return stats

    def _train_buckets(self, mb: list, chunks: int, batches, shard, lost, t0, t_fetch, t_prep, tm) -> dict:
        """One update on one minibatch of several micro-batches (learner.length_buckets): forward
        all of them (the graphs are kept: together no larger than one padded forward of the whole
        minibatch), take their detached log-probs as pi_old, then loss and backward one by one
        with the minibatch's global denominators, and one optimizer step. The same loss and
        gradient as one padded pass over the minibatch (up to float summation order)."""
        acc = StepStats.of(self.cfg.algo)
        t = time.time()
        logps = [self._logp(b, chunks) for b in mb]
        olds = [[lp.detach() for lp in logps]]
        norms, gap = self._normalisers([mb], olds)
        tm["forward_s"] += time.time() - t
        for j, (b, logp) in enumerate(zip(mb, logps)):
            t = time.time()
            loss = self._loss(b, logp, olds[0][j], norms[0], acc)
            t_fwd = time.time()
            tm["forward_s"] += t_fwd - t
            self.engine.set_gradient_accumulation_boundary(j == len(mb) - 1)
            self.engine.backward(loss)
            tm["backward_s"] += time.time() - t_fwd
        t = time.time()
        self.engine.step()
        tm["optim_s"] += time.time() - t
        self.version += 1
        stats = {**acc.reduce(self._all_reduce, self.world_size, 1), **gap}
        stats.update(learner_samples=sample_rows(shard), lost_batches=lost, train_seconds=time.time() - t0,
                     fetch_s=t_fetch - t0, prep_s=t_prep - t_fetch, **tm)
        stats["staleness"] = self.version - 1 - min((min(b["version"]) for b in batches), default=self.version - 1)
        return stats

    def _train_shared(self, shard: dict, batches, lost, t0, t_fetch, tm) -> dict:
        """One update on one minibatch with each distinct prompt computed once (learner.share_prompts;
        algo.batching.split_shared, PolicyLogProbs.shared_forward): one forward of the prompts and
        the response micro-batches (by response length), their detached log-probs as pi_old, the
        loss over all of them with the minibatch's global denominators, one backward, one step.
        The same loss and gradient as `_train_buckets` (float order aside; tested)."""
        acc = StepStats.of(self.cfg.algo)
        pad, dev = self.tokenizer.pad_token_id or 0, self.engine.device
        prompts, parts = split_shared(shard)
        if parts:
            shared = {k: v.to(dev) for k, v in collate_prompts(prompts, pad).items()}
            mb = [{k: v.to(dev) for k, v in collate_responses(b, pad).items()} for b in parts]
            shared.update(buckets=mb, chunk_tokens=LOGP_CHUNK_TOKENS)
            t_prep = time.time()
            logps = self.engine(shared=shared)
        else:  # an empty shard on this rank: a dummy pass of the same kind still joins the gradient reduction
            ids = torch.full((1, 1), pad, dtype=torch.long, device=dev)
            mb, t_prep = [None], time.time()
            logps = self.engine(shared={"prompt_ids": ids, "prompt_mask": torch.ones_like(ids),
                                        "prompt_len": torch.ones(1, dtype=torch.long, device=dev), "buckets": [
                                            {"response_ids": ids, "response_mask": torch.ones_like(ids),
                                             "prompt_index": torch.zeros(1, dtype=torch.long, device=dev)}]})
        olds = [[lp.detach() for lp in logps]]
        norms, gap = self._normalisers([mb], olds)
        loss = sum(self._loss(b, lp, old, norms[0], acc) for b, lp, old in zip(mb, logps, olds[0]))
        t = time.time()
        tm["forward_s"] = t - t_prep
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.backward(loss)
        tm["backward_s"] = time.time() - t
        t = time.time()
        self.engine.step()
        tm["optim_s"] = time.time() - t
        self.version += 1
        stats = {**acc.reduce(self._all_reduce, self.world_size, 1), **gap}
        stats.update(learner_samples=sample_rows(shard), lost_batches=lost, train_seconds=time.time() - t0,
                     fetch_s=t_fetch - t0, prep_s=t_prep - t_fetch, **tm)
        # tokens through the model on this rank (rank 0's in the metrics)
        stats["forward_tokens"] = PolicyLogProbs.shared_tokens(shared["prompt_ids"], mb) if parts else 0
        stats["share_prompts"] = 1
        stats["staleness"] = self.version - 1 - min((min(b["version"]) for b in batches), default=self.version - 1)
        return stats

    def full_state_dict(self) -> dict:
        """The unsharded weights, on CPU, on rank 0 ({} on the others, which only publish and save
        through rank 0: a full copy per rank was 15 GB of host RAM per 7B rank); a collective under ZeRO-3."""
        import deepspeed

        module = self.model
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.cfg.learner.zero_stage == 3):
            if self.rank != 0:
                return {}
            return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}

    def publish(self):
        """Collective. Rank 0 returns a weight_sync.PublishedWeights; others None."""
        from eapo_ray.weight_sync import publish

        sd = self.full_state_dict()
        return publish(self.version, sd) if self.rank == 0 else None

    def init_weight_sync(self, rollout_actors: list) -> None:
        """Collective. NCCL path (GPU): open vLLM's weight-transfer group with the rollout engines."""
        from eapo_ray.weight_sync import NCCLWeightSync

        r = self.cfg.rollout
        addr, port = self.endpoint() if self.rank == 0 else ("", 0)
        self.weight_sync = NCCLWeightSync(
            self.model, rank=self.rank, zero3=self.cfg.learner.zero_stage == 3, actors=rollout_actors, timeout_s=r.sync_timeout_s,
            tp=r.vllm.tensor_parallel_size, bucket_mb=r.sync_bucket_mb, master_address=addr, master_port=port)

    def sync_weights(self) -> float:
        """Collective. Broadcast the current weights to every rollout engine; seconds taken."""
        t0 = time.time()
        self.weight_sync.send(self.version)
        return time.time() - t0

    def save(self, run_dir: str, hf: bool = True) -> str:
        """Collective. A DeepSpeed checkpoint (for resume) and, on rank 0, an HF directory; then
        every rank deletes all but the newest learner.checkpoint_keep checkpoint tags of its
        node's copy (learner/checkpoints.py: nodes without a shared run_root hold their own)."""
        ckpt = Path(run_dir) / "checkpoint"
        self.engine.save_checkpoint(str(ckpt), tag=f"step{self.version}", client_state={"version": self.version})
        sd = self.full_state_dict()
        if hf and self.rank == 0:
            out = Path(run_dir) / "final"
            self.model.save_pretrained(out, state_dict=sd)
            self.tokenizer.save_pretrained(out)
        if self.world_size > 1:
            torch.distributed.barrier()  # every rank has written its part of this tag
        prune_checkpoints(ckpt, self.cfg.learner.checkpoint_keep, current=f"step{self.version}")
        return str(ckpt)

    def ping(self) -> str:
        return "pong"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
