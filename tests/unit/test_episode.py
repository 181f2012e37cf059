"""The EAPO episode on the bundled tiny policy (real transformers engine, no Ray).
The expert here is a plain function (the ExpertFn interface the Serve client also
implements), so the masks can be checked against known replies."""
import random
from pathlib import Path

import pytest
import torch

from eapo_ray.algo.batching import assign_advantages, collate, to_batch
from eapo_ray.algo.logprobs import token_logprobs
from eapo_ray.algo.protocol import ProtocolConfig
from eapo_ray.algo.reward import RewardConfig
from eapo_ray.config import TINY_DIR
from eapo_ray.rollout.episode import EpisodeSettings, run_episodes
from eapo_ray.rollout.hf_engine import HFEngine

PROTO = ProtocolConfig(query_sep="|")


def true_expert(queries):
    """Replies as the tiny config renders them ("{query}={answer}")."""
    ok = lambda q: q and q[-1].isdigit() and q.replace("+", "").replace("-", "").replace("*", "").isdigit()  # noqa: E731
    return [f"{q}={eval(q)}" if ok(q) else "?" for q in queries]


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return HFEngine(str(TINY_DIR / "policy"))


PROBLEMS = [("(23*4+5)*3-9", "282"), ("(8*7-4)*7", "364"), ("9*6*3-5", "157"), ("(4+5)*8*3", "216")]


def episodes(engine, accept_prob, n=64, expert=true_expert, seed=0, timer=None, **kw):
    tok = engine.tokenizer
    probs = [PROBLEMS[i % len(PROBLEMS)] for i in range(n)]
    prompts = [tok(f"Q:{p}\nA:")["input_ids"] for p, _ in probs]
    args = dict(proto=PROTO, reward=RewardConfig(), accept_prob=accept_prob, max_turns=4,
                max_new_tokens_per_turn=48, max_response_tokens=160, temperature=1.0)
    args.update(kw)
    return run_episodes(engine, tok, prompts, [a for _, a in probs], EpisodeSettings(**args), expert=expert,
                        rng=random.Random(seed), timer=timer)


def test_masks_logprobs_and_replies(engine):
    tok = engine.tokenizer
    trajs = episodes(engine, accept_prob=1.0)
    consulted = [t for t in trajs if t.consults]
    assert consulted, "the warm-started policy consults on some multiplication steps"
    for t in trajs:
        n = len(t.response_ids)
        assert len(t.policy_mask) == len(t.expert_mask) == len(t.behav_logp) == n
        assert all(lp <= 0 for lp in t.behav_logp)
        assert all((lp == 0.0) for lp, m in zip(t.behav_logp, t.policy_mask) if not m)
        assert not any(p and e for p, e in zip(t.policy_mask, t.expert_mask))
    for t in consulted:
        obs = tok.decode([i for i, p in zip(t.response_ids, t.policy_mask) if not p])
        assert obs.startswith("<expert>") and "unavailable" not in obs  # every query accepted
        expert_text = tok.decode([i for i, e in zip(t.response_ids, t.expert_mask) if e])
        assert all("=" in r for r in expert_text.split("</expert>") if r)
        assert 0 < t.accepted <= t.consults  # a consult in the last turn goes unanswered


def test_rejected_and_failed_queries_render_unavailable(engine):
    tok = engine.tokenizer
    for kw in ({"accept_prob": 0.0}, {"accept_prob": 1.0, "expert": lambda qs: [None] * len(qs)}):
        trajs = episodes(engine, **kw)
        consulted = [t for t in trajs if t.consults]
        assert consulted
        for t in consulted:
            assert t.accepted == 0 and sum(t.expert_mask) == 0
            assert "<expert>unavailable</expert>" in tok.decode(t.response_ids)
        if "expert" in kw:
            assert sum(t.expert_failures for t in trajs) == sum(t.consults for t in consulted if t.turns > 1) > 0


def test_ban_consult_at_evaluation(engine):
    trajs = episodes(engine, accept_prob=0.0, expert=None, ban_consult=True, temperature=0.0, max_turns=1, n=4)
    assert all(t.consults == 0 and "<consult>" not in engine.tokenizer.decode(t.response_ids) for t in trajs)


def test_learner_logprobs_match_behaviour(engine):
    """The learner's recomputed log-probs equal the engine's on the exact sampled ids."""
    trajs = episodes(engine, accept_prob=1.0, n=16)
    kept, _ = assign_advantages(trajs, dynamic_sampling=False)
    b = collate(to_batch(kept, overlong_filter=False), engine.pad_id)
    with torch.no_grad():
        logits = engine.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    lp = token_logprobs(logits, b["input_ids"], 1.0)
    m = b["policy_mask"] > 0
    assert m.sum() > 100
    assert (lp[m] - b["behav_logp"][m]).abs().max() < 1e-4


def test_expert_reply_with_an_answer_tag_earns_nothing(engine):
    """Only the policy's own final turn is scored: an expert reply carrying the right
    answer in answer tags is not the policy's answer (a reward-hacking channel)."""
    from eapo_ray.algo.reward import score

    tok = engine.tokenizer
    golds = {a for _, a in PROBLEMS}
    trajs = []
    for gold in sorted(golds):  # an expert that always "answers" with this problem set's gold
        expert = lambda qs, g=gold: [f"<answer>\\boxed{{{g}}}</answer>" for _ in qs]  # noqa: E731
        trajs += [t for t in episodes(engine, 1.0, n=32, expert=expert, max_turns=2) if t.gold == gold]
    leaked = 0
    for t in trajs:
        turns = _policy_turns(t)
        final = tok.decode(turns[-1])
        assert t.correct == score(final, t.gold, RewardConfig(), PROTO).correct
        whole = tok.decode(t.response_ids)
        if t.accepted and score(whole, t.gold, RewardConfig(), PROTO).correct and not t.correct:
            leaked += 1
    assert leaked > 0, "some episodes must end without the policy's own answer after a leaking reply"


def _policy_turns(t) -> list[list[int]]:
    """The policy's generated runs of tokens, one per turn."""
    runs, cur = [], []
    for tok_id, p in zip(t.response_ids, t.policy_mask):
        if p:
            cur.append(tok_id)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_turn_cut_by_the_per_turn_budget_is_overlong_and_last_turn_gets_the_rest(engine):
    trajs = episodes(engine, 1.0, n=32, max_new_tokens_per_turn=6, max_turns=3)
    cut = [t for t in trajs if len(_policy_turns(t)[-1]) == 6 and t.turns < 3]
    assert cut, "a 6-token turn budget cuts most turns"
    assert all(t.overlong and t.reward == 0.0 for t in cut)
    # a turn budget of 1: the only turn may use the whole response budget, not the per-turn cap
    single = episodes(engine, 0.0, n=16, expert=None, max_new_tokens_per_turn=6, max_turns=1)
    assert max(len(t.response_ids) for t in single) > 6


def test_episode_settings_for_training_and_evaluation_follow_the_config():
    """One settings object: training at a step follows the schedules; evaluation alone bans the
    consult tag and gives its one turn the whole budget; the workflow answers every query."""
    from eapo_ray.algo.schedules import acceptance_prob, training_turns
    from eapo_ray.config import load_config

    cfg = load_config(None)
    r = cfg.rollout
    for step in (0, 10, 29, 35):
        s = EpisodeSettings.for_training(cfg, step)
        rho = acceptance_prob(step, cfg.acceptance)
        assert s.accept_prob == rho and not s.ban_consult
        assert s.max_turns == training_turns(step, r.train_turns, r.eval_turns, cfg.acceptance.total_steps,
                                             r.min_train_turns)
        assert s.temperature == r.temperature and s.max_new_tokens_per_turn == r.max_new_tokens_per_turn
    # step 29: the default turn budget (over acceptance.total_steps) is 1, floored at
    # rollout.min_train_turns (2) with or without an expert; min_train_turns=1 lets it fall to 1
    assert EpisodeSettings.for_training(cfg, 29).max_turns == 2
    assert EpisodeSettings.for_training(cfg, 29, with_expert=False).max_turns == 2
    assert EpisodeSettings.for_training(load_config(None, ["rollout.min_train_turns=1"]), 29).max_turns == 1
    # rollout.turn_budget_steps: the budget's own horizon
    own = load_config(None, ["rollout.turn_budget_steps=100"])
    assert EpisodeSettings.for_training(own, 35, with_expert=False).max_turns == 2  # 4 - 3 * 0.35 = 2.95
    assert EpisodeSettings.for_training(load_config(None, ["rollout.turn_budget_steps=0"]), 35).max_turns == 4
    assert EpisodeSettings.for_training(cfg, 0, with_expert=False).accept_prob == 0.0
    alone = EpisodeSettings.for_eval(cfg, temperature=0.0)
    assert alone.ban_consult and alone.accept_prob == 0.0 and alone.max_turns == cfg.eval.max_turns
    assert alone.max_new_tokens_per_turn == r.max_response_tokens
    flow = EpisodeSettings.for_eval(cfg, temperature=1.0, with_expert=True, max_turns=r.train_turns)
    assert not flow.ban_consult and flow.accept_prob == 1.0 and flow.max_turns == r.train_turns
    assert flow.max_new_tokens_per_turn == r.max_new_tokens_per_turn


def reply_expert(queries):
    """Replies as the Serve expert returns them (algo.protocol.ExpertReply): the span of the
    expert's own answer and its token log-probs (here -0.1 each)."""
    from eapo_ray.algo.protocol import ExpertReply

    out = []
    for text in true_expert(queries):
        a = text.index("=") + 1 if "=" in text else 0
        out.append(ExpertReply(text, a, len(text), list(text[a:]), [-0.1] * (len(text) - a)))
    return out


def test_expert_mask_is_the_experts_answer_only_with_its_logprobs_and_behaviour_rho(engine):
    """Only the expert's generated answer is marked (not the echoed query `a*b=`, nor the tags),
    its tokens carry the expert's log-probs, and every sample records the rho it was generated
    under; to_batch / collate carry both to the learner. (Old code marked the whole reply and
    the closing tag, and recorded neither.)"""
    tok = engine.tokenizer
    trajs = episodes(engine, accept_prob=0.7, expert=reply_expert, n=32)
    consulted = [t for t in trajs if t.accepted]
    assert consulted
    for t in trajs:
        assert t.accept_prob == 0.7
        assert len(t.expert_logp) == len(t.response_ids)
        assert all(lp == (-0.1 if e else 0.0) for lp, e in zip(t.expert_logp, t.expert_mask))
    for t in consulted:
        text = tok.decode(t.response_ids)
        blocks = [b.split("</expert>")[0] for b in text.split("<expert>")[1:]]
        answers = [b.split("=", 1)[1] for b in blocks if b != "unavailable"]
        marked = tok.decode([i for i, e in zip(t.response_ids, t.expert_mask) if e])
        assert marked == "".join(answers) and "=" not in marked and "expert" not in marked
    kept, _ = assign_advantages(trajs, dynamic_sampling=False)
    b = collate(to_batch(kept))
    assert b["accept_prob"].tolist() == pytest.approx([0.7] * len(kept))
    assert torch.equal(b["expert_logp"] != 0, b["expert_mask"] > 0)


def test_observation_ids_unknown_expert_logprobs_are_nan():
    """A tokenization mismatch (or no log-probs) leaves the expert tokens marked, log-probs NaN."""
    import math

    from transformers import AutoTokenizer

    from eapo_ray.algo.protocol import ExpertReply
    from eapo_ray.rollout.episode import observation_ids

    tok = AutoTokenizer.from_pretrained(str(TINY_DIR / "policy"))
    for r in (ExpertReply("4*3=12", 4, 6, ["12"], [-0.5]), ExpertReply("4*3=12", 4, 6)):
        ids, mask, lps = observation_ids(tok, [r, "1+1=2", None], [True, True, False], PROTO)
        assert tok.decode(ids) == "<expert>4*3=12</expert><expert>1+1=2</expert><expert>unavailable</expert>"
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == "121+1=2"  # a plain str reply: marked whole
        assert sum(math.isnan(x) for x in lps) == 7 and all(x == 0.0 for x, m in zip(lps, mask) if not m)


def test_bundled_expert_returns_answer_spans_and_logprobs():
    """The Serve expert's reply (Expert.answer_full, what __call__ returns): the answer span of
    `a*b=c` is `c`, with one log-prob per answer token under the expert (T=1, near 0 for the
    bundled mul expert's confident answers); the reversed-digit weak expert's come back in
    reading order."""
    from eapo_ray.config import load_config
    from eapo_ray.expert import Expert

    for row, model in (("eapo", "expert"), ("eapo_weak_expert", "weak_expert")):
        cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "mul" / f"{row}.yaml"))
        e = Expert(str(TINY_DIR.parent / "tiny_mul" / model), cfg.expert)
        for q, r in zip(["47*3", "85-7"], e.answer_full(["47*3", "85-7"])):
            a, b = r.span
            assert r.text[:a] == q + "=" and "".join(r.token_texts) == r.text[a:b] and b == len(r.text)
            assert len(r.token_logprobs) == b - a and all(-20 < x <= 0 for x in r.token_logprobs)
        assert e.answer_now(["47*3"]) == [e.answer_full(["47*3"])[0].text]
        odd = e.answer_full(["{answer}*3"])[0]  # a query holding the template's own placeholder is copied as is
        assert odd.text.startswith("{answer}*3=") and odd.span[0] == len("{answer}*3=") and odd.span[1] == len(odd.text)


def test_timer_records_generation_expert_and_reward_time_without_changing_episodes(engine):
    import time

    from eapo_ray.timing import Overlap

    def slow_expert(queries):  # a plain function: the episodes' interleaving stays deterministic
        time.sleep(0.05)
        return true_expert(queries)

    torch.manual_seed(1)
    plain = episodes(engine, accept_prob=1.0, n=16, expert=slow_expert)
    torch.manual_seed(1)
    timer, t0 = Overlap(), time.perf_counter()
    timed = episodes(engine, accept_prob=1.0, n=16, expert=slow_expert, timer=timer)
    wall = time.perf_counter() - t0
    assert [t.response_ids for t in timed] == [t.response_ids for t in plain]
    assert [t.behav_logp for t in timed] == [t.behav_logp for t in plain]
    assert any(t.accepted for t in timed)
    assert timer.busy_s("expert") >= 0.05 and timer.busy_s("engine") > 0 and timer.busy_s("reward") > 0
    assert timer.only_s("expert") <= timer.busy_s("expert") <= wall + 1e-6


def test_episodes_do_not_depend_on_when_expert_replies_arrive(engine, monkeypatch):
    """Each episode samples with its own seed (algo.sampling): with an expert whose replies come
    back after random delays, so that which turns share a decoding batch changes from run to run,
    the same rng seed gives the same episodes (tokens, log-probs, rewards), also when turns join a
    batch that is already decoding. With batch-dependent sampling (torch.multinomial over the
    batch) the runs differed."""
    import asyncio

    def jittery(delays):
        async def expert(queries):
            await asyncio.sleep(delays.pop() if delays else 0.0)
            return true_expert(queries)
        return expert

    from eapo_ray.rollout import engine as engine_mod

    joined, take = [], engine_mod._MicroBatcher._take
    monkeypatch.setattr(engine_mod._MicroBatcher, "_take", lambda self, *a: joined.append(len(r := take(self, *a))) or r)
    runs = []
    # the third run also lets turns join a decoding batch (rollout.join_running): the same episodes
    for jitter_seed, join in ((1, False), (2, False), (3, True)):
        j = random.Random(jitter_seed)
        torch.manual_seed(jitter_seed)  # torch's RNG differs too: it must play no part
        engine.join_running = join
        try:
            runs.append(episodes(engine, accept_prob=1.0, n=32, seed=5,
                                 expert=jittery([j.uniform(0, 0.03) for _ in range(400)])))
        finally:
            engine.join_running = False
    a = runs[0]
    assert sum(t.accepted for t in a) >= 2  # the expert was on the episodes' path
    assert sum(joined) > 0  # in the third run some turns did join a decoding batch
    for b in runs[1:]:
        assert [t.response_ids for t in a] == [t.response_ids for t in b]
        assert [t.reward for t in a] == [t.reward for t in b]
        assert max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s.behav_logp, t.behav_logp)) < 1e-4


def test_pruning_finished_rows_changes_no_greedy_token_and_no_logprob(engine):
    """The transformers engine drops finished sequences from its running batch (issue 13): greedy
    outputs are those of the unpruned batch, and sampled tokens' recorded log-probs are the
    teacher-forced ones either way."""
    tok = engine.tokenizer
    prompts = [tok(f"Q:{p}\nA:")["input_ids"] for p, _ in PROBLEMS] * 8
    stop = [PROTO.consult_close, PROTO.answer_close]
    out = {}
    try:
        for flag in (False, True):
            engine.prune_finished = flag
            out[flag] = engine.generate(prompts, [48] * len(prompts), 0.0, stop)
            torch.manual_seed(3)
            sampled = engine.generate(prompts, [48] * len(prompts), 1.0, stop)
            for p, g in zip(prompts[:6], sampled[:6]):
                ids = torch.tensor([p + g.tokens])
                ref = token_logprobs(engine.model(input_ids=ids).logits, ids, 1.0)[0, len(p) - 1:]
                assert torch.allclose(ref, torch.tensor(g.logprobs), atol=1e-4)
    finally:
        engine.prune_finished = True
    assert [g.tokens for g in out[True]] == [g.tokens for g in out[False]]
    assert [g.finish for g in out[True]] == [g.finish for g in out[False]]
    assert len({len(g.tokens) for g in out[True]}) > 1  # sequences did finish at different steps


def test_grades_run_one_at_a_time_on_the_grading_thread(engine, monkeypatch):
    """Cold review: grading moved to asyncio.to_thread, so up to 32 grades ran at once against
    math-verify's one-process pool, where a grade's timeout also counted its wait in the queue
    and one slow grade zeroed every grade queued behind it. Grades run off the event loop but
    one at a time (old code: 16 concurrent)."""
    import threading
    import time

    import eapo_ray.rollout.episode as E

    lock, now, peak = threading.Lock(), [0], [0]
    real = E.score

    def counting_score(*a, **k):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.02)
        with lock:
            now[0] -= 1
        return real(*a, **k)

    monkeypatch.setattr(E, "score", counting_score)
    monkeypatch.setattr(E, "quick_score", lambda *a, **k: None)  # every grade takes the thread (else: integers inline)
    trajs = episodes(engine, accept_prob=0.0, n=16)
    assert len(trajs) == 16 and peak[0] == 1


def test_expert_without_answer_logprobs_gives_the_same_replies_and_tokens():
    """A run that does not train on the expert's tokens (algo.expert_token_channel masked) deploys
    the expert without its teacher-forced log-prob pass (run_expert_app): the replies, their spans
    and the token ids the policy sees are the same; only the (unused) log-probs are unknown."""
    import math

    from eapo_ray.config import load_config
    from eapo_ray.expert import Expert, run_expert_app
    from eapo_ray.rollout.episode import observation_ids

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "mul" / "eapo.yaml"))
    path = str(TINY_DIR.parent / "tiny_mul" / "expert")
    full, lean = Expert(path, cfg.expert), Expert(path, cfg.expert, answer_logprobs=False)
    qs = ["47*3", "85-7", "12*12"]
    a, b = full.answer_full(qs), lean.answer_full(qs)
    assert [(r.text, r.span) for r in a] == [(r.text, r.span) for r in b]
    assert all(r.token_logprobs is not None for r in a) and all(r.token_logprobs is None for r in b)
    proto = ProtocolConfig()
    ids_a, mask_a, _ = observation_ids(full.tok, a, [True] * 3, proto)
    ids_b, mask_b, elogp_b = observation_ids(lean.tok, b, [True] * 3, proto)
    assert any(mask_b) and (ids_a, mask_a) == (ids_b, mask_b)
    assert all(math.isnan(x) for x, m in zip(elogp_b, mask_b) if m)
    for channel, wanted in (("masked", False), ("luffy", True)):
        cfg.algo.expert_token_channel = channel
        assert run_expert_app(cfg, path)._bound_deployment.init_args[-1] is wanted


def test_replay_view_on_real_episodes_and_the_training_consult_ban(engine):
    """algo.expert_token_channel replay: a sample with accepted replies carries its view in the
    evaluation format: no consult or expert tag, each accepted reply written as `query=answer;`
    with exactly the expert's answers marked; a sample with none carries no view. The training
    key rollout.ban_consult makes episodes that never consult (RL with no consult action)."""
    tok = engine.tokenizer
    trajs = episodes(engine, accept_prob=0.7, expert=reply_expert, n=32, replay_template="{query}={answer};")
    helped = [t for t in trajs if t.replay_ids]
    assert helped and all(t.accepted for t in helped)
    assert all(t.replay_ids is None for t in trajs if not t.accepted)
    for t in helped:
        view = tok.decode(t.replay_ids)
        assert "<consult>" not in view and "<expert>" not in view
        answers = tok.decode([i for i, m in zip(t.replay_ids, t.replay_mask) if m])
        text = tok.decode(t.response_ids)
        replies = [b.split("</expert>")[0] for b in text.split("<expert>")[1:]]
        # the view holds the accepted replies up to the first unanswered query, each as its own step
        steps = [f"{r};" for r in replies[:len(replies)]]
        got = [s for s in steps if s in view]
        assert got and answers == "".join(s.split("=", 1)[1][:-1] for s in got)
    assert all(t.replay_ids is None for t in episodes(engine, accept_prob=0.7, expert=reply_expert, n=8))
    banned = episodes(engine, accept_prob=1.0, n=16, ban_consult=True)
    assert not any(t.consults for t in banned)
    from eapo_ray.config import load_config

    cfg = load_config(None, ["rollout.ban_consult=true", "algo.expert_token_channel=replay"])
    s = EpisodeSettings.for_training(cfg, 0)
    assert s.ban_consult and s.replay_template == "{query}={answer};"
    assert EpisodeSettings.for_training(load_config(None), 0).replay_template == ""


def test_own_steps_control_views_with_the_consult_tag_banned(engine):
    """The matched-dose control (algo.expert_token_channel own_steps, rollout.ban_consult): no
    consult is written; each of the policy's own hard products is sent to the expert with
    probability rho and its answer replaces the policy's in the view (counted in `accepted`)."""
    tok = engine.tokenizer
    asked = []

    def expert(queries):
        asked.extend(queries)
        return reply_expert(queries)

    trajs = episodes(engine, accept_prob=1.0, expert=expert, n=16, ban_consult=True,
                     own_step_pattern=r"(\d{2,}\*\d+)=(\d+);")
    assert not any(t.consults for t in trajs) and asked
    viewed = [t for t in trajs if t.replay_ids]
    assert viewed and sum(t.accepted for t in trajs) == len(asked)
    for t in viewed:
        view = tok.decode(t.replay_ids)
        a, b = view.rsplit("=", 1)  # the view ends with the last expert answer, which is the marked tokens' tail
        assert tok.decode([i for i, m in zip(t.replay_ids, t.replay_mask) if m]).endswith(b)
        assert b == str(eval(a.rsplit(";", 1)[-1]))  # the last answer is the true product (the expert's)
    none = episodes(engine, accept_prob=0.0, expert=expert, n=8, ban_consult=True,
                    own_step_pattern=r"(\d{2,}\*\d+)=(\d+);")
    assert not any(t.replay_ids for t in none)
