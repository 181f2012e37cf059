"""The rollout actor: a thin Ray shell around `run_episodes`. It keeps its own policy
copy (any Engine), loads the newest published weights when a batch starts (object-store
path) or receives them mid-batch (NCCL path), asks the Serve expert through a
DeploymentHandle, and RETURNS each finished batch: the caller owns it, so an actor that
dies afterwards loses nothing it finished.

Concurrency groups: `produce` runs in the default one (one batch at a time); the
weight-update methods run in their own ("weights"), so a weight update is never queued
behind a batch that is being generated; the driver's pause/resume and `weight_state` run in
"control", which neither a batch nor an update stuck in NCCL can block. Around an update, generation is paused: new
requests wait, requests in flight drain, the weights change, generation resumes. A
trajectory therefore may mix policy versions across turns; every token keeps the
behaviour log-prob it was sampled with, which is what the learner's correction uses.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time

import ray
import torch

from eapo_ray.algo import reward
from eapo_ray.algo.batching import assign_advantages, to_batch
from eapo_ray.config import RunConfig
from eapo_ray.data import encode_prompt, overlong_warning, train_examples, zero_reward_causes
from eapo_ray.rollout.engine import Engine
from eapo_ray.rollout.episode import EpisodeSettings, run_episodes
from eapo_ray.rollout.factory import hf_options, make_engine
from eapo_ray.timing import Overlap
from eapo_ray.weight_sync import load_published

WEIGHTS_GROUP = "weights"
# The driver's pause/resume around an NCCL sync (weight_sync.sync_engines): a group of their own, so a
# resume is never queued behind a weight update stuck in NCCL, nor behind a drain that is still waiting.
CONTROL_GROUP = "control"
CONCURRENCY_GROUPS = {WEIGHTS_GROUP: 1, CONTROL_GROUP: 2}  # for .options(concurrency_groups=...) / ray.remote


class ServeExpert:
    """Calls the expert deployment for a list of queries, all in flight at once (awaitable,
    so other episodes keep generating); a query that fails or misses the deadline gets
    None (rendered as "unavailable")."""

    def __init__(self, app_name: str, timeout_s: float, run: str = "", actor: int = 0):
        import logging
        import os

        from ray import serve

        if os.environ.get("EAPO_QUIET"):  # the launcher's console stays readable (no --verbose)
            logging.getLogger("ray.serve").setLevel(logging.WARNING)
        self.handle = serve.get_app_handle(app_name)
        self.timeout_s = timeout_s
        self.failures = 0
        self.run, self.actor, self.inflight = run, actor, 0  # metric tags; queries in flight

    async def __call__(self, queries: list[str]) -> list:  # ExpertReply (or a plain str) per query, None if unavailable
        from eapo_ray import metrics

        async def one(response):
            t0 = time.time()
            self.inflight += 1
            metrics.expert_inflight(self.run, self.actor, self.inflight)
            try:
                return await asyncio.wait_for(response, self.timeout_s)
            except Exception:  # timeout, dead replica, app gone: the expert is unavailable
                response.cancel()
                self.failures += 1
                return None
            finally:
                self.inflight -= 1
                metrics.expert_inflight(self.run, self.actor, self.inflight)
                metrics.expert_query(self.run, self.actor, time.time() - t0, self.failures)
        return list(await asyncio.gather(*[one(self.handle.remote(q)) for q in queries]))


class PausableEngine:
    """The engine as episodes see it: `agenerate` waits while generation is paused, and
    `pause()` (from another thread) returns once no request is in flight. Thread-safe."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cv = threading.Condition()
        self._paused = False
        self._inflight = 0

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _try_enter(self) -> bool:
        with self._cv:
            if self._paused:
                return False
            self._inflight += 1
            return True

    def _wait_unpaused(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: not self._paused)

    async def agenerate(self, *args, **kwargs):
        # Counted only on the event loop, so a caller cancelled while it waits leaves no count behind.
        while not self._try_enter():
            await asyncio.to_thread(self._wait_unpaused)  # paused: wait in a thread, not on the loop
        try:
            return await self.engine.agenerate(*args, **kwargs)
        finally:
            with self._cv:
                self._inflight -= 1
                self._cv.notify_all()

    def pause(self, timeout_s: float | None = None) -> None:
        """Stop new requests and wait for the ones in flight to finish."""
        with self._cv:
            self._paused = True
            if not self._cv.wait_for(lambda: self._inflight == 0, timeout_s):
                self._paused = False
                self._cv.notify_all()
                raise TimeoutError(f"generation did not drain within {timeout_s}s for a weight update")

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused


def batch_rng(seed: int, serial: int) -> random.Random:
    """The RNG of rollout batch number `serial` (prompts, acceptance coins): a function of
    the run seed and the batch's serial number, so a resumed run continues the sequence
    instead of replaying it, whichever actor the batch lands on."""
    return random.Random(f"eapo:{seed}:{serial}")


class RolloutWorker:
    def __init__(self, cfg: RunConfig, index: int, expert_app: str | None):
        torch.set_num_threads(cfg.rollout.torch_threads)
        self.cfg, self.index = cfg, index
        self.engine = make_engine(cfg.rollout.engine, cfg.model.policy, cfg.rollout.vllm, seed=cfg.seed * 1000 + index,
                                  **({"weight_transfer": True} if cfg.rollout.weight_sync == "nccl" else {}),
                                  **(hf_options(cfg.rollout) if cfg.rollout.engine == "hf" else {}))
        self.gen = PausableEngine(self.engine)
        self.tok = self.engine.tokenizer
        reward.warm_up(cfg.reward)  # math-verify's grading process starts now, not in the first batch
        d = cfg.data
        self.data = train_examples(cfg)
        self.prompts = [encode_prompt(self.tok, d, ex.problem) for ex in self.data]
        self.has_chat_template = bool(getattr(self.tok, "chat_template", None))  # for zero_reward_causes
        self.expert = ServeExpert(expert_app, cfg.expert.timeout_s, cfg.run_name, index) if expert_app else None

    def ping(self) -> str:
        return "pong"

    def maybe_load(self, weights) -> None:
        """weights: a weight_sync.PublishedWeights or None; loaded when newer than the engine's."""
        load_published(self.engine, weights)

    # The inference side of vLLM's NCCL weight transfer (rollout.weight_sync: nccl), driven by
    # learner rank 0 (eapo_ray/weight_sync.py). Their own concurrency group: they run while
    # `produce` is generating, with generation paused from start to finish.
    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def init_weight_transfer_engine(self, request):
        self.engine.init_weight_transfer_engine(request)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def pause_generation(self, timeout_s: float) -> None:
        """The driver's drain before an NCCL sync: stop new requests, wait (at most `timeout_s`)
        for the ones in flight; TimeoutError (generation resumed) if they do not finish."""
        self.gen.pause(timeout_s=timeout_s)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def resume_generation(self) -> None:
        """The driver's resume after an NCCL sync, also a failed one (idempotent)."""
        self.gen.resume()

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def start_weight_update(self):
        # already drained by the driver (pause_generation): returns at once; the wait is for direct callers
        self.gen.pause(timeout_s=self.cfg.rollout.pause_timeout_s)
        try:
            self.engine.start_weight_update()
        except BaseException:
            self.gen.resume()
            raise

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def update_weights(self, request):
        self.engine.update_weights(request)

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def finish_weight_update(self, version: int | None = None):
        try:
            self.engine.finish_weight_update(version)
        finally:
            self.gen.resume()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def weight_state(self) -> dict:
        """The engine's policy version and whether generation is paused (for tests and the console);
        in the `control` group, so it answers while a weight update is stuck in NCCL."""
        return {"version": self.engine.version, "paused": self.gen.paused}

    @ray.method(num_returns=2)
    def produce(self, step: int, weights=None, serial: int = 0, max_draws: int = 4):
        """Generate one training batch at learner step `step`. Returns (stats, batch): the
        batch (algo.batching.to_batch columns, or None when every group was dropped) becomes
        an object owned by the caller, who enqueues it; stats is a small dict."""
        t_start = time.time()
        self.maybe_load(weights)
        load_s = time.time() - t_start
        c, r = self.cfg, self.cfg.rollout
        rng = batch_rng(c.seed, serial)
        torch.manual_seed(rng.randrange(2**31))  # the transformers engine samples with torch's RNG
        settings = EpisodeSettings.for_training(c, step, with_expert=self.expert is not None)
        t0, kept, all_trajs, dropped = time.time(), [], [], 0
        timer, pack_s = Overlap(), 0.0
        for draw in range(max_draws):
            idx = [rng.randrange(len(self.data)) for _ in range(r.prompts_per_batch - len(kept) // r.group_size)]
            prompts = [self.prompts[i] for i in idx for _ in range(r.group_size)]
            golds = [self.data[i].answer for i in idx for _ in range(r.group_size)]
            rows = [self.data[i].row() for i in idx for _ in range(r.group_size)] if c.reward.fn else None
            groups = [draw * 10_000 + k for k in range(len(idx)) for _ in range(r.group_size)]
            trajs = run_episodes(self.gen, self.tok, prompts, golds, settings, expert=self.expert, rng=rng,
                                 groups=groups, timer=timer, rows=rows)
            t_pack = time.time()
            all_trajs += trajs
            k, d = assign_advantages(trajs, adv_scale=c.algo.adv_scale, consult_cost=c.algo.consult_cost,
                                     dynamic_sampling=c.algo.dynamic_sampling)
            kept += k
            dropped += d
            pack_s += time.time() - t_pack
            if len(kept) >= r.prompts_per_batch * r.group_size:
                break
        n = len(all_trajs)
        stats = {
            "worker": self.index, "serial": serial, "version": min((t.version for t in kept or all_trajs), default=0),
            "engine_version": self.engine.version,
            "acceptance_prob": settings.accept_prob, "turn_budget": settings.max_turns,
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
        if warning := overlong_warning(c, stats["overlong_frac"]):  # printed once by the driver (data.warn_overlong)
            stats["overlong_warning"] = warning
        if not any(t.reward for t in all_trajs):  # printed once by the driver (data.warn_zero_reward)
            stats["zero_reward_causes"] = zero_reward_causes(
                c, tokenizer_has_chat_template=self.has_chat_template, overlong_frac=stats["overlong_frac"],
                formatted_frac=sum(t.formatted for t in all_trajs) / n)
        t_pack = time.time()
        # replay views (algo.expert_token_channel replay / own_steps) of the training samples with accepted replies
        # (at most one per sample; a dropped group's samples are not trained on, nor are their views)
        batch = to_batch(kept, c.algo.overlong_filter, views=kept) if kept else None
        stats["replay_views"] = sum(batch["view"]) if batch else 0
        # the breakdown (seconds of wall time): engine = some generation in flight; expert_wait = an
        # expert query in flight and no generation (the batch blocked on the expert); reward = grading
        stats.update(load_weights_s=load_s, engine_s=timer.busy_s("engine"), expert_busy_s=timer.busy_s("expert"),
                     expert_wait_s=timer.only_s("expert"), reward_s=timer.busy_s("reward"),
                     pack_s=pack_s + time.time() - t_pack, produce_s=time.time() - t_start)
        return stats, batch

    def shutdown(self) -> None:
        self.engine.shutdown()


def remote_worker_cls():
    """`RolloutWorker` as a Ray actor class with its concurrency groups declared."""
    return ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RolloutWorker)
