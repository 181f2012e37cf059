"""The learner group: N Ray actors, one torch.distributed group (gloo on CPU, NCCL on
GPU), each a DeepSpeed engine around the policy. They train data-parallel on shards of
the batches pulled from the buffer, then rank 0 publishes the full weights once to the
object store with a version number."""
from __future__ import annotations

import math
import os
import re
import shutil
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
    split_batch,
    split_by_length,
    split_by_tokens,
    split_shared,
)
from eapo_ray.algo.logprobs import aligned_token_logprobs, hidden_token_logprobs
from eapo_ray.algo.losses import kept_mask, log_importance, luffy_loss, normaliser, policy_loss, sft_loss
from eapo_ray.algo.schedules import expert_sft_weight
from eapo_ray.config import RunConfig

LOGP_CHUNK_TOKENS = 1024  # positions per lm_head chunk: the logits held at once are this x vocabulary


def fetch_batches(boxes: list) -> list:
    """ray.get each boxed batch ref; None for a batch whose producer died before the learner
    read it (its owner is gone): skipped and counted, not fatal."""
    batches = []
    for box in boxes:
        try:
            batches.append(ray.get(box[0]))
        except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError):
            batches.append(None)
    return batches


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` DeepSpeed tag directories step<version> (never the
    one the `latest` file names); keep_last <= 0 keeps all. Returns the deleted tags."""
    if keep_last <= 0:
        return []
    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").exists() else None
    tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and re.fullmatch(r"step\d+", p.name)),
                  key=lambda p: int(p.name[4:]))
    old = [p for p in tags[:-keep_last] if p.name != latest]
    for p in old:
        shutil.rmtree(p)
    return [p.name for p in old]


class PolicyLogProbs(torch.nn.Module):
    """The policy as DeepSpeed sees it: the causal LM's own submodules under their own names (so
    parameter names, checkpoints and weight sync are those of the HF model), with a forward that
    returns the [B, L-1] next-token log-probs at the sampling temperature, computed chunk by chunk
    from the final hidden states: never the [B, L, V] logits. Runs inside the engine's forward, so
    ZeRO-3 gathers the head's parameters for every chunk on every rank alike."""

    def __init__(self, lm: torch.nn.Module, temperature: float):
        super().__init__()
        c = lm.config
        if getattr(c, "final_logit_softcapping", None) or getattr(c, "logit_scale", None) not in (None, 1, 1.0):
            raise ValueError(f"{type(lm).__name__}: logits = lm_head(hidden) is assumed (no soft-capping or scale)")
        for name, child in lm.named_children():
            self.add_module(name, child)
        head = lm.get_output_embeddings()
        self.base_name = lm.base_model_prefix
        self.head_name = next(n for n, m in lm.named_children() if m is head)
        self.temperature = temperature
        if list(self.state_dict()) != list(lm.state_dict()):
            raise ValueError(f"{type(lm).__name__} has parameters outside its submodules")

    def forward(self, input_ids=None, attention_mask=None, num_chunks: int = 1, shared: dict | None = None):
        """[B, L-1] log-probs of input_ids[:, 1:]; or, with `shared` (learner.share_prompts), the
        list of [B_k, R_k] response log-probs of `shared_forward`."""
        if shared is not None:
            return self.shared_forward(**shared)
        base = getattr(self, self.base_name)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return hidden_token_logprobs(hidden, getattr(self, self.head_name), input_ids, self.temperature, num_chunks)

    def shared_forward(self, prompt_ids, prompt_mask, prompt_len, buckets: list, chunk_tokens: int = 0) -> list:
        """Each distinct prompt computed once ([U, P] right-padded, algo.batching.collate_prompts),
        its keys/values then reused by every response of it: `buckets` are
        algo.batching.collate_responses dicts ([B, R] response_ids / response_mask and [B]
        prompt_index are read); each bucket's lm_head runs in chunks of `chunk_tokens` positions
        (0: one chunk).
        Returns per bucket the [B, R] log-probs of the response tokens (position k scores token
        k). The same numbers as the plain forward of prompt + response (float order aside: the
        learner checks this at set-up); gradients reach the prompt's computation through its
        keys/values from every response that reads them."""
        from transformers import DynamicCache

        base, head = getattr(self, self.base_name), getattr(self, self.head_name)
        U, P = prompt_ids.shape
        pos = torch.arange(P, device=prompt_ids.device).expand(U, P)
        out = base(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        last = out.last_hidden_state[torch.arange(U, device=prompt_ids.device), prompt_len - 1]  # [U, H]: scores token 0
        logps = []
        for b in buckets:
            ids, idx = b["response_ids"], b["prompt_index"]
            R = ids.shape[1]
            hidden = last.index_select(0, idx)[:, None]  # [B, 1, H]: scores response token 0
            if R > 1:  # the response's last position scores nothing (no token follows it): not fed
                cache = DynamicCache()
                for i, (k, v) in enumerate(kv):
                    cache.update(k.index_select(0, idx), v.index_select(0, idx), i)
                rpos = prompt_len.index_select(0, idx)[:, None] + torch.arange(R - 1, device=ids.device)[None]
                mask = torch.cat([prompt_mask.index_select(0, idx), b["response_mask"][:, :R - 1]], 1)
                h = base(input_ids=ids[:, :R - 1], attention_mask=mask, position_ids=rpos, past_key_values=cache,
                         use_cache=True).last_hidden_state
                hidden = torch.cat([hidden, h], 1)  # [B, R, H]: position k scores token k
            chunks = max(1, math.ceil(ids.numel() / chunk_tokens)) if chunk_tokens else 1
            logps.append(aligned_token_logprobs(hidden, head, ids, self.temperature, chunks))
        return logps

    @staticmethod
    def shared_tokens(prompt_ids: torch.Tensor, buckets: list) -> int:
        """Tokens `shared_forward` puts through the model: every prompt position once, and each
        bucket's [B, R] responses without their last position (B x (R-1))."""
        return prompt_ids.numel() + sum(b["response_ids"][:, :-1].numel() for b in buckets)


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


def _luffy_mask(b: dict) -> torch.Tensor:
    """The LUFFY channel's tokens: the expert-answer tokens of samples the overlong filter kept
    (it zeroes a filtered sample's policy mask); its normaliser counts exactly these."""
    return b["expert_mask"] * (b["policy_mask"].sum(dim=1, keepdim=True) > 0).to(b["expert_mask"].dtype)


class StepStats:
    """Loss statistics of one train step, summed over micro-batches (weighted by their token
    counts), then over ranks: the same numbers on every rank."""
    SUMS = ("loss", "expert_sft_loss", "clip_frac", "kl_behav", "kept_tokens", "is_weight_mean", "dropped_frac",
            "policy_tokens", "luffy_loss", "luffy_shaped", "luffy_tokens")

    def __init__(self, sft: bool, luffy: bool = False):
        self.sums, self.weight_max, self.sft, self.luffy = dict.fromkeys(self.SUMS, 0.0), float("-inf"), sft, luffy

    def add(self, st: dict, loss: float, sft: float | None):
        kept, policy = st["kept_tokens"], st["policy_tokens"]
        for k, v in {"loss": loss, "expert_sft_loss": sft or 0.0, "clip_frac": st["clip_frac"] * kept,
                     "kl_behav": st["kl_behav"] * kept, "kept_tokens": kept,
                     "is_weight_mean": st["is_weight_mean"] * policy, "dropped_frac": st["dropped_frac"] * policy,
                     "policy_tokens": policy, "luffy_loss": st.get("luffy_loss", 0.0),
                     "luffy_shaped": st.get("luffy_shaped_mean", 0.0) * st.get("luffy_tokens", 0.0),
                     "luffy_tokens": st.get("luffy_tokens", 0.0)}.items():
            self.sums[k] += v
        if policy:
            self.weight_max = max(self.weight_max, st["is_weight_max"])

    def reduce(self, all_reduce, world_size: int, n_updates: int) -> dict:
        """Collective (all_reduce as Learner._all_reduce). Losses: per update (each rank's loss is
        world_size x its share); fractions: per token; kept_tokens: per update, all ranks."""
        t = dict(zip(self.SUMS, all_reduce(list(self.sums.values()))))
        (weight_max,) = all_reduce([self.weight_max], ReduceOp.MAX)
        kept, policy = max(t["kept_tokens"], 1.0), t["policy_tokens"]
        out = {"loss": t["loss"] / world_size / n_updates, "clip_frac": t["clip_frac"] / kept,
               "is_weight_mean": t["is_weight_mean"] / policy if policy else 1.0,
               "is_weight_max": weight_max if policy else 1.0, "dropped_frac": t["dropped_frac"] / max(policy, 1.0),
               "kl_behav": t["kl_behav"] / kept, "kept_tokens": t["kept_tokens"] / n_updates}
        if self.sft:
            out["expert_sft_loss"] = t["expert_sft_loss"] / world_size / n_updates
        if self.luffy:  # the off-policy expert-token term: its loss, mean f(r), expert tokens per update
            out["luffy_loss"] = t["luffy_loss"] / world_size / n_updates
            out["luffy_shaped_mean"] = t["luffy_shaped"] / max(t["luffy_tokens"], 1.0)
            out["luffy_tokens"] = t["luffy_tokens"] / n_updates
        return out


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
            pol = sft = luffy = 0.0
            for b, o in zip(mb, old):
                if b is None:
                    continue
                pol += float(normaliser(kept_mask(o, b["behav_logp"], b["policy_mask"], c.loss), c.loss.agg,
                                        c.rollout.max_response_tokens))
                sft += float(b["expert_mask"].sum())
                luffy += float(_luffy_mask(b).sum())
                log_w, finite = log_importance(o, b["behav_logp"])
                on = (b["policy_mask"] > 0) & finite
                gap = _add_gap(gap, log_w, on)
                on_gap = _add_gap(on_gap, log_w, on & (b["version"] == self.version)[:, None])
            shares += [pol, sft, luffy]
        *shares, gsum, gcount, osum, ocount = self._all_reduce(shares + gap[:2] + on_gap[:2])
        gmax, omax = self._all_reduce([gap[2], on_gap[2]], ReduceOp.MAX)
        norms = [{"policy": max(p, 1.0) / self.world_size, "sft": max(e, 1.0) / self.world_size,
                  "luffy": max(f, 1.0) / self.world_size}
                 for p, e, f in zip(shares[0::3], shares[1::3], shares[2::3])]
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
            lf, lst = luffy_loss(logp, b["expert_logp"], b["advantage"], _luffy_mask(b), c.algo.luffy_gamma,
                                 denom=norm["luffy"])
            loss = loss + c.algo.luffy_coef * lf
            st = {**st, "luffy_loss": float(lf.detach()), **lst}
        acc.add(st, loss.item(), None if sft is None else sft.item())
        return loss

    def train_step(self, boxes: list) -> dict:
        """One policy update: `boxes` = [[ref], ...] of batches from the buffer; this rank
        trains on its 1/world_size slice of their samples. Collective: all ranks."""
        t0 = time.time()
        c, lc = self.cfg, self.cfg.learner
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
        acc, n_updates = StepStats(sft=c.algo.expert_sft_coef > 0, luffy=c.algo.expert_token_channel == "luffy"), 0
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
        stats["learner_samples"] = len(shard["input_ids"])
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
        acc = StepStats(sft=self.cfg.algo.expert_sft_coef > 0, luffy=self.cfg.algo.expert_token_channel == "luffy")
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
        stats.update(learner_samples=len(shard["input_ids"]), lost_batches=lost, train_seconds=time.time() - t0,
                     fetch_s=t_fetch - t0, prep_s=t_prep - t_fetch, **tm)
        stats["staleness"] = self.version - 1 - min((min(b["version"]) for b in batches), default=self.version - 1)
        return stats

    def _train_shared(self, shard: dict, batches, lost, t0, t_fetch, tm) -> dict:
        """One update on one minibatch with each distinct prompt computed once (learner.share_prompts;
        algo.batching.split_shared, PolicyLogProbs.shared_forward): one forward of the prompts and
        the response micro-batches (by response length), their detached log-probs as pi_old, the
        loss over all of them with the minibatch's global denominators, one backward, one step.
        The same loss and gradient as `_train_buckets` (float order aside; tested)."""
        acc = StepStats(sft=self.cfg.algo.expert_sft_coef > 0, luffy=self.cfg.algo.expert_token_channel == "luffy")
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
        stats.update(learner_samples=len(shard["input_ids"]), lost_batches=lost, train_seconds=time.time() - t0,
                     fetch_s=t_fetch - t0, prep_s=t_prep - t_fetch, **tm)
        # tokens through the model on this rank (rank 0's in the metrics)
        stats["forward_tokens"] = PolicyLogProbs.shared_tokens(shared["prompt_ids"], mb) if parts else 0
        stats["share_prompts"] = 1
        stats["staleness"] = self.version - 1 - min((min(b["version"]) for b in batches), default=self.version - 1)
        return stats

    def full_state_dict(self) -> dict:
        """The unsharded weights on every rank (a collective under ZeRO-3)."""
        import deepspeed

        module = self.model
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.cfg.learner.zero_stage == 3):
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
            self.model, rank=self.rank, zero3=self.cfg.learner.zero_stage == 3, actors=rollout_actors,
            tp=r.vllm.tensor_parallel_size, bucket_mb=r.sync_bucket_mb, master_address=addr, master_port=port)

    def sync_weights(self) -> float:
        """Collective. Broadcast the current weights to every rollout engine; seconds taken."""
        t0 = time.time()
        self.weight_sync.send(self.version)
        return time.time() - t0

    def save(self, run_dir: str, hf: bool = True) -> str:
        """Collective. A DeepSpeed checkpoint (for resume) and, on rank 0, an HF directory; then
        rank 0 deletes all but the newest learner.checkpoint_keep checkpoint tags."""
        ckpt = Path(run_dir) / "checkpoint"
        self.engine.save_checkpoint(str(ckpt), tag=f"step{self.version}", client_state={"version": self.version})
        sd = self.full_state_dict()
        if hf and self.rank == 0:
            out = Path(run_dir) / "final"
            self.model.save_pretrained(out, state_dict=sd)
            self.tokenizer.save_pretrained(out)
        if self.world_size > 1:
            torch.distributed.barrier()  # every rank has written its part of this tag
        if self.rank == 0:
            prune_checkpoints(ckpt, self.cfg.learner.checkpoint_keep)
        return str(ckpt)

    def ping(self) -> str:
        return "pong"


STATIC_ROPE = (None, "default", "linear", "llama3", "yarn")  # frequencies that do not depend on the sequence length


def unshareable(config) -> str | None:
    """Why learner.share_prompts cannot be used for this model config (None: it can): a sliding
    attention window would count the prompt's right padding inside the window, and the model's own
    cache keeps only the window of a long prompt; rope that rescales with the sequence length sees
    the prompt alone in the prompt pass. The set-up check's sequences are too short to notice."""
    layers = getattr(config, "layer_types", None)
    if layers and any(t != "full_attention" for t in layers):
        return f"it has {sorted(set(layers) - {'full_attention'})} layers"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"sliding_window={config.sliding_window}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return f"rope settings {rope!r} not understood"
    nested = [v for v in rope.values() if isinstance(v, dict)]  # one dict per layer type (transformers 5)
    kinds = {r.get("rope_type", r.get("type")) for r in nested + ([rope] if len(nested) < len(rope) else [])}
    if not kinds <= set(STATIC_ROPE):
        return f"rope type {sorted(map(str, kinds))}"
    return None


def sharing_agrees(module: PolicyLogProbs, vocab_size: int, device="cpu", atol: float = 1e-4) -> bool:
    """Whether `module.shared_forward` gives the plain forward's response log-probs on a small
    random batch (two prompts of different lengths, responses of different lengths, several
    micro-batches). False for a model whose forward does not take a prompt's keys/values this way
    (it then trains with the plain forward), or that raises trying."""
    g = torch.Generator().manual_seed(0)
    tok = lambda n: torch.randint(1, vocab_size, (n,), generator=g).tolist()  # noqa: E731
    prompts, lens = [tok(7), tok(4)], [(0, 5), (0, 2), (1, 6), (1, 1), (0, 3)]
    batch = {"input_ids": [prompts[i] + tok(n) for i, n in lens], "prompt_len": [len(prompts[i]) for i, _ in lens]}
    resp = [seq[p:] for seq, p in zip(batch["input_ids"], batch["prompt_len"])]
    batch.update(policy_mask=[[1] * len(r) for r in resp], expert_mask=[[0] * len(r) for r in resp],
                 behav_logp=[[0.0] * len(r) for r in resp], advantage=[0.0] * len(resp), row=list(range(len(resp))))
    try:
        with torch.no_grad():
            b = collate(batch)
            plain = module(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).float().cpu()
            _, parts = split_shared(batch, min_rows=2)
            cols = [collate_responses(x) for x in parts]
            got = module(shared={**{k: v.to(device) for k, v in collate_prompts(prompts).items()},
                                 "buckets": [{k: v.to(device) for k, v in c.items()} for c in cols]})
            got = [x.float().cpu() for x in got]
        for x, lp in zip(parts, got, strict=True):
            for i, (row, r) in enumerate(zip(x["row"], x["response_ids"])):
                p = batch["prompt_len"][row]
                if not torch.allclose(lp[i, :len(r)], plain[row, p - 1: p - 1 + len(r)], atol=atol):
                    return False
    except Exception:  # noqa: BLE001 -- a model this path does not fit trains the plain way
        return False
    return True


def _add_gap(acc: list, log_w: torch.Tensor, where: torch.Tensor) -> list:
    """acc = [sum, count, max] of |log_w| over the positions in `where`."""
    if not where.any():
        return acc
    g = log_w[where].abs()
    return [acc[0] + float(g.sum()), acc[1] + float(where.sum()), max(acc[2], float(g.max()))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def get_all(refs: list) -> list:
    """ray.get of every rank's result, raising as soon as ANY rank fails: a plain ray.get of the
    list would first wait on a surviving rank, which blocks in a collective with the dead one
    (gloo's timeout is 30 min)."""
    from eapo_ray.ray_runtime import raise_if_interrupted

    pending = list(refs)
    while pending:
        raise_if_interrupted()  # a recorded Ctrl-C is not held up by a long learner call
        ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
        ray.get(ready)  # a dead rank's error is raised here, at once
    return ray.get(refs)


class PlacementError(RuntimeError):
    """The learners' resources could not be placed in time (learner.placement_timeout_s)."""


def placement_error(bundle: dict, n: int, timeout_s: float) -> str:
    """What the learners asked for against what the cluster has (in total and free now)."""
    def show(res: dict) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU") or k in bundle) or "none"

    total = {k: v * n for k, v in bundle.items()}
    return (f"the {n} learner(s) could not be placed within learner.placement_timeout_s={timeout_s:g}s: they ask "
            f"for {n} x {{{show(bundle)}}} = {show(total)}; the cluster has {show(ray.cluster_resources())} "
            f"({show(ray.available_resources())} free now). Lower learner.num_learners / learner.num_cpus / "
            "learner.num_gpus, add nodes, or raise learner.placement_timeout_s if nodes are still coming up.")


class LearnerGroup:
    """Creates the N learner actors and fans calls out to all of them."""

    def __init__(self, cfg: RunConfig, run_name: str, generation: int = 0):
        """`generation`: how many times the launcher rebuilt the group (weight_sync.PublishedWeights)."""
        self.generation = generation
        lc = cfg.learner
        n = lc.num_learners
        cls = ray.remote(Learner)
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": lc.num_cpus, **({"GPU": lc.num_gpus} if lc.num_gpus else {})}
        self.pg = placement_group([bundle] * n, strategy="PACK", name=f"{run_name}-learners")
        if not self.pg.wait(timeout_seconds=lc.placement_timeout_s):
            ray.util.remove_placement_group(self.pg)
            raise PlacementError(placement_error(bundle, n, lc.placement_timeout_s))
        self.actors = [
            cls.options(name=f"{run_name}-learner-{r}", num_cpus=lc.num_cpus, num_gpus=lc.num_gpus,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
                        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(lc.torch_threads)}})
            .remote(cfg, r, n)
            for r in range(n)
        ]

    def call_all(self, method: str, *args) -> list:
        """The one fan-out: `method(*args)` on every rank, waiting for all (the learner methods
        are collectives: every rank must enter), raising as soon as any rank fails (get_all).
        Results in rank order."""
        return get_all([getattr(a, method).remote(*args) for a in self.actors])

    def setup(self, resume_dir: str = "") -> int:
        addr, port = ray.get(self.actors[0].endpoint.remote())  # rank 0's node: learners may span nodes
        return self.call_all("setup", addr, port, resume_dir)[0]

    def init_weight_sync(self, rollout_actors: list) -> None:
        self.call_all("init_weight_sync", rollout_actors)

    def sync_weights(self) -> float:
        return self.call_all("sync_weights")[0]

    def train_step(self, items: list) -> dict:
        """items: buffer.BufferItem records; every rank gets every batch ref and trains its shard."""
        results = self.call_all("train_step", [it.box for it in items])
        out = dict(results[0])
        out["learner_samples"] = sum(r["learner_samples"] for r in results)
        return out

    def publish(self):
        """A weight_sync.PublishedWeights of the current version (rank 0's), stamped with the
        group's generation: after a rebuild, versions are reused for other weights."""
        return self.call_all("publish")[0]._replace(generation=self.generation)

    def save(self, run_dir: str) -> str:
        return self.call_all("save", run_dir)[0]

    def shutdown(self):
        for a in self.actors:
            ray.kill(a)
        ray.util.remove_placement_group(self.pg)
