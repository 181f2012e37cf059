"""Acceptance-rate decay (how EAPO withdraws the expert) and the shrinking turn budget."""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

Kind = Literal["inverse", "linear", "cosine", "exponential", "constant", "step"]
KINDS = typing.get_args(Kind)


@dataclass
class AcceptanceConfig:
    """rho_s, the probability that a consultation at training step s is answered.

    `inverse` is the paper's rho_s = 1/s (with `scale`: min(1, scale/s)).
    `step`: `start` until `total_steps`, then `end` (a hard cut-off).
    """

    kind: Kind = "inverse"
    start: float = 1.0
    end: float = 0.0
    total_steps: int = 1000
    scale: float = 1.0
    decay: float = 0.99

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"acceptance.kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("start", "end"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"acceptance.{name} must be in [0, 1], got {v}")
        if self.total_steps < 1:
            raise ValueError(f"acceptance.total_steps must be >= 1, got {self.total_steps}")
        if self.scale <= 0 or not 0 < self.decay <= 1:
            raise ValueError(f"acceptance.scale must be > 0 and decay in (0, 1], got {self.scale}, {self.decay}")


def acceptance_prob(step: int, cfg: AcceptanceConfig) -> float:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if cfg.kind == "inverse":
        return 1.0 if step == 0 else min(1.0, cfg.scale / step)
    if cfg.kind == "linear":
        frac = min(step, cfg.total_steps) / cfg.total_steps
        return cfg.start + (cfg.end - cfg.start) * frac
    if cfg.kind == "cosine":
        frac = min(step, cfg.total_steps) / cfg.total_steps
        return cfg.end + (cfg.start - cfg.end) * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.kind == "exponential":
        return max(cfg.end, cfg.start * cfg.decay**step)
    if cfg.kind == "step":
        return cfg.start if step < cfg.total_steps else cfg.end
    return cfg.start  # constant


def turn_budget(step: int, train_turns: int, eval_turns: int, total_steps: int) -> int:
    """Turns allowed at `step`: linear from `train_turns` down to `eval_turns`, floored."""
    if total_steps <= 0:
        return max(eval_turns, min(train_turns, eval_turns))
    frac = min(max(step, 0), total_steps) / total_steps
    return max(eval_turns, math.floor(train_turns + (eval_turns - train_turns) * frac))


def training_turns(step: int, train_turns: int, eval_turns: int, horizon: int, min_turns: int = 2) -> int:
    """The rollout turn budget at `step`: `turn_budget` over the budget's own `horizon` (steps;
    <= 0: no shrinking, `train_turns` throughout), never below `min_turns` (capped by
    `train_turns`; rollout.min_train_turns, default 2: one turn for a consult to be answered, one
    to answer upon the reply). The floor is the same for every row whatever its acceptance
    rate, so an EAPO row and its RL baseline always get the same turn budget at the same step
    (it used to apply only while rho > 0: EAPO had 2 turns where RL had 1); the acceptance
    schedule alone decides when help ends."""
    turns = train_turns if horizon <= 0 else turn_budget(step, train_turns, eval_turns, horizon)
    return max(turns, min(min_turns, train_turns))


def expert_sft_weight(algo_cfg, accept_prob):
    """The auxiliary NLL's coefficient on a sample's accepted expert tokens: `algo.expert_sft_coef`,
    times `accept_prob` when `algo.expert_sft_anneal` (UFT-style: the imitation term fades as help
    is withdrawn). `accept_prob` is the acceptance probability rho the sample was *generated
    under* (its behaviour rho, recorded per sample), not the learner's current step's: a sample
    generated at rho = 1 and trained a version later keeps its weight (a float, or a [B] tensor)."""
    coef = algo_cfg.expert_sft_coef
    if getattr(algo_cfg, "expert_sft_anneal", False):
        return coef * accept_prob
    return coef + 0.0 * accept_prob


def replay_weight(algo_cfg, accept_prob, advantage):
    """The replay channel's per-sample weight on its view's expert-answer tokens
    (algo.replay_weighting): "rho": replay_coef x the acceptance probability the sample was
    generated under (an NLL annealed as help is withdrawn); "advantage": replay_coef x the
    sample's group advantage (the answer tokens reinforced as the policy's own actions, by the
    outcome of the episode they came from). Floats or [B] tensors."""
    w = accept_prob if algo_cfg.replay_weighting == "rho" else advantage
    return algo_cfg.replay_coef * w
