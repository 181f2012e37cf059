"""The rollout actor: a thin Ray shell around `run_episodes`. It keeps its own policy
copy (any Engine), loads the newest published weights between batches, asks the Serve
expert through a DeploymentHandle, and puts finished batches into the buffer."""
from __future__ import annotations

import asyncio
import random
import time
from types import SimpleNamespace

import ray
import torch
from ray.rllib.utils.actor_manager import FaultAwareApply

from eapo_ray.algo.sampling import assign_advantages, to_batch
from eapo_ray.algo.schedules import acceptance_prob, turn_budget
from eapo_ray.config import RunConfig
from eapo_ray.data import load_split, render_prompt
from eapo_ray.rollout.engine import make_engine
from eapo_ray.rollout.episode import run_episodes


class ServeExpert:
    """Calls the expert deployment for a list of queries, all in flight at once (awaitable,
    so other episodes keep generating); a query that fails or misses the deadline gets
    None (rendered as "unavailable")."""

    def __init__(self, app_name: str, timeout_s: float):
        from ray import serve

        self.handle = serve.get_app_handle(app_name)
        self.timeout_s = timeout_s
        self.failures = 0

    async def __call__(self, queries: list[str]) -> list[str | None]:
        async def one(response):
            try:
                return await asyncio.wait_for(response, self.timeout_s)
            except Exception:  # timeout, dead replica, app gone: the expert is unavailable
                response.cancel()
                self.failures += 1
                return None
        return list(await asyncio.gather(*[one(self.handle.remote(q)) for q in queries]))


class RolloutWorker(FaultAwareApply):
    def __init__(self, cfg: RunConfig, index: int, expert_app: str | None, buffer):
        # FaultAwareApply (RLlib's actor-manager protocol) reads these on a failed call.
        self.config = SimpleNamespace(restart_failed_env_runners=True, delay_between_env_runner_restarts_s=1.0)
        torch.set_num_threads(cfg.rollout.torch_threads)
        torch.manual_seed(cfg.seed * 1000 + index)
        self.cfg, self.index, self.buffer = cfg, index, buffer
        self.rng = random.Random(cfg.seed * 1000 + index)
        self.engine = make_engine(cfg.rollout.engine, cfg.model.policy, cfg.rollout.vllm, seed=cfg.seed * 1000 + index,
                                  **({"weight_transfer": True} if cfg.rollout.weight_sync == "nccl" else {}))
        self.tok = self.engine.tokenizer
        d = cfg.data
        self.data = load_split(d.train, "train", d.train_levels, d.num_train, cfg.seed, d.problem_key, d.answer_key)
        self.prompts = [self.tok(render_prompt(d.template, ex.problem))["input_ids"] for ex in self.data]
        self.expert = ServeExpert(expert_app, cfg.expert.timeout_s) if expert_app else None

    def maybe_load(self, weights) -> None:
        """weights: (version, [ObjectRef to a state dict]) or None."""
        if weights is not None and weights[0] > self.engine.version:
            self.engine.load_weights(ray.get(weights[1][0]), weights[0])

    # The inference side of vLLM's NCCL weight transfer (rollout.weight_sync: nccl), driven
    # by learner rank 0 (eapo_ray/nccl_sync.py); calls queue behind a running `produce`.
    def init_weight_transfer_engine(self, request):
        self.engine.init_weight_transfer_engine(request)

    def start_weight_update(self):
        self.engine.start_weight_update()

    def update_weights(self, request):
        self.engine.update_weights(request)

    def finish_weight_update(self, version: int | None = None):
        self.engine.finish_weight_update(version)

    def produce(self, step: int, weights=None, max_draws: int = 4) -> dict:
        """Generate one training batch at learner step `step` and put it into the buffer."""
        self.maybe_load(weights)
        c, r = self.cfg, self.cfg.rollout
        rho = acceptance_prob(step, c.acceptance) if self.expert else 0.0
        turns = turn_budget(step, r.train_turns, r.eval_turns, c.acceptance.total_steps)
        t0, kept, all_trajs, dropped = time.time(), [], [], 0
        for draw in range(max_draws):
            idx = [self.rng.randrange(len(self.data)) for _ in range(r.prompts_per_batch - len(kept) // r.group_size)]
            prompts = [self.prompts[i] for i in idx for _ in range(r.group_size)]
            golds = [self.data[i].answer for i in idx for _ in range(r.group_size)]
            groups = [draw * 10_000 + k for k in range(len(idx)) for _ in range(r.group_size)]
            trajs = run_episodes(
                self.engine, self.tok, prompts, golds, proto=c.protocol, reward_cfg=c.reward, expert=self.expert,
                accept_prob=rho, max_turns=turns, max_new_tokens_per_turn=r.max_new_tokens_per_turn,
                max_response_tokens=r.max_response_tokens, temperature=r.temperature, rng=self.rng, groups=groups)
            all_trajs += trajs
            k, d = assign_advantages(trajs, adv_scale=c.algo.adv_scale, consult_cost=c.algo.consult_cost,
                                     dynamic_sampling=c.algo.dynamic_sampling)
            kept += k
            dropped += d
            if len(kept) >= r.prompts_per_batch * r.group_size:
                break
        n = len(all_trajs)
        stats = {
            "worker": self.index, "version": self.engine.version, "acceptance_prob": rho, "turn_budget": turns,
            "samples": n, "kept_samples": len(kept), "dropped_groups": dropped,
            "reward": sum(t.reward for t in all_trajs) / n, "accuracy": sum(t.correct for t in all_trajs) / n,
            "consult_rate": sum(t.consults > 0 for t in all_trajs) / n,
            "consults_per_sample": sum(t.consults for t in all_trajs) / n,
            "accepted_per_sample": sum(t.accepted for t in all_trajs) / n,
            "expert_failures": sum(t.expert_failures for t in all_trajs),
            "overlong_frac": sum(t.overlong for t in all_trajs) / n,
            "response_len": sum(len(t.response_ids) for t in all_trajs) / n,
            "gen_seconds": time.time() - t0,
        }
        if kept:
            ref = ray.put(to_batch(kept, c.algo.overlong_filter))  # owned by this actor (see learner.fetch_batches)
            ray.get(self.buffer.put.remote([ref], self.engine.version, len(kept)))  # waits while the buffer is full
        return stats
