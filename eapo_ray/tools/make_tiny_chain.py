"""The bundled policy for `tiny:arith-chain` (``python -m eapo_ray.tools.make_tiny_chain``).

The mul policy (eapo_ray/assets/tiny_mul/policy) was warm-started on 2-4 operations and never
writes a fifth step: on 5-6-operation chains it answers after four (measured: greedy accuracy
~0.005 alone, whatever its product accuracy), so EAPO - RL at those lengths measured the
length limit, not the expert. This policy is that model fine-tuned on the same warm-start
samples (make_tiny_mul.policy_example: the product consulted with probability --hard-consult,
answered with --accept) drawn from `tiny:arith-chain` levels 3-6 (--chain-frac) and
`tiny:arith-mul` levels 2-4 (the rest), with the policy's own multi-digit product steps
(`47*3=141;`) left out of the loss: it learns the length, not the product (a first try that
trained them too passed --hard-max within 50 steps). Every --eval-every steps on held-out
5-6-operation chains: teacher-forced step
accuracy by type, and greedy alone (consult tag banned): the share of responses that write all
the chain's steps and the exact-answer accuracy. The checkpoint kept is the one with products
<= --hard-max that writes the whole chain most often (the latest on ties).

Writes ``--out`` (default eapo_ray/assets/tiny_chain)/policy and ``make_tiny.json``. The expert
is the mul expert (configs/chain point at eapo_ray/assets/tiny_mul/expert).
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import re
import time
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "assets"
STEP = re.compile(r"(\d+)([-+*])(\d+)=(\d+);")  # a step as the policy writes it: left, op, right, result
HARD_STEP = re.compile(r"\d{2,}\*\d+=\d+;")  # a multi-digit product step, as policy_example writes it


def alone_replies(model, tok, problems, template: str, max_new_tokens: int) -> list[str]:
    """Greedy replies with the consult tag banned (the evaluation's setting), stopped at </answer>."""
    from eapo_ray.tools.make_tiny_mul import complete

    stop = [tok.convert_tokens_to_ids("</answer>"), tok.eos_token_id]
    return complete(model, tok, [template.format(problem=p.problem) for p in problems], max_new_tokens, stop,
                    bad_words_ids=[[tok.convert_tokens_to_ids("<consult>")]])


def answered(reply: str, answer: str) -> bool:
    """Whether a reply from `alone_replies` holds the right answer (one cut before </answer> is closed)."""
    from eapo_ray.algo.reward import score

    return score(reply if reply.endswith("</answer>") else reply + "</answer>", answer).correct


def chain_alone(model, tok, problems, template: str) -> dict:
    """Greedy alone (consult banned): the share of responses with at least the chain's number of
    step-shaped segments (`a op b=c;`, operands not checked), and the exact-answer accuracy."""
    replies = alone_replies(model, tok, problems, template, 96)
    full = sum(len(STEP.findall(r)) >= p.level for r, p in zip(replies, problems)) / len(problems)
    acc = sum(answered(r, p.answer) for r, p in zip(replies, problems)) / len(problems)
    return {"writes_whole_chain": full, "greedy_accuracy": acc, "example": replies[0]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default=str(ASSETS / "tiny_mul" / "policy"), help="policy to fine-tune")
    ap.add_argument("--out", default=str(ASSETS / "tiny_chain"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=400, help="most fine-tuning steps (48 samples each)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--chain-frac", type=float, default=0.7, help="share of samples from tiny:arith-chain 3-6")
    ap.add_argument("--hard-consult", type=float, default=0.6, help="P(consult) for a multi-digit product")
    ap.add_argument("--accept", type=float, default=0.8, help="P(answered) for a warm-start consult")
    ap.add_argument("--hard-max", type=float, default=0.30, help="keep a checkpoint with products <= this")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer, LlamaForCausalLM

    from eapo_ray.algo.protocol import ProtocolConfig
    from eapo_ray.task import CHAIN_LEVELS, MUL_LEVELS, make_problem, sample_problems
    from eapo_ray.tools.make_tiny import TEMPLATE, batchify, train
    from eapo_ray.tools.make_tiny_mul import policy_example, policy_step_accuracy

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    proto = ProtocolConfig(query_sep="|")
    tok = AutoTokenizer.from_pretrained(args.init)
    policy = LlamaForCausalLM.from_pretrained(args.init)
    check = sample_problems(150, [5, 6], "heldout", args.seed + 3000, "chain")

    def measure(model):
        steps = policy_step_accuracy(model, tok, check, TEMPLATE)
        return {t: v["accuracy"] for t, v in steps.items()} | chain_alone(model, tok, check[:100], TEMPLATE)

    def sample():
        if rng.random() < args.chain_frac:
            p = make_problem(rng, rng.choice(CHAIN_LEVELS), "chain")
        else:
            p = make_problem(rng, rng.choice(MUL_LEVELS), "mul")
        segs = policy_example(p, rng, proto, args.hard_consult, 0.03, args.accept, 0.3, TEMPLATE)
        return [(text, trained and not HARD_STEP.fullmatch(text)) for text, trained in segs]

    t0 = time.time()
    curve = [{"step": 0} | measure(policy.eval())]
    print(f"[chain policy] step 0: {curve[-1]}", flush=True)
    kept, state = None, {}
    for chunk in range(args.steps // args.eval_every):
        train(policy, lambda: batchify(tok, [sample() for _ in range(48)]), args.eval_every, args.lr,
              name="chain policy", log_every=10**9, constant=True, state=state)
        step = (chunk + 1) * args.eval_every
        curve.append({"step": step} | measure(policy))
        print(f"[chain policy] step {step}: {curve[-1]} ({time.time() - t0:.0f}s)", flush=True)
        if curve[-1]["mul_hard"] <= args.hard_max and (kept is None or curve[-1]["writes_whole_chain"] >= kept[2]):
            kept = (step, copy.deepcopy(policy.state_dict()), curve[-1]["writes_whole_chain"])
        if curve[-1]["mul_hard"] > args.hard_max and kept is not None:
            break
    if kept is None:
        raise SystemExit(f"no checkpoint with products <= {args.hard_max}: {curve}")
    policy.load_state_dict(kept[1])
    out = Path(args.out)
    policy.save_pretrained(out / "policy")
    tok.save_pretrained(out / "policy")
    levels = {}
    for level in CHAIN_LEVELS:
        probs = sample_problems(200, [level], "heldout", args.seed + 4000 + level, "chain")
        levels[level] = {t: v["accuracy"] for t, v in policy_step_accuracy(policy, tok, probs, TEMPLATE).items()}
        levels[level] |= {k: v for k, v in chain_alone(policy, tok, probs, TEMPLATE).items() if k != "example"}
        print(f"[chain policy] kept step {kept[0]}, {level} operations: {levels[level]}", flush=True)
    report = {"args": vars(args), "init": args.init, "curve": curve, "kept_step": kept[0],
              "kept_by_level": levels, "seconds": time.time() - t0}
    (out / "make_tiny.json").write_text(json.dumps(report, indent=2))
    print(f"saved to {out}", flush=True)
    return report


if __name__ == "__main__":
    main()
