"""Distillation from the expert (the paper's "distillation" row), cleanrl-style, one file.

    python -m experiments.distill --config configs/paper/distill.yaml --out DIR
        [--steps 160] [--batch-size 32] [--lr 5e-4] [--max-seconds 0] [key=value ...]

1. Expert data: for N training problems of the task (tiny:arith or tiny:arith-mul), every step's result comes
   from the expert. Step k's query is "<left><op><b>" where <left> is the expert's own
   answer to step k-1, so an expert error propagates down the chain, exactly as it would
   if the policy copied the expert. The response is the task's solution format built
   from the expert's answers: "a*b=c;c+d=e;<answer>\\boxed{e}</answer>". This distils
   the expert, not the gold solution; the share of chains that end at the right answer
   is reported (`data_correct_frac`).
2. SFT of the bundled policy on those responses: a plain HF causal LM, torch AdamW,
   warmup + cosine, loss on response tokens only (the prompt is masked), full
   fine-tuning (no LoRA: the policy has 1.1M parameters).
3. Saves an HF directory (`final/`) and evaluates it alone (greedy, expert off) on the
   held-out split, as the launcher does; writes `summary.json`.

Only the built-in task families (`tiny:arith`, `tiny:arith-mul`) have step-by-step problems to ask the expert about.
The RunConfig (--config) gives the models, the data split, the expert's decoding and the
prompt template; SFT settings live in `DistillConfig` (CLI flags), not in the RunConfig.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from eapo_ray import task
from eapo_ray.config import ConfigError, RunConfig, load_config
from eapo_ray.data import render_prompt

Ask = Callable[[list[str]], list[str]]  # queries -> the expert's bare answers


@dataclass
class DistillConfig:
    num_problems: int = 0  # training problems to build expert solutions for; 0: data.num_train
    steps: int = 160  # SFT optimizer steps
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_seconds: float = 0.0  # stop SFT after this many seconds (0: run all steps)
    threads: int = 2  # torch threads


# ---------------------------------------------------------------- expert data (pure)

def expert_solutions(problems: list[task.Problem], ask: Ask, chunk: int = 512) -> list[tuple[str, str]]:
    """(response, final value) per problem, every step's result the expert's answer.
    Problems are answered step position by step position, each round in chunks."""
    left = [str(p.steps[0][0]) for p in problems]
    text = ["" for _ in problems]
    for k in range(max(len(p.steps) for p in problems)):
        idx = [i for i, p in enumerate(problems) if len(p.steps) > k]
        queries = [f"{left[i]}{problems[i].steps[k][1]}{problems[i].steps[k][2]}" for i in idx]
        answers = [a for s in range(0, len(queries), chunk) for a in ask(queries[s:s + chunk])]
        for i, q, a in zip(idx, queries, answers):
            text[i] += f"{q}={a};"
            left[i] = a  # the next step starts from the expert's answer, right or wrong
    return [(t + f"<answer>\\boxed{{{v}}}</answer>", v) for t, v in zip(text, left)]


def expert_ask(cfg: RunConfig) -> Ask:
    """The expert in-process (no Serve), replying with the bare answer."""
    from eapo_ray.expert import Expert

    expert = Expert(cfg.model.expert, dataclasses.replace(cfg.expert, reply_template="{answer}"))
    return expert.answer_now


def expert_accuracy(cfg: RunConfig, n_problems: int = 1000, seed: int = 12345) -> dict:
    """The expert's single-operation accuracy (with the config's decoding) on the steps of
    training problems, overall and by operation; `consult_like` is the steps the bundled
    policy was taught to delegate (a*b with a >= 10)."""
    import torch

    probs = task.sample_problems(n_problems, cfg.data.train_levels, "train", seed, task.FAMILIES.get(cfg.data.train, "arith"))
    steps = [s for p in probs for s in p.steps]
    ask = expert_ask(cfg)
    torch.manual_seed(seed)  # reproducible when the expert samples (temperature > 0)
    answers = ask([f"{a}{op}{b}" for a, op, b, _ in steps])
    ok = [ans == str(c) for ans, (_, _, _, c) in zip(answers, steps)]

    def acc(pred):
        sel = [o for o, s in zip(ok, steps) if pred(s)]
        return sum(sel) / len(sel) if sel else float("nan")

    return {"temperature": cfg.expert.temperature, "queries": len(steps), "all_steps": acc(lambda s: True),
            "add": acc(lambda s: s[1] == "+"), "sub": acc(lambda s: s[1] == "-"), "mul": acc(lambda s: s[1] == "*"),
            "consult_like": acc(lambda s: s[1] == "*" and s[0] >= 10)}


# ---------------------------------------------------------------- SFT

def encode(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids (the prompt as rollouts see it, with BOS) and labels (-100 on the prompt)."""
    p = tok(prompt)["input_ids"]
    r = tok.encode(response, add_special_tokens=False)
    return p + r, [-100] * len(p) + r


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    n = max(len(i) for i, _ in examples)
    ids = torch.full((len(examples), n), pad_id)
    labels = torch.full((len(examples), n), -100)
    attn = torch.zeros((len(examples), n), dtype=torch.long)
    for row, (i, lab) in enumerate(examples):  # right padding
        ids[row, :len(i)], labels[row, :len(lab)], attn[row, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids, labels, attn


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0 at `steps`."""
    return min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def sft(model, tok, examples: list[tuple[list[int], list[int]]], dc: DistillConfig, seed: int, log=print) -> dict:
    import torch

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=dc.lr, weight_decay=dc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, dc.steps, dc.warmup))
    order, pos, seen, t0, losses = [], 0, 0, time.time(), []
    model.train()
    step = 0
    for step in range(dc.steps):
        if dc.max_seconds and time.time() - t0 > dc.max_seconds:
            log(f"[distill] time limit {dc.max_seconds:.0f}s reached at step {step}")
            break
        batch = []
        while len(batch) < dc.batch_size:  # epochs over a shuffled order
            if pos == len(order):
                order, pos = rng.sample(range(len(examples)), len(examples)), 0
            batch.append(examples[order[pos]])
            pos += 1
        ids, labels, attn = collate(batch, tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), dc.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        seen += len(batch)
        losses.append(loss.item())
        if step % 20 == 0 or step == dc.steps - 1:
            log(f"[distill] step {step + 1}/{dc.steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    else:
        step = dc.steps
    model.eval()
    return {"sft_steps": step, "samples": seen, "sft_seconds": time.time() - t0,
            "loss_start": losses[0] if losses else None, "loss_end": losses[-1] if losses else None}


# ---------------------------------------------------------------- the row

def distill(cfg: RunConfig, dc: DistillConfig, out_dir: str | Path, log=print) -> dict:
    """Build expert data, SFT the policy, save `final/`, evaluate alone, write summary.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eapo_ray.data import heldout_examples
    from eapo_ray.evaluate import evaluate_alone
    from eapo_ray.rollout.hf_engine import HFEngine

    if cfg.data.train not in task.FAMILIES:
        raise ConfigError("distill: only the built-in task families (data.train: tiny:arith or tiny:arith-mul) "
                          "have steps to ask the expert about")
    t_start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(dc.threads)
    torch.manual_seed(cfg.seed)
    d = cfg.data
    problems = task.sample_problems(dc.num_problems or d.num_train, d.train_levels, "train", cfg.seed,
                                    task.FAMILIES[d.train])  # = RL's split
    solutions = expert_solutions(problems, expert_ask(cfg))
    correct = sum(v == p.answer for (_, v), p in zip(solutions, problems)) / len(problems)
    log(f"[distill] {len(problems)} expert solutions ({time.time() - t_start:.0f}s); "
        f"{correct:.3f} end at the right answer; e.g. {problems[0].problem} -> {solutions[0][0]}")
    with (out_dir / "expert_data.jsonl").open("w") as f:
        for p, (resp, v) in zip(problems, solutions):
            f.write(json.dumps({"problem": p.problem, "response": resp, "answer": p.answer,
                                "correct": v == p.answer}) + "\n")

    tok = AutoTokenizer.from_pretrained(cfg.model.policy)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.policy, dtype=torch.float32)
    examples = [encode(tok, render_prompt(d.template, p.problem), resp) for p, (resp, _) in zip(problems, solutions)]
    stats = sft(model, tok, examples, dc, cfg.seed, log)
    final = out_dir / "final"
    model.save_pretrained(final)
    tok.save_pretrained(final)

    heldout = heldout_examples(cfg)
    engine = HFEngine(str(final), tokenizer=tok)
    ev = evaluate_alone(engine, tok, heldout, cfg, cfg.eval.temperature)
    summary = {"heldout_accuracy_end": ev["accuracy"], "heldout_end": ev, **stats, "seed": cfg.seed,
               "problems": len(problems), "data_correct_frac": correct,
               "expert_queries": sum(len(p.steps) for p in problems), "expert_temperature": cfg.expert.temperature,
               "distill": dataclasses.asdict(dc), "checkpoint": str(final), "wall_seconds": time.time() - t_start}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"[distill] done in {summary['wall_seconds']:.0f}s: held-out accuracy (alone, "
        f"{'greedy' if cfg.eval.temperature <= 0 else f'T={cfg.eval.temperature}'}) {ev['accuracy']:.3f}")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.distill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/paper/distill.yaml")
    ap.add_argument("--out", required=True, help="output directory (final/, summary.json, expert_data.jsonl)")
    for f in dataclasses.fields(DistillConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    ap.add_argument("overrides", nargs="*", help="RunConfig key=value overrides (e.g. seed=1)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        distill(cfg, DistillConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)}),
                args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
