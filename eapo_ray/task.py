"""The bundled task: seeded multi-step integer arithmetic with difficulty levels.

A problem is a chain of 1..4 operations on operands 1-9, e.g. ``(3+4)*5-2``, every
intermediate value in 0..999. Its reference solution evaluates one operation per
step (``3+4=7;7*5=35;35-2=33;``) and ends with ``<answer>\\boxed{33}</answer>``.
Train and held-out problems are disjoint: a problem's split is a hash of its text.
``tiny:arith-mul`` (`make_mul_problem`) is the family built for EAPO: first value 1-99 and at
least one multi-digit-by-digit product, which the bundled mul policy is weak at and its expert
is not. ``tiny:arith-chain`` (`make_chain_problem`, levels 3-6) has one such product among its first
two operations and only `+`/`-` steps after it. Pure Python; no Ray, no torch.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

OPS = "+-*"
MAX_VALUE = 999


@dataclass(frozen=True)
class Problem:
    problem: str
    answer: str
    steps: tuple[tuple[int, str, int, int], ...]  # (left, op, right, result)
    level: int


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_problem(rng: random.Random, level: int, family: str = "arith") -> Problem:
    """Draw one problem with `level` operations (rejection-sampled to stay in 0..999)."""
    if family == "mul":
        return make_mul_problem(rng, level)
    if family == "chain":
        return make_chain_problem(rng, level)
    while True:
        p = _chain(rng, rng.randint(1, 9), level, lambda op: rng.randint(1, 9))
        if p is not None:
            return p


def _chain(rng: random.Random, value: int, level: int, right, ops=None) -> Problem | None:
    """`level` operations from `value`, written with parentheses when `*` follows a top-level
    `+`/`-`; `right(op)` draws the right operand; `ops` (an iterator) fixes the operators (default:
    uniform). None when an intermediate leaves 0..MAX_VALUE."""
    text, top = str(value), "*"  # `top`: "+" when the text is a sum/difference at top level
    steps = []
    for _ in range(level):
        op = next(ops) if ops is not None else rng.choice(OPS)
        b = right(op)
        result = _apply(value, op, b)
        if not 0 <= result <= MAX_VALUE:
            return None
        left = f"({text})" if op == "*" and top == "+" else text
        text, top = f"{left}{op}{b}", ("*" if op == "*" else "+")
        steps.append((value, op, b, result))
        value = result
    return Problem(text, str(value), tuple(steps), level)


MUL_LEVELS = (2, 3, 4)
MUL_MIN_HARD_LEFT = 12  # every `tiny:arith-mul` problem multiplies a left operand >= this


def is_hard_product(a: int, op: str, b: int) -> bool:
    """A multi-digit-by-digit product: what `tiny:arith-mul` is built around."""
    return op == "*" and a >= 10


def make_mul_problem(rng: random.Random, level: int) -> Problem:
    """`tiny:arith-mul`: a chain of `level` (2-4) operations written like the bundled task; the
    first value 1-99, `+`/`-` take a right operand 1-9, `*` takes 2-9, every intermediate in
    0..999, and at least one product has a left operand >= MUL_MIN_HARD_LEFT (rejection-sampled)."""
    if level not in MUL_LEVELS:
        raise ValueError(f"tiny:arith-mul has {MUL_LEVELS} operations, got {level}")
    while True:
        p = _chain(rng, rng.randint(1, 99), level, lambda op: rng.randint(2, 9) if op == "*" else rng.randint(1, 9))
        if p is not None and any(op == "*" and a >= MUL_MIN_HARD_LEFT for a, op, _, _ in p.steps):
            return p


CHAIN_LEVELS = (3, 4, 5, 6)
CHAIN_HARD_LEFT = (12, 99)  # the hard product's left operand range in `tiny:arith-chain`


def make_chain_problem(rng: random.Random, level: int) -> Problem:
    """`tiny:arith-chain`: `level` (3-6) operations, exactly one of them a hard product (left
    operand in CHAIN_HARD_LEFT, right 2-9) among the first two, every other one a `+`/`-` step
    with a right operand 1-9; the first value 1-99 and every intermediate in 0..999
    (rejection-sampled). The family that measures EAPO against chain length: one step the policy
    is weak at (the bundled mul policy's teacher-forced accuracy on such products is in
    docs/results.md), the rest steps it mostly gets right."""
    if level not in CHAIN_LEVELS:
        raise ValueError(f"tiny:arith-chain has {CHAIN_LEVELS} operations, got {level}")
    lo, hi = CHAIN_HARD_LEFT
    while True:
        at = rng.randrange(2)  # the product is the first or the second operation
        first = rng.randint(lo, hi) if at == 0 else rng.randint(1, 99)
        ops = ["+" if rng.random() < 0.5 else "-" for _ in range(level)]
        ops[at] = "*"
        it = iter(ops)
        p = _chain(rng, first, level, lambda op: rng.randint(2, 9) if op == "*" else rng.randint(1, 9), ops=it)
        if p is not None and sum(op == "*" for _, op, _, _ in p.steps) == 1 and lo <= p.steps[at][0] <= hi:
            return p


FAMILIES = {"tiny:arith": "arith", "tiny:arith-mul": "mul",
            "tiny:arith-chain": "chain"}  # data.train / data.heldout value -> family


def final_answer(p: Problem) -> str:
    """The answer block that ends every response."""
    return f"<answer>\\boxed{{{p.answer}}}</answer>"


def solution(p: Problem) -> str:
    """The reference chain-of-thought response (what the policy is warm-started on)."""
    return "".join(f"{a}{op}{b}={c};" for a, op, b, c in p.steps) + final_answer(p)


def split_of(problem_text: str, heldout_frac: float = 0.2) -> str:
    h = int(hashlib.sha256(problem_text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if h < heldout_frac else "train"


def sample_problems(n: int, levels: list[int], split: str, seed: int, family: str = "arith") -> list[Problem]:
    """`n` distinct problems of the given split, levels drawn uniformly, reproducible from `seed`."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(n * 200):
        p = make_problem(rng, rng.choice(levels), family)
        if p.problem not in seen and split_of(p.problem) == split:
            seen.add(p.problem)
            out.append(p)
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} distinct {split} problems at levels {levels}")


def random_operation(rng: random.Random) -> tuple[int, str, int, int]:
    """(a, op, b, c): one uniform single operation a op b = c with b in 1-9 and a, c in 0..MAX_VALUE."""
    while True:
        a, op, b = rng.randint(0, MAX_VALUE), rng.choice("+-*"), rng.randint(1, 9)
        if op == "*":
            a = rng.randint(0, MAX_VALUE // b)
        c = a + b if op == "+" else a - b if op == "-" else a * b
        if 0 <= c <= MAX_VALUE:
            return a, op, b, c
