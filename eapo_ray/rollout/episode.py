"""The EAPO episode, batched: generate until a consult or an answer, send the queries
(up to K per turn, all in flight at once) to the expert, accept each with the scheduled
probability, append the replies as loss-masked observation tokens, repeat until an
answer or the turn budget; then score. No Ray here: the expert is a callable."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from eapo_ray.reward import RewardConfig, score
from eapo_ray.rollout.engine import Engine
from eapo_ray.rollout.protocol import ProtocolConfig, parse_action, render_replies

# expert(queries) -> one reply per query, None where the expert failed or timed out
ExpertFn = Callable[[list[str]], list["str | None"]]


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)  # policy and observation tokens
    policy_mask: list[int] = field(default_factory=list)  # 1 on tokens the policy sampled
    expert_mask: list[int] = field(default_factory=list)  # 1 on accepted expert reply tokens
    behav_logp: list[float] = field(default_factory=list)  # 0.0 on observation tokens
    gold: str = ""
    group: int = 0
    version: int = 0
    reward: float = 0.0
    correct: bool = False
    formatted: bool = False
    consults: int = 0  # queries asked
    accepted: int = 0  # queries answered by the expert
    expert_failures: int = 0  # accepted queries the expert failed to answer in time
    turns: int = 0
    overlong: bool = False  # cut off by the token budget
    done: bool = False

    def extend(self, ids, logps=None, expert_mask=None):
        """Append policy tokens (with their log-probs) or observation tokens (without)."""
        self.response_ids += ids
        self.policy_mask += [int(logps is not None)] * len(ids)
        self.expert_mask += expert_mask if expert_mask is not None else [0] * len(ids)
        self.behav_logp += logps if logps is not None else [0.0] * len(ids)


def observation_ids(tokenizer, replies: list[str | None], accepted: list[bool], proto: ProtocolConfig):
    """Token ids of the rendered replies, with a mask marking accepted reply content."""
    ids, mask = [], []
    for reply, ok in zip(replies, accepted):
        for piece, is_reply in ((proto.expert_open, False), (render_replies([reply], proto)[len(proto.expert_open):], ok and reply is not None)):
            t = tokenizer.encode(piece, add_special_tokens=False)
            ids += t
            mask += [int(is_reply)] * len(t)
    return ids, mask


def run_episodes(engine: Engine, tokenizer, prompts: list[list[int]], golds: list[str], *, proto: ProtocolConfig,
                 reward_cfg: RewardConfig, expert: ExpertFn | None, accept_prob: float, max_turns: int,
                 max_new_tokens_per_turn: int, max_response_tokens: int, temperature: float,
                 rng: random.Random, groups: list[int] | None = None, ban_consult: bool = False) -> list[Trajectory]:
    """Run one episode per prompt to the end and score it. `expert=None` or
    `accept_prob=0` means no help; consult turns then get "unavailable".
    `ban_consult` (evaluation) forbids the consult tag outright."""
    trajs = [Trajectory(list(p), gold=g, group=(groups[i] if groups else i), version=engine.version)
             for i, (p, g) in enumerate(zip(prompts, golds))]
    stop = [proto.consult_close, proto.answer_close]
    for turn in range(max_turns):
        active = [t for t in trajs if not t.done]
        if not active:
            break
        budgets = [min(max_new_tokens_per_turn, max_response_tokens - len(t.response_ids)) for t in active]
        gens = engine.generate([t.prompt_ids + t.response_ids for t in active], budgets, temperature, stop,
                               ban=[proto.consult_open] if ban_consult else ())
        pending = []  # (trajectory, queries, accepted flags)
        for t, g in zip(active, gens):
            t.extend(g.tokens, g.logprobs)
            t.turns += 1
            action = parse_action(tokenizer.decode(g.tokens, skip_special_tokens=True), proto)
            if action.kind != "consult" or turn == max_turns - 1:
                t.done = True
                t.overlong = g.finish == "length" and len(t.response_ids) >= max_response_tokens
                if action.kind == "consult":
                    t.consults += len(action.queries)
                continue
            flags = [expert is not None and rng.random() < accept_prob for _ in action.queries]
            t.consults += len(action.queries)
            pending.append((t, action.queries, flags))
        asked = [q for _, qs, fl in pending for q, f in zip(qs, fl) if f]
        answers = iter(expert(asked) if asked else [])
        for t, qs, flags in pending:
            replies = [next(answers) if f else None for f in flags]
            t.accepted += sum(r is not None for r in replies)
            t.expert_failures += sum(f and r is None for r, f in zip(replies, flags))
            ids, mask = observation_ids(tokenizer, replies, flags, proto)
            room = max_response_tokens - len(t.response_ids)
            if len(ids) >= room:  # no room left to continue after the observation
                t.done, t.overlong = True, True
                ids, mask = ids[:room], mask[:room]
            t.extend(ids, expert_mask=mask)
    for t in trajs:
        r = score(tokenizer.decode(t.response_ids, skip_special_tokens=True), t.gold, reward_cfg, proto)
        t.reward, t.correct, t.formatted = r.reward, r.correct, r.formatted
    return trajs
