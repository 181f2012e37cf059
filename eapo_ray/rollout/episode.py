"""The EAPO episode: generate until a consult or an answer, send the queries (up to K per
turn, all in flight at once) to the expert, accept each with the scheduled probability,
append the replies as loss-masked observation tokens, repeat until an answer or the turn
budget; then score. Episodes are coroutines, so a batch runs with every episode in flight
(the engine batches their requests). No Ray here: the expert is a callable."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import math
import random
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from eapo_ray.algo.protocol import ExpertReply, ProtocolConfig, parse_action, render_replies
from eapo_ray.algo.replay import TurnRecord, encode_view, own_step_pieces, own_step_sites, replay_pieces
from eapo_ray.algo.reward import RewardConfig, quick_score, score
from eapo_ray.algo.sampling import turn_seed
from eapo_ray.algo.schedules import acceptance_prob, training_turns
from eapo_ray.rollout.engine import Engine
from eapo_ray.timing import Overlap

# expert(queries) -> one reply per query (str, or algo.protocol.ExpertReply with the span of the
# expert's own answer and its token log-probs), None where the expert failed or timed out
# (a plain function, or an async one returning the same list)
ExpertFn = Callable[[list[str]], "list[str | ExpertReply | None] | Awaitable[list[str | ExpertReply | None]]"]


@dataclass(frozen=True)
class EpisodeSettings:
    """How a set of episodes runs: one object (AReaL-style), built from the run config for
    training at a step (`for_training`) or for evaluation (`for_eval`)."""
    proto: ProtocolConfig
    reward: RewardConfig
    max_turns: int  # policy turns; the last one gets all the room that is left
    max_new_tokens_per_turn: int
    max_response_tokens: int  # policy + observation tokens after the prompt
    temperature: float  # 0 = greedy
    accept_prob: float = 0.0  # probability that a query is answered (0: every consult reads "unavailable")
    ban_consult: bool = False  # the consult tag can never be written (evaluating the policy alone)
    # algo.expert_token_channel "replay": the step template that rewrites accepted replies as the
    # policy's own steps in each sample's replay view (algo.replay); "": no view
    replay_template: str = ""
    # algo.expert_token_channel "own_steps" (the matched-dose control): the regex of the policy's own steps
    # that get an expert answer, each with probability accept_prob, into the sample's view; "": none
    own_step_pattern: str = ""

    @classmethod
    def for_training(cls, cfg, step: int, *, with_expert: bool = True) -> "EpisodeSettings":
        """Training at learner step `step` (a config.RunConfig): the acceptance schedule's rho_s
        (0 without an expert) and the shrinking turn budget."""
        r = cfg.rollout
        rho = acceptance_prob(step, cfg.acceptance) if with_expert else 0.0
        # the turn budget's own horizon (rollout.turn_budget_steps; -1: acceptance.total_steps), never
        # below rollout.min_train_turns, whatever rho is (algo.schedules.training_turns)
        horizon = cfg.acceptance.total_steps if r.turn_budget_steps < 0 else r.turn_budget_steps
        return cls(cfg.protocol, cfg.reward,
                   max_turns=training_turns(step, r.train_turns, r.eval_turns, horizon, r.min_train_turns),
                   max_new_tokens_per_turn=r.max_new_tokens_per_turn, max_response_tokens=r.max_response_tokens,
                   temperature=r.temperature, accept_prob=rho, ban_consult=r.ban_consult,
                   replay_template=cfg.algo.replay_step_template if cfg.algo.expert_token_channel == "replay" else "",
                   own_step_pattern=cfg.algo.own_step_pattern if cfg.algo.expert_token_channel == "own_steps" else "")

    @classmethod
    def for_eval(cls, cfg, *, temperature: float, with_expert: bool = False,
                 max_turns: int | None = None) -> "EpisodeSettings":
        """Evaluation: alone (consult banned, one turn with the whole budget by default) or
        as a workflow with the expert (every query answered)."""
        r = cfg.rollout
        return cls(cfg.protocol, cfg.reward, max_turns=max_turns or cfg.eval.max_turns,
                   max_new_tokens_per_turn=r.max_new_tokens_per_turn if with_expert else r.max_response_tokens,
                   max_response_tokens=r.max_response_tokens, temperature=temperature,
                   accept_prob=1.0 if with_expert else 0.0, ban_consult=not with_expert)


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)  # policy and observation tokens
    policy_mask: list[int] = field(default_factory=list)  # 1 on tokens the policy sampled
    # 1 on the tokens of an accepted reply that the expert generated (its answer, not the echoed
    # query nor the reply template): the tokens the SFT and LUFFY-style channels train on
    expert_mask: list[int] = field(default_factory=list)
    behav_logp: list[float] = field(default_factory=list)  # 0.0 on observation tokens
    # the expert's log-prob of each expert_mask token (NaN where unknown, 0.0 off the mask)
    expert_logp: list[float] = field(default_factory=list)
    accept_prob: float = 0.0  # the acceptance probability rho this episode was generated under
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
    advantage: float = 0.0  # set by algo.batching.assign_advantages for kept samples
    # the replay view (algo.replay; EpisodeSettings.replay_template): the response in the evaluation format
    # and the mask of its expert-answer tokens; None for a sample without one
    replay_ids: list[int] | None = None
    replay_mask: list[int] | None = None

    def extend(self, ids, logps=None, expert_mask=None, expert_logp=None):
        """Append policy tokens (with their log-probs) or observation tokens (without)."""
        self.response_ids += ids
        self.policy_mask += [int(logps is not None)] * len(ids)
        self.expert_mask += expert_mask if expert_mask is not None else [0] * len(ids)
        self.behav_logp += logps if logps is not None else [0.0] * len(ids)
        self.expert_logp += expert_logp if expert_logp is not None else [0.0] * len(ids)


def observation_ids(tokenizer, replies: list, accepted: list[bool], proto: ProtocolConfig):
    """Token ids of the rendered replies, a mask marking the expert's own tokens of accepted
    replies, and their expert log-probs. For an ExpertReply only its answer span is marked (the
    echoed query `a*b=` and the template are observation, not the expert's action); a plain str
    reply is marked whole. The expert's log-probs go with its tokens when the policy's tokens of
    the answer read the same as the expert's (same tokenization), else NaN (unknown)."""
    ids, mask, elogp = [], [], []

    def add(text, is_expert, lps=None):
        t = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids.extend(t)
        mask.extend([int(is_expert)] * len(t))
        if not is_expert:
            elogp.extend([0.0] * len(t))
        elif lps is not None and [tokenizer.decode([i]) for i in t] == lps[0]:
            elogp.extend(float(x) for x in lps[1])
        else:
            elogp.extend([math.nan] * len(t))

    for reply, ok in zip(replies, accepted):
        add(proto.expert_open, False)
        ok = ok and reply is not None
        if isinstance(reply, ExpertReply) and ok:
            a, b = reply.span
            known = reply.token_texts is not None and reply.token_logprobs is not None
            add(reply.text[:a], False)
            add(reply.text[a:b], True, (reply.token_texts, reply.token_logprobs) if known else None)
            add(reply.text[b:] + proto.expert_close, False)
        elif ok:
            add(reply, True)
            add(proto.expert_close, False)
        else:
            add(render_replies([reply], proto)[len(proto.expert_open):], False)
    return ids, mask, elogp


async def run_episode(engine: Engine, tokenizer, t: Trajectory, s: EpisodeSettings, *, expert: ExpertFn | None,
                      rng: random.Random, timer: Overlap | None = None, row: dict | None = None) -> Trajectory:
    """Run one episode to the end and score it. Each generation and each expert call is
    awaited, so a batch of episodes interleaves: while some wait for the expert, others
    generate. `timer` (optional) records the wall time of generation ("engine"), expert calls
    ("expert") and grading ("reward") for the per-step breakdown."""
    timer = timer or _NO_TIMER
    proto, max_turns, max_response_tokens = s.proto, s.max_turns, s.max_response_tokens
    # the episode's sampling seed (engines with seeded_sampling): its tokens do not depend on which
    # other requests share a decoding batch, which depends on when expert replies come back
    episode_seed = rng.getrandbits(63)
    stop, ban = [proto.consult_close, proto.answer_close], [proto.consult_open] if s.ban_consult else []
    final_text = ""  # the policy's own last turn: the only text the reward reads
    turns: list[TurnRecord] = []  # for the replay view
    for turn in range(max_turns):
        room = max_response_tokens - len(t.response_ids)
        # the last turn gets all the room that is left, so a turn budget of 1 does not halve the cap
        budget = room if turn == max_turns - 1 else min(s.max_new_tokens_per_turn, room)
        with timer.busy("engine"):
            g = await engine.agenerate(t.prompt_ids + t.response_ids, budget, s.temperature, stop, ban,
                                       seed=turn_seed(episode_seed, turn))
        t.extend(g.tokens, g.logprobs)
        t.turns += 1
        final_text = tokenizer.decode(g.tokens, skip_special_tokens=True)
        action = parse_action(final_text, proto)
        if action.kind == "consult":
            t.consults += len(action.queries)
        if g.finish == "length":  # cut off before a consult or an answer closed: overlong, not wrong
            t.overlong = True
            turns.append(TurnRecord(final_text))
            break
        if action.kind != "consult" or turn == max_turns - 1:
            turns.append(TurnRecord(final_text, tuple(action.queries)))  # a last-turn consult: no replies
            break
        flags = [expert is not None and rng.random() < s.accept_prob for _ in action.queries]
        asked = [q for q, f in zip(action.queries, flags) if f]
        with timer.busy("expert"):
            answers = iter(await _ask(expert, asked) if asked else [])
        replies = [next(answers) if f else None for f in flags]
        t.accepted += sum(r is not None for r in replies)
        t.expert_failures += sum(f and r is None for r, f in zip(replies, flags))
        turns.append(TurnRecord(final_text, tuple(action.queries), tuple(replies)))
        ids, mask, elogp = observation_ids(tokenizer, replies, flags, proto)
        room = max_response_tokens - len(t.response_ids)
        if len(ids) >= room:  # no room left to continue after the observation
            t.extend(ids[:room], expert_mask=mask[:room], expert_logp=elogp[:room])
            t.overlong = True
            break
        t.extend(ids, expert_mask=mask, expert_logp=elogp)
    # Only the policy's final turn is scored: an answer tag inside an expert reply (or in an
    # earlier turn) must never earn the reward.
    # On the one grading thread: a grade sent to the process pool does not stall the other
    # episodes, and grades run one at a time as before, so a grade's timeout covers that grade
    # only (concurrent grades queued on the one-process pool would time out together; the first
    # grade's also covers what is left of the pool's start, as it always did).
    # Answers that need no math-verify call (none, or integers: ~7 us) are graded inline, without a
    # hop to the grading thread and back.
    with timer.busy("reward"):
        r = quick_score(final_text, t.gold, s.reward, proto)
        if r is None:
            r = await asyncio.get_running_loop().run_in_executor(_GRADER_THREAD, score, final_text, t.gold, s.reward,
                                                                 proto, row)  # row: the problem row, for reward.fn
    t.reward, t.correct, t.formatted = r.reward, r.correct, r.formatted
    if s.replay_template and t.accepted:
        pieces = replay_pieces(turns, proto, s.replay_template)
        if pieces:
            _set_view(t, tokenizer, pieces, max_response_tokens)
    if s.own_step_pattern and expert is not None and s.accept_prob > 0:
        await _own_step_view(t, tokenizer, s, expert, rng, timer)
    return t


async def _own_step_view(t: Trajectory, tokenizer, s: EpisodeSettings, expert: ExpertFn, rng: random.Random,
                         timer) -> None:
    """The matched-dose control's view (algo.expert_token_channel own_steps): each of the policy's
    own steps matching `s.own_step_pattern` is sent to the expert with probability rho (as a
    consult would be accepted), and the sample's view is its own response with those steps'
    answers replaced by the expert's (`t.accepted` counts them: the dose)."""
    text = tokenizer.decode(t.response_ids, skip_special_tokens=True)
    sites = [x for x in own_step_sites(text, s.own_step_pattern) if rng.random() < s.accept_prob]
    if not sites:
        return
    with timer.busy("expert"):
        replies = await _ask(expert, [q for _, _, q in sites])
    t.accepted += sum(r is not None for r in replies)
    t.expert_failures += sum(r is None for r in replies)
    pieces = own_step_pieces(text, sites, replies)
    if pieces:
        _set_view(t, tokenizer, pieces, s.max_response_tokens)


def _set_view(t: Trajectory, tokenizer, pieces: list[tuple[str, bool]], max_tokens: int) -> None:
    """The sample's view (algo.replay pieces) as token ids and its answer mask, cut at the response budget."""
    ids, mask = encode_view(lambda x: tokenizer.encode(x, add_special_tokens=False), pieces)
    t.replay_ids, t.replay_mask = ids[:max_tokens], mask[:max_tokens]


_GRADER_THREAD = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eapo-grade")


class _NoTimer:
    @contextlib.contextmanager
    def busy(self, kind: str):
        yield


_NO_TIMER = _NoTimer()


async def _ask(expert: ExpertFn, queries: list[str]) -> list[str | None]:
    out = expert(queries)  # a plain function or a coroutine function
    return await out if inspect.isawaitable(out) else out


def run_episodes(engine: Engine, tokenizer, prompts: list[list[int]], golds: list[str], settings: EpisodeSettings, *,
                 expert: ExpertFn | None, rng: random.Random, groups: list[int] | None = None,
                 timer: Overlap | None = None, rows: list[dict] | None = None) -> list[Trajectory]:
    """Run one episode per prompt, all in flight at once, and score them. `expert=None` or
    `settings.accept_prob=0` means no help; consult turns then get "unavailable"."""
    trajs = [Trajectory(list(p), gold=g, group=(groups[i] if groups else i), version=engine.version,
                        accept_prob=settings.accept_prob)
             for i, (p, g) in enumerate(zip(prompts, golds))]
    # one RNG per episode, drawn in order: acceptance coins do not depend on which episode's
    # expert call comes back first
    rngs = [random.Random(rng.getrandbits(64)) for _ in trajs]

    async def all_episodes():
        return await asyncio.gather(*[run_episode(engine, tokenizer, t, settings, expert=expert, rng=r, timer=timer,
                                                  row=rows[i] if rows else None)  # rows: reward.fn's problem rows
                                      for i, (t, r) in enumerate(zip(trajs, rngs))])

    return asyncio.run(all_episodes())
