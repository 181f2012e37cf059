"""Build the bundled tiny models: a char-level tokenizer, a tiny Llama policy and a larger
tiny Llama expert, trained on the bundled arithmetic task, saved as HF directories.

    python -m eapo_ray.tools.make_tiny [--out eapo_ray/assets/tiny] [--seed 0]

The policy is warm-started (SFT, loss on the response, not the prompt) on reference solutions in
the EAPO action language: some steps are delegated to the expert with
``<consult>a*b</consult>``; the reply is an observation, ``<expert>a*b=c</expert>``
(configs set ``expert.reply_template: "{query}={answer}"``) after which the policy
goes on to the next step, or ``<expert>unavailable</expert>`` after which it works the
step out itself. A share of the samples (--direct-frac) answers at once without working,
so greedy decoding mostly shortcuts and rarely solves 3-4 operations: a habit the
reward punishes and RL has to unlearn.
The expert is trained on single operations (the policy's sub-questions).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from eapo_ray.algo.protocol import ProtocolConfig
from eapo_ray.task import Problem, final_answer, make_problem, random_operation, sample_problems

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TAGS = ["<consult>", "</consult>", "<answer>", "</answer>", "<expert>", "</expert>"]
TEMPLATE = "Q:{problem}\nA:"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Every printable ASCII character and newline is one token; the protocol tags are one token each."""
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(SPECIALS + TAGS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.add_tokens(TAGS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def policy_example(p: Problem, rng: random.Random, proto: ProtocolConfig, consult_frac: float, accept: float,
                   direct_frac: float = 0.0):
    """(segments): a list of (text, trained) pairs for one warm-start sample. With
    probability `direct_frac` the sample answers at once, without working."""
    segs = [(TEMPLATE.format(problem=p.problem), False)]
    if rng.random() < direct_frac:
        return segs + [(final_answer(p), True)]
    consulting = rng.random() < consult_frac
    for a, op, b, c in p.steps:
        hard = op == "*" and a >= 10
        if consulting and rng.random() < (0.8 if hard else 0.2):
            segs.append((f"{proto.consult_open}{a}{op}{b}{proto.consult_close}", True))
            # The reply is text the policy reads; it is in the warm-start LM loss (so the auxiliary
            # SFT term on expert tokens starts from a known format), never in the RL loss.
            if rng.random() < accept:  # the reply states the step; the policy goes on from it
                segs.append((f"{proto.expert_open}{a}{op}{b}={c}{proto.expert_close}", True))
                continue
            segs.append((f"{proto.expert_open}{proto.unavailable}{proto.expert_close}", True))
        segs.append((f"{a}{op}{b}={c};", True))
    segs.append((final_answer(p), True))
    return segs


def expert_example(rng: random.Random):
    """One single-operation question as the policy asks it, and its answer."""
    a, op, b, c = random_operation(rng)
    return [(TEMPLATE.format(problem=f"{a}{op}{b}"), False), (f"{c}</s>", True)]


def encode(tok, segs):
    ids, labels = [tok.bos_token_id], [-100]
    for text, trained in segs:
        t = tok.encode(text, add_special_tokens=False)
        ids += t
        labels += t if trained else [-100] * len(t)
    return ids, labels


def batchify(tok, examples):
    enc = [encode(tok, s) for s in examples]
    n = max(len(i) for i, _ in enc)
    ids = torch.full((len(enc), n), tok.pad_token_id)
    labels = torch.full((len(enc), n), -100)
    attn = torch.zeros((len(enc), n), dtype=torch.long)
    for r, (i, lab) in enumerate(enc):  # right padding for training
        ids[r, : len(i)], labels[r, : len(lab)], attn[r, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids, labels, attn


def train(model, make_batch, steps, lr, log_every=100, name="model", constant=False, state=None, total=0):
    """AdamW with warmup + cosine over `steps`; `constant`: warmup (50 steps) then a constant lr
    (cosine down to 5% over `total` steps if given), resumable in chunks through `state` (a dict
    holding the optimizer and step count)."""
    state = {} if state is None else state
    if "opt" not in state:
        state["opt"], state["step"] = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01), 0
    opt = state["opt"]
    warm = max(1, steps // 20)
    if constant:
        first = state["step"]
        decay = (lambda g: max(0.05, 0.5 * (1 + math.cos(math.pi * min(g, total) / total)))) if total else (lambda g: 1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (first + s + 1) / 50) * decay(first + s))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    t0 = time.time()
    for step in range(steps):
        ids, labels, attn = make_batch()
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        state["step"] += 1
        if step % log_every == 0 or step == steps - 1:
            print(f"[{name}] step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()


@torch.no_grad()
def greedy(model, tok, prompts, max_new_tokens, stop_ids):
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                         pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=False)


def llama(tok, hidden, layers, heads):
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "tiny"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy-steps", type=int, default=800)
    ap.add_argument("--expert-steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--direct-frac", type=float, default=0.55,
                    help="share of warm-start samples that answer at once, without working (a habit RL must unlearn)")
    ap.add_argument("--reuse-expert", action="store_true", help="keep the expert already in --out; train the policy only")
    ap.add_argument("--task", choices=["arith", "mul"], default="arith",
                    help="mul: models for tiny:arith-mul (eapo_ray/tools/make_tiny_mul.py), default --out assets/tiny_mul")
    mul = ap.add_argument_group("--task mul")
    mul.add_argument("--eval-every", type=int, default=100, help="policy / weak expert evaluated every N steps")
    mul.add_argument("--hard-consult", type=float, default=0.6, help="P(consult) for a multi-digit product")
    mul.add_argument("--easy-consult", type=float, default=0.03, help="P(consult) for any other step")
    mul.add_argument("--accept", type=float, default=0.8, help="P(answered) for a warm-start consult")
    mul.add_argument("--parallel", type=float, default=0.3, help="P(two parallel queries) for a consult")
    mul.add_argument("--hard-max", type=float, default=0.30, help="keep a policy checkpoint with products <= this")
    mul.add_argument("--easy-min", type=float, default=0.95, help="... and +/-, single-digit products >= this")
    mul.add_argument("--weak-target", type=float, default=0.60, help="weak expert: stop at this product accuracy")
    mul.add_argument("--expert-hidden", type=int, default=128)
    mul.add_argument("--expert-init", default="", help="continue training the experts saved in this directory")
    mul.add_argument("--passk-problems", type=int, default=200, help="held-out problems for pass@1 / pass@8")
    mul.add_argument("--expert-from", default="", help="fine-tune this expert (digits in order) on the task's steps")
    mul.add_argument("--stage", choices=["all", "experts", "policy", "report"], default="all",
                     help="build in parts (e.g. experts and policy in two processes, then report)")
    args = ap.parse_args(argv)
    if args.task == "mul":
        from eapo_ray.tools.make_tiny_mul import build

        if args.out == ap.get_default("out"):
            args.out = str(Path(__file__).resolve().parents[1] / "assets" / "tiny_mul")
        torch.set_num_threads(args.threads)
        return build(args, build_char_tokenizer(), ProtocolConfig(query_sep="|"), train, llama, batchify, TEMPLATE)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    proto = ProtocolConfig(query_sep="|")
    tok = build_char_tokenizer()
    out = Path(args.out)
    report = {"args": vars(args)}

    if args.reuse_expert:
        expert = LlamaForCausalLM.from_pretrained(out / "expert").eval()
    else:
        expert = llama(tok, hidden=192, layers=4, heads=6)
        train(expert, lambda: batchify(tok, [expert_example(rng) for _ in range(128)]), args.expert_steps, 2e-3,
              name="expert")
    eval_rng = random.Random(args.seed + 1)
    qs = [expert_example(eval_rng) for _ in range(500)]
    replies = greedy(expert, tok, [q[0][0] for q in qs], 6, [tok.eos_token_id])
    report["expert_single_op_accuracy"] = sum(r.split("</s>")[0] == q[1][0][:-4] for r, q in zip(replies, qs)) / len(qs)
    print(f"expert accuracy on single operations: {report['expert_single_op_accuracy']:.3f}", flush=True)

    torch.manual_seed(args.seed + 1)  # the policy's draws do not depend on the expert's
    rng = random.Random(args.seed + 1)
    policy = llama(tok, hidden=128, layers=4, heads=4)
    levels = [1, 2, 3, 4]
    train(policy, lambda: batchify(tok, [policy_example(make_problem(rng, rng.choice(levels)), rng, proto, 0.5, 0.7,
                                                        args.direct_frac)
                                         for _ in range(48)]), args.policy_steps, 1.5e-3, name="policy")
    for name, model in (("policy", policy), ("expert", expert)):
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
    stop = [tok.convert_tokens_to_ids(t) for t in ("</answer>", "</consult>")] + [tok.eos_token_id]
    from eapo_ray.algo.reward import score
    report["policy_greedy_accuracy_by_level"] = {}
    for level in levels:
        probs = sample_problems(40 if level == 1 else 200, [level], "heldout", seed=args.seed + 10 + level)
        resp = greedy(policy, tok, [TEMPLATE.format(problem=p.problem) for p in probs], 80, stop)
        acc = sum(score(r, p.answer).correct for r, p in zip(resp, probs)) / len(probs)
        report["policy_greedy_accuracy_by_level"][level] = acc
        print(f"policy greedy held-out accuracy, {level} op(s): {acc:.3f}   e.g. {resp[0]!r}", flush=True)

    (out / "make_tiny.json").write_text(json.dumps(report, indent=2))
    print(f"saved to {out}", flush=True)


if __name__ == "__main__":
    main()
