"""Evaluation: the policy alone (expert off, consult banned) or the expert-assisted
workflow, with pass@k and avg@k.

    python -m eapo_ray.evaluate --checkpoint DIR --data tiny:arith|FILE|[hf:]NAME
        [--samples K] [--mode independent|workflow] [--expert DIR] [--out DIR]
        [--engine hf|vllm] [--actors N]

Writes one JSONL row per sample (prompt, response, answer, correct, consults) and
metrics.json into --out, and prints a table. With --actors N > 1 the problems are
split over N Ray actors (a local Ray cluster, or the one RAY_ADDRESS names), each with
its own engine; otherwise it runs in this process. The launcher's evaluator actor uses
`evaluate_alone` from here.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import ray
import torch

from eapo_ray.config import ConfigError, RunConfig, load_config
from eapo_ray.data import DataError, Example, encode_prompt, heldout_examples, render_prompt
from eapo_ray.rollout.engine import Engine
from eapo_ray.rollout.episode import EpisodeSettings, ExpertFn, run_episodes
from eapo_ray.rollout.factory import hf_options, make_engine
from eapo_ray.weight_sync import load_published


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def run_eval(engine: Engine, tok, examples: list[Example], cfg: RunConfig, *, temperature: float, samples: int = 1,
             expert: ExpertFn | None = None, max_turns: int | None = None, batch: int = 64, progress: bool = False):
    """Episodes for every (problem, sample); `expert` None means the policy alone (consult banned)."""
    jobs = [(i, ex) for i, ex in enumerate(examples) for _ in range(samples)]
    settings = EpisodeSettings.for_eval(cfg, temperature=temperature, with_expert=expert is not None,
                                        max_turns=max_turns)
    trajs, t0 = [], time.time()
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        prompts = [encode_prompt(tok, cfg.data, ex.problem) for _, ex in chunk]
        trajs += run_episodes(engine, tok, prompts, [ex.answer for _, ex in chunk], settings, expert=expert,
                              rng=random.Random(cfg.seed + start), groups=[i for i, _ in chunk],
                              rows=[ex.row() for _, ex in chunk] if cfg.reward.fn else None)
        if progress:
            done = min(start + batch, len(jobs))
            print(f"[evaluate] {done}/{len(jobs)} samples ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    return trajs


def summarize(trajs, examples: list[Example], samples: int) -> dict:
    correct = [[] for _ in examples]
    for t in trajs:
        correct[t.group].append(t.correct)
    out = {"problems": len(examples), "samples_per_problem": samples,
           f"avg@{samples}": sum(map(sum, correct)) / (len(examples) * samples),
           "formatted": sum(t.formatted for t in trajs) / len(trajs),
           "consults_per_sample": sum(t.consults for t in trajs) / len(trajs)}
    for k in sorted({1, samples}):
        out[f"pass@{k}"] = sum(pass_at_k(samples, sum(c), k) for c in correct) / len(examples)
    for level in sorted({ex.level for ex in examples} - {0}):
        idx = [i for i, ex in enumerate(examples) if ex.level == level]
        out[f"pass@1_level_{level}"] = sum(pass_at_k(samples, sum(correct[i]), 1) for i in idx) / len(idx)
    return out


def evaluate_alone(engine: Engine, tok, examples: list[Example], cfg: RunConfig, temperature: float = 0.0) -> dict:
    """Accuracy of the policy solving alone, overall and per level (the launcher's metric)."""
    s = summarize(run_eval(engine, tok, examples, cfg, temperature=temperature), examples, 1)
    out = {"accuracy": s["pass@1"], "formatted": s["formatted"]}
    out.update({k.replace("pass@1_level", "accuracy_level"): v for k, v in s.items() if k.startswith("pass@1_level")})
    return out


class Evaluator:
    """Ray actor shell: its own policy copy, loaded with the newest published weights."""

    def __init__(self, cfg: RunConfig):
        torch.set_num_threads(cfg.rollout.torch_threads)
        self.cfg = cfg
        self.engine = make_engine(cfg.eval.engine, cfg.model.policy, cfg.rollout.vllm, seed=cfg.seed,
                                  **(hf_options(cfg.rollout) if cfg.eval.engine == "hf" else {}))
        self.examples = heldout_examples(cfg)

    def evaluate(self, weights=None) -> dict:
        load_published(self.engine, weights, newer_only=False)
        return evaluate_alone(self.engine, self.engine.tokenizer, self.examples, self.cfg, self.cfg.eval.temperature)


def eval_shard(checkpoint: str, engine_kind: str, examples: list[Example], cfg: RunConfig, temperature: float,
               samples: int, expert_path: str | None, progress: bool = False) -> list:
    """One process's share: its own engine (and in-process expert for the workflow mode)."""
    torch.manual_seed(cfg.seed)
    engine = make_engine(engine_kind, checkpoint, cfg.rollout.vllm, seed=cfg.seed)
    expert = local_expert(expert_path, cfg) if expert_path else None
    trajs = run_eval(engine, engine.tokenizer, examples, cfg, temperature=temperature, samples=samples,
                     expert=expert, max_turns=cfg.rollout.train_turns if expert else None, progress=progress)
    engine.shutdown()
    return trajs


def eval_on_ray(n: int, checkpoint, engine_kind, examples, cfg, temperature, samples, expert_path) -> list:
    """Split the problems over n Ray actors (one engine each); trajectories come back as the
    actors finish, their `group` mapped back to the index in `examples`."""
    from eapo_ray.ray_runtime import init_ray

    init_ray(cfg, n * cfg.rollout.num_cpus)
    shards = [s for s in (list(range(len(examples)))[i::n] for i in range(n)) if s]
    task = ray.remote(eval_shard).options(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus)
    pending = {task.remote(checkpoint, engine_kind, [examples[j] for j in idx], cfg, temperature, samples,
                           expert_path): idx for idx in shards}
    trajs, t0 = [], time.time()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        idx = pending.pop(done[0])
        for t in ray.get(done[0]):
            t.group = idx[t.group]  # shard-local problem index -> global
            trajs.append(t)
        print(f"[evaluate] {len(shards) - len(pending)}/{len(shards)} actors done ({time.time() - t0:.0f}s)",
              file=sys.stderr, flush=True)
    return trajs


def local_expert(path: str, cfg: RunConfig) -> ExpertFn:
    """The expert deployment's class used in-process (no Serve), for the workflow mode."""
    from eapo_ray.expert import Expert

    return Expert(path, cfg.expert).answer_now


TINY_DEFAULT_LIMIT = 200  # problems drawn from the bundled generator when --limit is not given


def load_eval_examples(data: str, cfg, limit: int | None) -> list:
    """The problems to evaluate: every row of a file or dataset unless `limit` (the first N);
    the bundled tiny:arith generator draws `limit` (default TINY_DEFAULT_LIMIT)."""
    n = limit if limit is not None else (TINY_DEFAULT_LIMIT if data.startswith("tiny:") else 0)
    return heldout_examples(cfg, n=n, source=data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eapo_ray.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="an HF causal-LM directory (e.g. a run's final/), or a model name built on first use "
                         "(smollm2-135m: eapo_ray/models.py)")
    ap.add_argument("--data", default="tiny:arith",
                    help="tiny:arith, a .jsonl/.parquet file, or a Hugging Face dataset NAME[:split] (or hf:NAME)")
    ap.add_argument("--samples", type=int, default=1, help="samples per problem (pass@k, avg@k)")
    ap.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) for 1 sample, else 1.0")
    ap.add_argument("--mode", choices=["independent", "workflow"], default="independent")
    ap.add_argument("--expert", default=None,
                    help="expert directory or model name for --mode workflow (default: the config's)")
    ap.add_argument("--limit", type=int, default=None,
                    help="evaluate only the first N problems (default: every row of a file or dataset; "
                         f"tiny:arith draws {TINY_DEFAULT_LIMIT})")
    ap.add_argument("--config", default=None, help="config for template, protocol and reward (default: the embedded default)")
    ap.add_argument("--out", default=None, help="output directory (default: eval-<time>)")
    ap.add_argument("--engine", choices=["hf", "vllm"], default=None, help="default: the config's rollout.engine")
    ap.add_argument("--actors", type=int, default=1, help="N > 1: evaluate on N Ray actors, one engine each")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        data = args.data
        if not data.startswith(("tiny:", "hf:")) and not Path(data).exists() and "/" in data and \
                not data.endswith((".jsonl", ".parquet")):
            data = "hf:" + data  # a Hugging Face dataset name, e.g. HuggingFaceH4/MATH-500:test
        if args.limit is not None and args.limit < 1:
            raise ConfigError("--limit must be >= 1")
        examples = load_eval_examples(data, cfg, args.limit)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.samples < 1:
        print("error: --samples must be >= 1", file=sys.stderr)
        return 2
    print(f"[evaluate] {len(examples)} problems from {args.data}"
          + (" (every row)" if args.limit is None and not data.startswith("tiny:") else
             f" (--limit {args.limit})" if args.limit is not None else ""), file=sys.stderr, flush=True)
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 1.0)
    if args.actors < 1:
        print("error: --actors must be >= 1", file=sys.stderr)
        return 2
    from eapo_ray.models import resolve_model

    args.checkpoint = resolve_model(args.checkpoint)  # a model name (e.g. smollm2-135m) is built on first use
    engine_kind = args.engine or cfg.rollout.engine
    expert_path = resolve_model(args.expert or cfg.model.expert) if args.mode == "workflow" else None
    if args.actors > 1:
        trajs = eval_on_ray(args.actors, args.checkpoint, engine_kind, examples, cfg, temperature, args.samples,
                            expert_path)
    else:
        trajs = eval_shard(args.checkpoint, engine_kind, examples, cfg, temperature, args.samples, expert_path,
                           progress=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    metrics = summarize(trajs, examples, args.samples) | {"mode": args.mode, "temperature": temperature,
                                                          "checkpoint": args.checkpoint, "data": args.data}
    out = Path(args.out or time.strftime("eval-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w") as f:
        for t in trajs:
            ex = examples[t.group]
            prompt = (tok.decode(encode_prompt(tok, cfg.data, ex.problem)) if cfg.data.chat_template
                      else render_prompt(cfg.data.template, ex.problem))  # the text the policy saw
            f.write(json.dumps({"problem": ex.problem, "prompt": prompt,
                                "response": tok.decode(t.response_ids, skip_special_tokens=True), "answer": ex.answer,
                                "correct": t.correct, "consults": t.consults}) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"{'metric':<24} value")
    for k, v in metrics.items():
        print(f"{k:<24} {v:.4f}" if isinstance(v, float) else f"{k:<24} {v}")
    print(f"wrote {out / 'samples.jsonl'} and {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
