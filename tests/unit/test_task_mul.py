"""`tiny:arith-mul`: the task family built for EAPO (eapo_ray/task.py)."""
import random
import re

import pytest

from eapo_ray import task
from eapo_ray.data import load_split


def _eval(text: str) -> int:
    assert re.fullmatch(r"[0-9+\-*()]+", text), text
    return eval(text)  # noqa: S307 - digits, + - * and parentheses only (checked above)


def test_mul_problems_meet_every_constraint():
    rng = random.Random(0)
    levels_seen, ops_seen = set(), set()
    for _ in range(3000):
        level = rng.choice(task.MUL_LEVELS)
        p = task.make_problem(rng, level, "mul")
        assert p.level == level == len(p.steps)
        assert 1 <= p.steps[0][0] <= 99  # the first value
        value = p.steps[0][0]
        for a, op, b, c in p.steps:
            assert a == value and op in "+-*"
            assert (2 <= b <= 9) if op == "*" else (1 <= b <= 9)
            assert c == (a + b if op == "+" else a - b if op == "-" else a * b)
            assert 0 <= c <= task.MAX_VALUE
            value = c
            ops_seen.add(op)
        assert any(op == "*" and a >= 12 for a, op, _, _ in p.steps), p
        # written like the bundled task: evaluating the text (with its parentheses) gives the answer
        assert str(_eval(p.problem)) == p.answer
        assert task.solution(p).endswith(task.final_answer(p))
        levels_seen.add(level)
    assert levels_seen == {2, 3, 4} and ops_seen == set("+-*")


def test_mul_parentheses_follow_the_bundled_rule():
    rng = random.Random(1)
    found = 0
    for _ in range(500):
        p = task.make_problem(rng, 3, "mul")
        for i, (_, op, _, _) in enumerate(p.steps[1:], 1):
            if op == "*" and p.steps[i - 1][1] in "+-":
                assert p.problem.startswith("(")
                found += 1
    assert found > 0
    # the bundled task's rule on a hand-checked chain: 47*3=141, 141+5=146, 146*2 -> "(47*3+5)*2"
    rng2 = random.Random(0)
    while True:
        p = task.make_problem(rng2, 3, "mul")
        if [s[1] for s in p.steps] == ["*", "+", "*"]:
            a, _, b, _ = p.steps[0]
            assert p.problem == f"({a}*{b}+{p.steps[1][2]})*{p.steps[2][2]}"
            break


def test_mul_levels_and_family_checked():
    with pytest.raises(ValueError):
        task.make_problem(random.Random(0), 1, "mul")
    with pytest.raises(ValueError):
        task.make_problem(random.Random(0), 5, "mul")


def test_mul_split_is_disjoint_and_reproducible():
    train = load_split("tiny:arith-mul", "train", [2, 3, 4], 400, seed=0)
    held = load_split("tiny:arith-mul", "heldout", [2, 3, 4], 200, seed=1)
    assert not {e.problem for e in train} & {e.problem for e in held}
    assert train == load_split("tiny:arith-mul", "train", [2, 3, 4], 400, seed=0)
    assert len({e.problem for e in held}) == 200
    # a different family from tiny:arith (whose first value is 1-9 and has no hard product guarantee)
    assert held != load_split("tiny:arith", "heldout", [2, 3, 4], 200, seed=1)
    assert all(task.split_of(e.problem) == "heldout" for e in held)


def test_unknown_tiny_task_names_the_available_ones():
    from eapo_ray.data import DataError

    with pytest.raises(DataError, match="tiny:arith-mul"):
        load_split("tiny:nope", "train", [2], 10, seed=0)


def test_mul_warm_start_samples_speak_the_protocol():
    """The mul policy's warm-start text: consults (sometimes two parallel queries) parse as the
    episode parses them; replies are observations (never trained); own steps are right."""
    from eapo_ray.rollout.protocol import ProtocolConfig, parse_action
    from eapo_ray.tools.make_tiny_mul import policy_example

    proto = ProtocolConfig(query_sep="|")
    rng = random.Random(3)
    parallel = consults = 0
    for _ in range(300):
        p = task.make_problem(rng, rng.choice(task.MUL_LEVELS), "mul")
        segs = policy_example(p, rng, proto, hard_consult=0.6, easy_consult=0.03, accept=0.8, parallel=0.3,
                              template="Q:{problem}\nA:")
        assert segs[0] == (f"Q:{p.problem}\nA:", False) and segs[-1] == (task.final_answer(p), True)
        for text, trained in segs[1:]:
            if text.startswith(proto.expert_open):
                assert not trained
            elif text.startswith(proto.consult_open):
                action = parse_action(text, proto)
                assert action.kind == "consult" and trained
                consults += 1
                parallel += len(action.queries) == 2
                assert all(q == action.queries[0] for q in action.queries)
                a, b = action.queries[0].split("*") if "*" in action.queries[0] else (None, None)
                assert a is None or int(a) >= 0
        full = "".join(t for t, _ in segs[1:])
        for a, op, b, c in p.steps:  # every step is stated: by the policy (`...=c;`) or in an accepted reply
            assert f"{a}{op}{b}={c};" in full or f"{proto.expert_open}{a}{op}{b}={c}{proto.expert_close}" in full
    assert consults > 100 and 0.15 < parallel / consults < 0.45


def test_chain_family_one_hard_product_among_the_first_two_then_plus_minus():
    import random

    from eapo_ray import task

    rng = random.Random(0)
    for level in task.CHAIN_LEVELS:
        for _ in range(50):
            p = task.make_chain_problem(rng, level)
            ops = [op for _, op, _, _ in p.steps]
            assert len(ops) == level and ops.count("*") == 1 and ops.index("*") < 2
            a, _, b, _ = p.steps[ops.index("*")]
            assert task.CHAIN_HARD_LEFT[0] <= a <= task.CHAIN_HARD_LEFT[1] and 2 <= b <= 9
            assert all(0 <= c <= task.MAX_VALUE for *_, c in p.steps) and str(p.steps[-1][3]) == p.answer
            assert eval(p.problem) == int(p.answer)
    with pytest.raises(ValueError):
        task.make_chain_problem(rng, 2)
    assert task.FAMILIES["tiny:arith-chain"] == "chain"
    assert len(task.sample_problems(20, [3, 6], "heldout", 1, "chain")) == 20
