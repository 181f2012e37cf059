"""The expert: a Ray Serve deployment, autoscaled on ongoing requests, answering the
policy's sub-questions. Requests are batched per replica (`serve.batch`) and run on the
same Engine interface as the rollout policy."""
from __future__ import annotations

import asyncio

import torch
from ray import serve

from eapo_ray.config import ExpertConfig
from eapo_ray.data import render_prompt
from eapo_ray.rollout.factory import make_engine


class Expert:
    def __init__(self, model_path: str, cfg: ExpertConfig):
        torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.engine = make_engine(cfg.engine, model_path, cfg.vllm)
        self.tok = self.engine.tokenizer
        self.__call__.set_max_batch_size(cfg.max_batch_size)

    def answer_now(self, queries: list[str]) -> list[str]:
        prompts = [self.tok(render_prompt(self.cfg.template, q))["input_ids"] for q in queries]
        gens = self.engine.generate(prompts, [self.cfg.max_new_tokens] * len(prompts), self.cfg.temperature, [])
        answers = [self.tok.decode(g.tokens, skip_special_tokens=True).strip() for g in gens]
        if self.cfg.reverse_answer:  # the model writes the answer's characters last-first (tiny_mul experts)
            answers = [a[::-1] for a in answers]
        return [self.cfg.reply_template.replace("{query}", q).replace("{answer}", a) for q, a in zip(queries, answers)]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def __call__(self, queries: list[str]) -> list[str]:
        return await asyncio.to_thread(self.answer_now, queries)


def replica_options(cfg: ExpertConfig) -> dict:
    """Ray resources of one replica. A vLLM expert with tensor parallelism gets a placement
    group (one CPU bundle for the replica, one GPU bundle per shard), as Ray Serve LLM does;
    `node_resource` pins replicas to nodes that advertise it (the expert's own node group)."""
    actor = {"num_cpus": cfg.num_cpus}
    if cfg.node_resource:
        actor["resources"] = {cfg.node_resource: 0.001}
    tp = cfg.vllm.tensor_parallel_size if cfg.engine == "vllm" else 1
    if tp > 1:
        node = {cfg.node_resource: 0.001} if cfg.node_resource else {}
        return {"ray_actor_options": actor,
                "placement_group_bundles": [{"CPU": cfg.num_cpus, **node}] + [{"GPU": 1.0, **node}] * tp,
                "placement_group_strategy": "STRICT_PACK"}
    if cfg.num_gpus:
        actor["num_gpus"] = cfg.num_gpus
    return {"ray_actor_options": actor}


def expert_app(model_path: str, cfg: ExpertConfig, name: str = "expert"):
    """The bound Serve application; autoscaling_config comes from the run config."""
    dep = serve.deployment(
        Expert, name=name, max_ongoing_requests=cfg.max_batch_size * 2, **replica_options(cfg),
        autoscaling_config={
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": 2.0, "downscale_delay_s": 30.0,
        },
    )
    return dep.bind(model_path, cfg)
