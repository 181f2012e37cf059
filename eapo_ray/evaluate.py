"""Held-out evaluation with the policy alone: acceptance 0 and the consult tag banned."""
from __future__ import annotations

import random

import ray
import torch

from eapo_ray.config import RunConfig
from eapo_ray.data import Example, load_split, render_prompt
from eapo_ray.rollout.engine import Engine, make_engine
from eapo_ray.rollout.episode import run_episodes


def evaluate_alone(engine: Engine, tok, examples: list[Example], cfg: RunConfig, temperature: float = 0.0) -> dict:
    """Accuracy of the policy solving alone, overall and per level."""
    prompts = [tok(render_prompt(cfg.data.template, ex.problem))["input_ids"] for ex in examples]
    trajs = run_episodes(engine, tok, prompts, [ex.answer for ex in examples], proto=cfg.protocol,
                         reward_cfg=cfg.reward, expert=None, accept_prob=0.0, max_turns=cfg.eval.max_turns,
                         max_new_tokens_per_turn=cfg.rollout.max_response_tokens,
                         max_response_tokens=cfg.rollout.max_response_tokens, temperature=temperature,
                         rng=random.Random(cfg.seed), ban_consult=True)
    out = {"accuracy": sum(t.correct for t in trajs) / len(trajs),
           "formatted": sum(t.formatted for t in trajs) / len(trajs)}
    for level in sorted({ex.level for ex in examples}):
        idx = [i for i, ex in enumerate(examples) if ex.level == level]
        out[f"accuracy_level_{level}"] = sum(trajs[i].correct for i in idx) / len(idx)
    return out


class Evaluator:
    """Ray actor shell: its own policy copy, loaded with the newest published weights."""

    def __init__(self, cfg: RunConfig):
        torch.set_num_threads(cfg.rollout.torch_threads)
        self.cfg = cfg
        self.engine = make_engine(cfg.rollout.engine, cfg.model.policy)
        d = cfg.data
        self.examples = load_split(d.heldout, "heldout", d.heldout_levels, d.num_heldout, cfg.seed + 1,
                                   d.problem_key, d.answer_key)

    def evaluate(self, weights=None) -> dict:
        if weights is not None and weights[0] != self.engine.version:
            self.engine.load_weights(ray.get(weights[1][0]), weights[0])
        return evaluate_alone(self.engine, self.engine.tokenizer, self.examples, self.cfg, self.cfg.eval.temperature)
