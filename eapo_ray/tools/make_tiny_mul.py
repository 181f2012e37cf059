"""Bundled models for `tiny:arith-mul` (``python -m eapo_ray.tools.make_tiny --task mul``).

Writes ``eapo_ray/assets/tiny_mul/{policy,expert,weak_expert}`` and ``make_tiny.json``:

- expert (d=--expert-hidden, 4 layers): trained on single steps as the task asks them (steps
  of sampled `tiny:arith-mul` problems, every type and value range, plus uniform products and
  single operations), writing the answer's digits last-first (TINY.md: reversed digits are
  what a tiny model learns arithmetic from); configs set `expert.reverse_answer: true` so
  the reply shows them in order. Evaluated every --eval-every steps on 300 task products.
- weak_expert: the expert's own first checkpoint whose accuracy on the task's multi-digit
  products reaches --weak-target (a genuinely weaker model, not a temperature).
- policy (d=128, 4 layers): warm-started on reference solutions in the EAPO action language.
  A multi-digit-by-digit product (left operand >= 10) is consulted with probability
  --hard-consult (sometimes as two parallel queries, ``a*b|a*b``, a cross-check); the reply
  (masked out of the warm-start loss) is answered with probability --accept, else the
  policy works the step out. Other steps are rarely consulted. No bare-answer habit.
  Training is evaluated every --eval-every steps (teacher-forced per-step accuracy on
  held-out problems) and the policy kept is the last checkpoint whose multi-digit product
  accuracy is <= --hard-max while +/- and single-digit products are >= --easy-min: weak
  exactly where the expert is strong, measured, not assumed.
"""
from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import torch

from eapo_ray.task import (
    MAX_VALUE,
    MUL_LEVELS,
    Problem,
    final_answer,
    is_hard_product,
    make_problem,
    random_operation,
    sample_problems,
)

STEP_TYPES = ("add", "sub", "mul_small", "mul_hard")


def step_type(a: int, op: str, b: int) -> str:
    if op == "*":
        return "mul_hard" if is_hard_product(a, op, b) else "mul_small"
    return "add" if op == "+" else "sub"


def task_step(rng: random.Random) -> tuple[int, str, int, int]:
    """One step of a random `tiny:arith-mul` problem (the distribution the task asks)."""
    p = make_problem(rng, rng.choice(MUL_LEVELS), "mul")
    return rng.choice(p.steps)


def expert_query(rng: random.Random) -> tuple[str, str]:
    """(query, answer) for expert training: 60% task steps, 25% uniform multi-digit products,
    15% uniform single operations (values the policy's own wrong intermediates can reach)."""
    u = rng.random()
    if u < 0.6:
        a, op, b, c = task_step(rng)
    elif u < 0.85:
        b = rng.randint(2, 9)
        a = rng.randint(10, MAX_VALUE // b)
        op, c = "*", a * b
    else:
        a, op, b, c = random_operation(rng)
    return f"{a}{op}{b}", str(c)


def policy_example(p: Problem, rng: random.Random, proto, hard_consult: float, easy_consult: float, accept: float,
                   parallel: float, template: str):
    """(text, trained) segments of one warm-start sample. Expert replies are observations: not trained."""
    segs = [(template.format(problem=p.problem), False)]
    for a, op, b, c in p.steps:
        if rng.random() < (hard_consult if is_hard_product(a, op, b) else easy_consult):
            q = f"{a}{op}{b}"
            queries = [q, q] if rng.random() < parallel else [q]
            segs.append((f"{proto.consult_open}{proto.query_sep.join(queries)}{proto.consult_close}", True))
            if rng.random() < accept:
                segs.append(("".join(f"{proto.expert_open}{q}={c}{proto.expert_close}" for q in queries), False))
                continue
            segs.append(("".join(f"{proto.expert_open}{proto.unavailable}{proto.expert_close}" for _ in queries), False))
        segs.append((f"{a}{op}{b}={c};", True))
    segs.append((final_answer(p), True))
    return segs


@torch.no_grad()
def complete(model, tok, prompts: list[str], max_new_tokens: int, stop_ids: list[int], batch: int = 256,
             bad_words_ids=None) -> list[str]:
    out = []
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True)
        g = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                           pad_token_id=tok.pad_token_id, bad_words_ids=bad_words_ids)
        out += tok.batch_decode(g[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def expert_accuracy(model, tok, queries: list[tuple[int, str, int, int]], template: str, reverse: bool = True) -> dict:
    """Greedy exact-match accuracy on `queries` (steps), overall and by step type; the model
    writes answers reversed (expert.reverse_answer), flipped back here as the Serve expert does."""
    replies = complete(model, tok, [template.format(problem=f"{a}{op}{b}") for a, op, b, _ in queries], 6,
                       [tok.eos_token_id])
    ok = [(r.strip()[::-1] if reverse else r.strip()) == str(c) for r, (_, _, _, c) in zip(replies, queries)]
    out = {"n": len(queries), "accuracy": sum(ok) / len(ok)}
    for t in STEP_TYPES:
        idx = [i for i, (a, op, b, _) in enumerate(queries) if step_type(a, op, b) == t]
        if idx:
            out[t] = {"n": len(idx), "accuracy": sum(ok[i] for i in idx) / len(idx)}
    return out


def policy_step_accuracy(model, tok, problems: list[Problem], template: str) -> dict:
    """Teacher-forced per-step accuracy: the reference steps so far, then ``a op b=``; greedy until ``;``."""
    prompts, golds, types = [], [], []
    for p in problems:
        prefix = template.format(problem=p.problem)
        for a, op, b, c in p.steps:
            prompts.append(prefix + f"{a}{op}{b}=")
            golds.append(str(c))
            types.append(step_type(a, op, b))
            prefix += f"{a}{op}{b}={c};"
    semi = tok.convert_tokens_to_ids(";")
    replies = complete(model, tok, prompts, 5, [semi, tok.eos_token_id])
    ok = [r.split(";")[0].strip() == g for r, g in zip(replies, golds)]
    out = {}
    for t in STEP_TYPES:
        idx = [i for i, tt in enumerate(types) if tt == t]
        if idx:
            out[t] = {"n": len(idx), "accuracy": sum(ok[i] for i in idx) / len(idx)}
    return out


def pass_at_k_report(policy_dir: str, experts: dict, n_problems: int, samples: int, seed: int) -> dict:
    """pass@1 (greedy and sampled) and pass@k (T=1) on held-out problems, alone (consult banned)
    and with each expert in `experts` (name -> dir; every query answered, up to 4 turns): the
    launcher's own episode code on the HF engine, with configs/mul's settings."""
    from eapo_ray.config import PACKAGE_DIR, load_config
    from eapo_ray.data import Example
    from eapo_ray.evaluate import local_expert, run_eval, summarize
    from eapo_ray.rollout.hf_engine import HFEngine

    cfg = load_config(PACKAGE_DIR.parent / "configs" / "mul" / "eapo.yaml", [f"seed={seed}"])
    examples = [Example(p.problem, p.answer, p.level)
                for p in sample_problems(n_problems, list(MUL_LEVELS), "heldout", seed, "mul")]
    engine = HFEngine(policy_dir)
    tok = engine.tokenizer
    out = {"problems": n_problems, "samples": samples, "seed": seed, "max_turns_with_expert": cfg.rollout.train_turns}
    for mode, path in [("alone", None)] + [(f"with_{k}", v) for k, v in experts.items()]:
        e = local_expert(path, cfg) if path else None
        torch.manual_seed(seed)
        kw = dict(expert=e, max_turns=cfg.rollout.train_turns if e else None, batch=256)
        g = summarize(run_eval(engine, tok, examples, cfg, temperature=0.0, samples=1, **kw), examples, 1)
        s = summarize(run_eval(engine, tok, examples, cfg, temperature=1.0, samples=samples, **kw), examples, samples)
        out[mode] = {"greedy_pass@1": g["pass@1"], "sampled_pass@1": s["pass@1"], f"pass@{samples}": s[f"pass@{samples}"],
                     "sampled_consults_per_sample": s["consults_per_sample"],
                     "greedy_consults_per_sample": g["consults_per_sample"]}
        print(f"pass@k {mode}: {out[mode]}", flush=True)
    return out


def build(args, tok, proto, train, llama, batchify, TEMPLATE) -> dict:
    out = Path(args.out)
    report = {"args": vars(args), "task": "tiny:arith-mul"}
    eval_rng = random.Random(args.seed + 1000)
    eval_queries = [task_step(eval_rng) for _ in range(1000)]  # 1,000 queries as the task asks them
    hard_rng = random.Random(args.seed + 2000)
    hard_queries = []
    while len(hard_queries) < 300:
        s = task_step(hard_rng)
        if is_hard_product(*s[:3]):
            hard_queries.append(s)

    def batches(rng, n, reverse=True):
        return lambda: batchify(tok, [[(TEMPLATE.format(problem=q), False), (f"{a[::-1] if reverse else a}</s>", True)]
                                      for q, a in (expert_query(rng) for _ in range(n))])

    if args.expert_from:  # fine-tune an existing expert (digits in order) on the task's steps; keep weak_expert
        return finetune_expert(args, tok, train, batches, hard_queries, eval_queries, out, report, TEMPLATE)

    stage = getattr(args, "stage", "all")
    if stage == "policy":
        return train_policy(args, tok, proto, train, llama, batchify, TEMPLATE, out, report)
    t0 = time.time()
    if stage == "report":  # experts (--stage experts) and policy (--stage policy) already built
        from transformers import LlamaForCausalLM

        for f in ("experts.json", "policy.json"):
            report.update({k: v for k, v in json.loads((out / f).read_text()).items() if k != "args"})
        return policy_report(args, tok, LlamaForCausalLM.from_pretrained(out / "policy").eval(), out, report, TEMPLATE)
    if args.reuse_expert:
        from transformers import LlamaForCausalLM

        expert = LlamaForCausalLM.from_pretrained(out / "expert").eval()
        weak = LlamaForCausalLM.from_pretrained(out / "weak_expert").eval()
        prev = out / "make_tiny.json"
        if prev.exists():
            report["weak_expert_stopped_at"] = json.loads(prev.read_text()).get("weak_expert_stopped_at")
    else:
        torch.manual_seed(args.seed)
        expert = llama(tok, hidden=args.expert_hidden, layers=4, heads=4)
        rng_e, estate, weak, curve = random.Random(args.seed), {}, None, []
        if args.expert_init:  # continue training a saved expert (a new lr schedule); keep its weak expert
            from transformers import LlamaForCausalLM

            init = Path(args.expert_init)
            expert = LlamaForCausalLM.from_pretrained(init / "expert")
            weak = LlamaForCausalLM.from_pretrained(init / "weak_expert")
            prev = json.loads((init / "experts.json").read_text())
            report["weak_expert_stopped_at"] = prev.get("weak_expert_stopped_at")
            if not (report["weak_expert_stopped_at"] or {}).get("step"):  # the first part never reached the target
                weak = None
            report["expert_training_before"] = prev.get("expert_training_curve")
            rng_e = random.Random(args.seed + 100)
        for chunk in range(args.expert_steps // args.eval_every):
            train(expert, batches(rng_e, 128), args.eval_every, 2e-3, name="expert", log_every=10**9, constant=True,
                  state=estate, total=args.expert_steps)
            acc = expert_accuracy(expert, tok, hard_queries, TEMPLATE)["accuracy"]
            step = (chunk + 1) * args.eval_every
            curve.append({"step": step, "mul_hard": acc})
            print(f"[expert] step {step}: multi-digit products {acc:.3f} ({time.time() - t0:.0f}s)", flush=True)
            if weak is None and acc >= args.weak_target:  # the weak expert: this earlier, weaker checkpoint
                weak = copy.deepcopy(expert)
                report["weak_expert_stopped_at"] = {"step": step, "hard_product_accuracy_at_stop": acc,
                                                    "continued_from": args.expert_init or None}
            if acc >= 0.999 and chunk >= 3:
                break
        report["expert_training_curve"] = curve
        if args.expert_init:
            report["expert_training_curve_continued"] = curve
            report["expert_training_curve"] = report.pop("expert_training_before")
        expert.eval()
        weak = (weak or copy.deepcopy(expert)).eval()
        for name, m in (("expert", expert), ("weak_expert", weak)):
            m.save_pretrained(out / name)
            tok.save_pretrained(out / name)
        report["experts_seconds"] = time.time() - t0
    if stage == "experts":
        (out / "experts.json").write_text(json.dumps(report, indent=2))
        return report
    for name, m in (("expert", expert), ("weak_expert", weak)):
        report[f"{name}_accuracy_task_queries"] = expert_accuracy(m, tok, eval_queries, TEMPLATE)
        print(f"{name} on 1,000 task queries: {json.dumps(report[f'{name}_accuracy_task_queries'])}", flush=True)

    policy = train_policy(args, tok, proto, train, llama, batchify, TEMPLATE, out, report)
    return policy_report(args, tok, policy, out, report, TEMPLATE)


def finetune_expert(args, tok, train, batches, hard_queries, eval_queries, out, report, TEMPLATE):
    """The expert for tiny:arith-mul: the bundled tiny:arith expert (d=192; 0.97 on the task's
    multi-digit products, 0.84-0.89 on its +/- steps, measured) fine-tuned on the task's step
    distribution, digits in order (expert.reverse_answer: false), until its accuracy on 300
    task steps reaches 0.995 or --expert-steps."""
    from transformers import LlamaForCausalLM

    t0 = time.time()
    expert = LlamaForCausalLM.from_pretrained(args.expert_from)
    mixed = eval_queries[:300]
    rng, state, curve = random.Random(args.seed + 200), {}, []
    for chunk in range(args.expert_steps // args.eval_every):
        train(expert, batches(rng, 128, reverse=False), args.eval_every, 5e-4, name="expert", log_every=10**9,
              constant=True, state=state, total=args.expert_steps)
        acc = expert_accuracy(expert, tok, mixed, TEMPLATE, reverse=False)
        step = (chunk + 1) * args.eval_every
        curve.append({"step": step, "all": acc["accuracy"]} | {t: v["accuracy"] for t, v in acc.items() if t in STEP_TYPES})
        print(f"[expert] step {step}: {curve[-1]} ({time.time() - t0:.0f}s)", flush=True)
        if acc["accuracy"] >= 0.995 and chunk >= 1:
            break
    expert.eval()
    expert.save_pretrained(out / "expert")
    tok.save_pretrained(out / "expert")
    report.update({"expert_from": args.expert_from, "expert_finetune_curve": curve, "expert_seconds": time.time() - t0,
                   "expert_reverse_answer": False, "weak_expert_reverse_answer": True})
    prev = out / "experts.json"
    old = json.loads(prev.read_text()) if prev.exists() else {}
    report["weak_expert"] = {"from": "the first d=128 reversed-digit expert run (its final checkpoint)",
                             "training_curve": old.get("expert_training_curve"),
                             "stopped_at": old.get("weak_expert_stopped_at")}
    report["expert_accuracy_task_queries"] = expert_accuracy(expert, tok, eval_queries, TEMPLATE, reverse=False)
    weak = LlamaForCausalLM.from_pretrained(out / "weak_expert").eval()
    report["weak_expert_accuracy_task_queries"] = expert_accuracy(weak, tok, eval_queries, TEMPLATE, reverse=True)
    for n in ("expert", "weak_expert"):
        print(f"{n} on 1,000 task queries: {json.dumps(report[f'{n}_accuracy_task_queries'])}", flush=True)
    (out / "experts.json").write_text(json.dumps(report, indent=2))
    return report


def train_policy(args, tok, proto, train, llama, batchify, TEMPLATE, out, report):
    t0 = time.time()
    torch.manual_seed(args.seed + 1)
    rng = random.Random(args.seed + 1)
    policy = llama(tok, hidden=128, layers=4, heads=4)
    check = sample_problems(150, list(MUL_LEVELS), "heldout", args.seed + 3000, "mul")
    mk = lambda: batchify(tok, [policy_example(make_problem(rng, rng.choice(MUL_LEVELS), "mul"), rng, proto,
                                               args.hard_consult, args.easy_consult, args.accept, args.parallel,
                                               TEMPLATE) for _ in range(48)])
    curve, kept, over = [], None, 0
    opt_state = {}
    for chunk in range(args.policy_steps // args.eval_every):
        train(policy, mk, args.eval_every, 1.5e-3, name="policy", log_every=10**9, constant=True, state=opt_state)
        acc = policy_step_accuracy(policy, tok, check, TEMPLATE)
        step = (chunk + 1) * args.eval_every
        curve.append({"step": step} | {t: v["accuracy"] for t, v in acc.items()})
        print(f"[policy] step {step}: {curve[-1]} ({time.time() - t0:.0f}s)", flush=True)
        # keep the checkpoint with products <= hard_max that is best on the other steps (the latest
        # on ties); stop once the easy steps are learned and products passed hard_max, or products
        # passed it twice in a row
        # (single-digit products are ~1% of the task's steps: counted only when the check set has 30)
        easy = min(acc[t]["accuracy"] for t in ("add", "sub", "mul_small") if t in acc and acc[t]["n"] >= 30)
        hard = acc["mul_hard"]["accuracy"]
        if hard <= args.hard_max and (kept is None or easy >= kept[2]):
            kept = (step, copy.deepcopy(policy.state_dict()), easy)
        over = over + 1 if hard > args.hard_max else 0
        if over and ((kept and kept[2] >= args.easy_min) or over >= 2):
            break
    if kept is None:
        raise SystemExit(f"no policy checkpoint with multi-digit products <= {args.hard_max}: {curve}")
    policy.load_state_dict(kept[1])
    policy.eval()
    report["policy_training_curve"] = curve
    report["policy_kept_step"] = kept[0]
    report["policy_seconds"] = time.time() - t0
    policy.save_pretrained(out / "policy")
    tok.save_pretrained(out / "policy")
    (out / "policy.json").write_text(json.dumps({k: report[k] for k in ("policy_training_curve", "policy_kept_step",
                                                                         "policy_seconds")}, indent=2))
    return policy


def policy_report(args, tok, policy, out, report, TEMPLATE):
    for name in ("expert", "weak_expert"):
        if f"{name}_accuracy_task_queries" not in report:
            from transformers import LlamaForCausalLM

            m = LlamaForCausalLM.from_pretrained(out / name).eval()
            eval_rng = random.Random(args.seed + 1000)
            report[f"{name}_accuracy_task_queries"] = expert_accuracy(
                m, tok, [task_step(eval_rng) for _ in range(1000)], TEMPLATE, report.get(f"{name}_reverse_answer", True))
    held = sample_problems(400, list(MUL_LEVELS), "heldout", args.seed + 4000, "mul")
    report["policy_step_accuracy_heldout"] = policy_step_accuracy(policy, tok, held, TEMPLATE)
    print(f"policy per-step accuracy: {json.dumps(report['policy_step_accuracy_heldout'])}", flush=True)
    report["pass_at_k"] = pass_at_k_report(str(out / "policy"), {n: str(out / n) for n in ("expert", "weak_expert")},
                                           args.passk_problems, 8, args.seed + 5000)
    (out / "make_tiny.json").write_text(json.dumps(report, indent=2))
    print(f"saved to {out}", flush=True)
    return report
