"""The expert: a Ray Serve deployment, autoscaled on ongoing requests, answering the
policy's sub-questions. Requests are batched per replica (`serve.batch`) and run on the
same Engine interface as the rollout policy."""
from __future__ import annotations

import asyncio

import torch
from ray import serve

from eapo_ray.config import ExpertConfig
from eapo_ray.data import render_prompt
from eapo_ray.rollout.engine import make_engine


class Expert:
    def __init__(self, model_path: str, cfg: ExpertConfig):
        torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.engine = make_engine(cfg.engine, model_path)
        self.tok = self.engine.tokenizer
        self.__call__.set_max_batch_size(cfg.max_batch_size)

    def answer_now(self, queries: list[str]) -> list[str]:
        prompts = [self.tok(render_prompt(self.cfg.template, q))["input_ids"] for q in queries]
        gens = self.engine.generate(prompts, [self.cfg.max_new_tokens] * len(prompts), self.cfg.temperature, [])
        answers = [self.tok.decode(g.tokens, skip_special_tokens=True).strip() for g in gens]
        return [self.cfg.reply_template.replace("{query}", q).replace("{answer}", a) for q, a in zip(queries, answers)]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def __call__(self, queries: list[str]) -> list[str]:
        return await asyncio.to_thread(self.answer_now, queries)


def expert_app(model_path: str, cfg: ExpertConfig, name: str = "expert"):
    """The bound Serve application; autoscaling_config comes from the run config."""
    opts = {"num_cpus": cfg.num_cpus, **({"num_gpus": cfg.num_gpus} if cfg.num_gpus else {})}
    dep = serve.deployment(
        Expert, name=name, ray_actor_options=opts, max_ongoing_requests=cfg.max_batch_size * 2,
        autoscaling_config={
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": 2.0, "downscale_delay_s": 30.0,
        },
    )
    return dep.bind(model_path, cfg)
