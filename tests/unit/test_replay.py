"""The replay channel (algo.expert_token_channel: replay): each sample's accepted replies rewritten
as the policy's own steps (algo.replay), the view rows in the batch (algo.batching.to_batch), the
learner's loss on the view's answer tokens (against hand arithmetic), and no gradient from it when
no reply was accepted."""
import math

import pytest
import torch

from eapo_ray.algo.batching import collate, sample_rows, to_batch
from eapo_ray.algo.protocol import ExpertReply, ProtocolConfig
from eapo_ray.algo.replay import TurnRecord, encode_view, replay_pieces

PROTO = ProtocolConfig(query_sep="|")
TEMPLATE = "{query}={answer};"


def chars(text):  # a char-level encoder, as the bundled tokenizer
    return [ord(c) for c in text]


def test_the_view_rewrites_each_accepted_reply_as_the_policys_own_step():
    turns = [TurnRecord("5+2=7;<consult>47*3</consult>", ("47*3",), (ExpertReply("47*3=141", 5, 8),)),
             TurnRecord("141+5=146;<answer>\\boxed{146}</answer>")]
    pieces = replay_pieces(turns, PROTO, TEMPLATE)
    assert "".join(t for t, _ in pieces) == "5+2=7;47*3=141;141+5=146;<answer>\\boxed{146}</answer>"
    assert [t for t, a in pieces if a] == ["141"]
    ids, mask = encode_view(chars, pieces)
    text = "".join(map(chr, ids))
    assert "".join(c for c, m in zip(text, mask) if m) == "141" and text.index("141") == text.index("47*3=") + 5


def test_parallel_queries_plain_replies_and_where_the_view_stops():
    # two queries in one turn, plain-str replies (whole reply = answer), then a turn whose query was rejected
    turns = [TurnRecord("<consult>2*3|4*5</consult>", ("2*3", "4*5"), ("6", "20")),
             TurnRecord("x<consult>9*9</consult>", ("9*9",), (None,)),
             TurnRecord("81;<answer>1</answer>")]
    pieces = replay_pieces(turns, PROTO, TEMPLATE)
    assert "".join(t for t, _ in pieces) == "2*3=6;4*5=20;"  # stops before the rejected query's turn
    assert [t for t, a in pieces if a] == ["6", "20"]
    # no accepted answer in the view: no view
    assert replay_pieces([TurnRecord("<consult>9*9</consult>", ("9*9",), (None,)), TurnRecord("81")],
                         PROTO, TEMPLATE) is None
    assert replay_pieces([TurnRecord("<answer>3</answer>")], PROTO, TEMPLATE) is None
    with pytest.raises(ValueError, match="replay_step_template"):
        replay_pieces(turns, PROTO, "{query};")


class T:
    def __init__(self, prompt, resp, pmask, emask, adv, rho, view=None, overlong=False):
        self.prompt_ids, self.response_ids, self.policy_mask, self.expert_mask = prompt, resp, pmask, emask
        self.behav_logp = [-1.0 if m else 0.0 for m in pmask]
        self.expert_logp = [0.0] * len(resp)
        self.advantage, self.accept_prob, self.version, self.overlong = adv, rho, 3, overlong
        self.replay_ids, self.replay_mask = view if view else (None, None)


def test_view_rows_ride_after_the_samples():
    a = T([1, 2], [5, 6, 7], [1, 0, 1], [0, 1, 0], 0.5, 0.8, view=([5, 9, 7], [0, 1, 0]))
    b = T([1, 2], [5, 8], [1, 1], [0, 0], -0.5, 0.8)
    batch = to_batch([a, b], views=[a, b])
    assert batch["input_ids"] == [[1, 2, 5, 6, 7], [1, 2, 5, 8], [1, 2, 5, 9, 7]]
    assert batch["view"] == [0, 0, 1] and sample_rows(batch) == 2
    assert batch["policy_mask"][2] == [0, 0, 0] and batch["expert_mask"][2] == [0, 0, 0]
    assert batch["replay_mask"] == [[0, 0, 0], [0, 0], [0, 1, 0]]
    assert batch["advantage"][2] == 0.5 and batch["accept_prob"][2] == 0.8
    c = collate(batch)
    # position j scores token j+1: the view's answer token 9 (index 3) is scored at position 2
    assert c["replay_mask"][2].tolist() == [0, 0, 1, 0] and c["view"].tolist() == [0, 0, 1]
    a.overlong = True  # the overlong filter drops a cut-off sample's view, as its policy tokens
    assert to_batch([a, b], views=[a, b])["view"] == [0, 0]
    assert to_batch([a, b])["view"] == [0, 0]  # no views asked for


def _learner(overrides):
    from eapo_ray.config import load_config
    from eapo_ray.learner.actor import Learner

    lr = object.__new__(Learner)
    lr.cfg = load_config(None, ["acceptance.kind=linear", "acceptance.total_steps=30"] + overrides)
    lr.world_size, lr.version = 1, 3
    lr._all_reduce = lambda xs, op=None: list(xs)
    return lr


@pytest.mark.parametrize("weighting", ["rho", "advantage"])
def test_the_learners_replay_loss_and_gradient_against_hand_arithmetic(weighting):
    from eapo_ray.learner.stats import StepStats

    a = T([1, 2], [5, 6, 7], [1, 0, 1], [0, 1, 0], 0.5, 0.8, view=([5, 9, 7, 4], [0, 1, 1, 0]))
    b = T([1, 2], [5, 8], [1, 1], [0, 0], -0.5, 0.4, view=([3, 3], [1, 0]))
    col = collate(to_batch([a, b], views=[a, b]))
    g = torch.Generator().manual_seed(0)
    raw = -torch.rand(col["policy_mask"].shape, generator=g) - 0.1

    def loss(overrides):
        lr = _learner(overrides)
        logp = raw.clone().requires_grad_(True)
        norms, _ = lr._normalisers([[col]], [[logp.detach()]])
        acc = StepStats.of(lr.cfg.algo)
        out = lr._loss(col, logp, logp.detach(), norms[0], acc)
        out.backward()
        return out, logp.grad, norms[0], acc

    base, gbase, n0, _ = loss([])
    got, grad, norms, acc = loss(["algo.expert_token_channel=replay", "algo.replay_coef=0.5",
                                  f"algo.replay_weighting={weighting}"])
    assert norms["policy"] == n0["policy"] == 4.0  # the view rows add no policy tokens / sequences
    assert norms["replay"] == 3.0 and acc.sums["replay_tokens"] == 3.0
    # rows 2 (a's view: answer tokens at response index 1, 2 -> positions 2, 3) and 3 (b's view: index 0 -> 1)
    w = {"rho": [0.8, 0.4], "advantage": [0.5, -0.5]}[weighting]
    hand = -0.5 * (w[0] * (raw[2, 2] + raw[2, 3]) + w[1] * raw[3, 1]) / 3.0
    assert (got - base).item() == pytest.approx(hand.item(), rel=1e-5)
    d = grad - gbase
    expect = torch.zeros_like(d)
    expect[2, 2] = expect[2, 3] = -0.5 * w[0] / 3.0
    expect[3, 1] = -0.5 * w[1] / 3.0
    assert torch.allclose(d, expect, atol=1e-7)
    assert math.isclose(acc.sums["replay_loss"], float(-(raw[2, 2] + raw[2, 3] + raw[3, 1]) / 3.0), rel_tol=1e-5)


def test_no_accepted_reply_no_replay_gradient():
    """A batch whose samples got no accepted reply has no view rows, and the replay channel adds
    nothing to the loss or its gradient."""
    a = T([1, 2], [5, 6, 7], [1, 0, 1], [0, 0, 0], 0.5, 0.8)
    b = T([1, 2], [5, 8], [1, 1], [0, 0], -0.5, 0.4)
    col = collate(to_batch([a, b], views=[a, b]))
    assert col["view"].tolist() == [0, 0]
    raw = -torch.rand(col["policy_mask"].shape, generator=torch.Generator().manual_seed(1)) - 0.1
    grads = []
    for ov in ([], ["algo.expert_token_channel=replay", "algo.replay_weighting=rho"]):
        from eapo_ray.learner.stats import StepStats

        lr = _learner(ov)
        logp = raw.clone().requires_grad_(True)
        norms, _ = lr._normalisers([[col]], [[logp.detach()]])
        lr._loss(col, logp, logp.detach(), norms[0], StepStats.of(lr.cfg.algo)).backward()
        grads.append(logp.grad)
    assert torch.equal(grads[0], grads[1])


def test_replay_config_keys():
    from eapo_ray.config import ConfigError, load_config

    cfg = load_config(None, ["algo.expert_token_channel=replay"])
    assert cfg.algo.replay_weighting == "rho" and cfg.algo.replay_step_template == "{query}={answer};"
    for bad in ("algo.replay_weighting=sign", "algo.replay_coef=-1", "algo.replay_step_template={query}"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])


def test_the_controls_view_puts_the_experts_answers_into_the_policys_own_steps():
    from eapo_ray.algo.replay import own_step_pieces, own_step_sites

    text = "5+2=7;47*3=140;140+5=145;<answer>\\boxed{145}</answer>"
    pattern = r"(\d{2,}\*\d+)=(\d+);"
    sites = own_step_sites(text, pattern)
    assert sites == [(11, 14, "47*3")]
    pieces = own_step_pieces(text, sites, [ExpertReply("47*3=141", 5, 8)])
    assert pieces == [("5+2=7;47*3=", False), ("141", True)]  # ends after the last answer (nothing later trains)
    assert own_step_pieces(text, sites, [None]) is None
    assert own_step_sites("7*3=21;", pattern) == []  # a one-digit product is not a hard step


def test_own_step_pattern_must_have_two_groups():
    from eapo_ray.config import ConfigError, load_config

    ok = ["algo.expert_token_channel=own_steps", "rollout.ban_consult=true"]
    assert load_config(None, ok).algo.own_step_pattern
    with pytest.raises(ConfigError, match="needs rollout.ban_consult"):
        load_config(None, ok[:1])
    for bad in ("algo.own_step_pattern=(\\d+)=", "algo.own_step_pattern=(("):
        with pytest.raises(ConfigError, match="own_step_pattern"):
            load_config(None, [bad])


def test_a_tensor_parallel_engine_must_hold_its_gpus():
    """A vLLM engine with tensor_parallel_size > 1 runs its shards on the GPUs its actor holds
    (executor "mp"): fewer GPUs than shards is refused at load, naming the key; a fractional GPU
    share stays allowed at tensor_parallel_size 1."""
    from eapo_ray.config import ConfigError, load_config

    base = ["rollout.engine=vllm", "rollout.vllm.tensor_parallel_size=2"]
    with pytest.raises(ConfigError, match="rollout.num_gpus"):
        load_config(None, base + ["rollout.num_gpus=1"])
    assert load_config(None, base + ["rollout.num_gpus=2"]).rollout.num_gpus == 2
    assert load_config(None, ["rollout.engine=vllm", "rollout.num_gpus=0.5"]).rollout.num_gpus == 0.5
