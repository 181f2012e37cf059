"""The bundled tiny:arith-mul models (eapo_ray/assets/tiny_mul), measured here on fresh
samples, not read from make_tiny.json: the expert is right on the steps the task asks, the
weak expert is genuinely weaker, and the policy is weak exactly on multi-digit products."""
import random
from pathlib import Path

import pytest
import torch

from eapo_ray.config import PACKAGE_DIR, load_config
from eapo_ray.task import MUL_LEVELS, is_hard_product, sample_problems
from eapo_ray.tools.make_tiny_mul import policy_step_accuracy, step_type, task_step

ASSETS = PACKAGE_DIR / "assets" / "tiny_mul"
SEED = 20261129  # not a seed make_tiny uses: a fresh sample


def ask(model_dir: Path, queries, row: str = "eapo"):
    """The in-process expert exactly as the launcher's Serve expert answers, with the row's
    expert settings (the weak expert writes reversed digits, flipped back)."""
    from eapo_ray.evaluate import local_expert

    cfg = load_config(PACKAGE_DIR.parent / "configs" / "mul" / f"{row}.yaml")
    torch.set_num_threads(1)
    replies = local_expert(str(model_dir), cfg)([f"{a}{op}{b}" for a, op, b, _ in queries])
    return [r == f"{a}{op}{b}={c}" for r, (a, op, b, c) in zip(replies, queries)]


def accuracy_by_type(ok, queries):
    out = {}
    for t in ("add", "sub", "mul_small", "mul_hard"):
        sel = [o for o, q in zip(ok, queries) if step_type(*q[:3]) == t]
        if sel:
            out[t] = (sum(sel) / len(sel), len(sel))
    return out


@pytest.fixture(scope="module")
def queries():
    rng = random.Random(SEED)
    qs = [task_step(rng) for _ in range(300)]  # as the task asks them: every step type
    hard = []
    while len(hard) < 150:
        s = task_step(rng)
        if is_hard_product(*s[:3]):
            hard.append(s)
    return qs, hard


def test_bundled_expert_is_right_on_the_task_steps(queries):
    qs, hard = queries
    ok = ask(ASSETS / "expert", qs)
    by = accuracy_by_type(ok, qs)
    assert sum(ok) / len(ok) >= 0.98, by  # make_tiny measures >= 0.99 on 1,000; 300 here: allow sampling noise
    assert all(acc >= 0.95 for acc, n in by.values() if n >= 20), by
    assert sum(ask(ASSETS / "expert", hard)) / len(hard) >= 0.97


def test_weak_expert_is_genuinely_weaker_on_products(queries):
    _, hard = queries
    strong = sum(ask(ASSETS / "expert", hard)) / len(hard)
    weak = sum(ask(ASSETS / "weak_expert", hard, row="eapo_weak_expert")) / len(hard)
    assert 0.1 <= weak <= 0.85 and strong - weak >= 0.1, (weak, strong)  # measured ~0.3 (make_tiny.json)


def test_policy_is_weak_on_multi_digit_products_only():
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ASSETS / "policy")
    model = LlamaForCausalLM.from_pretrained(ASSETS / "policy").eval()
    probs = sample_problems(120, list(MUL_LEVELS), "heldout", SEED, "mul")
    acc = policy_step_accuracy(model, tok, probs, "Q:{problem}\nA:")
    # make_tiny.json (400 problems): products 0.22, additions 0.83, subtractions 0.85
    assert acc["mul_hard"]["accuracy"] <= 0.35, acc
    assert acc["add"]["accuracy"] >= 0.7 and acc["sub"]["accuracy"] >= 0.7, acc
    assert min(acc["add"]["accuracy"], acc["sub"]["accuracy"]) - acc["mul_hard"]["accuracy"] >= 0.35, acc


def test_chain_policy_writes_long_chains_and_stays_weak_on_products():
    """The bundled tiny:arith-chain policy (eapo_ray/assets/tiny_chain, make_tiny_chain.py) writes
    every step of 5-6-operation chains alone (the mul policy stops after four: it fails here),
    and its multi-digit products stay weak while the +/- steps are right."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from eapo_ray.tools.make_tiny_chain import chain_alone

    torch.set_num_threads(1)
    d = PACKAGE_DIR / "assets" / "tiny_chain" / "policy"
    tok = AutoTokenizer.from_pretrained(d)
    model = LlamaForCausalLM.from_pretrained(d).eval()
    probs = sample_problems(80, [5, 6], "heldout", SEED, "chain")
    alone = chain_alone(model, tok, probs, "Q:{problem}\nA:")
    assert alone["writes_whole_chain"] >= 0.9, alone  # make_tiny.json: 1.0 on 200 per length
    acc = policy_step_accuracy(model, tok, probs, "Q:{problem}\nA:")
    # make_tiny.json (200 problems per length): products 0.14-0.145, +/- 0.97-0.99
    assert acc["mul_hard"]["accuracy"] <= 0.3, acc
    assert min(acc["add"]["accuracy"], acc["sub"]["accuracy"]) >= 0.9, acc
