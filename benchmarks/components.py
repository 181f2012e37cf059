"""Issue 13's compute optimisations, each timed on/off alternately in one process (1 thread).

    python benchmarks/components.py [--repeats 5] [--prompts 16] [--group 8] [--parts gen learner rollout]

- generation: the transformers engine on one rollout batch of the bundled task (16 prompts x 8
  samples, T=1, one turn, up to 64 new tokens), with `prune_finished` off (every sequence runs
  until the batch's longest ends) and on (finished sequences leave the batch and its KV cache);
- learner: forward + backward of the token log-prob loss on that batch, as one padded batch,
  as length buckets (`algo.batching.split_by_length`, the learner's `learner.length_buckets`) and
  as length buckets with each distinct prompt computed once (`learner.share_prompts`,
  `PolicyLogProbs.shared_forward`), with the gradients compared;
- rollout: whole rollout batches of the default config through the rollout actor's own `produce`
  (EAPO episodes, up to 4 turns, dynamic-sampling redraws), the expert answered by an in-process
  oracle after `--expert-latency` seconds (the Serve expert's round trip, no CPU), in three
  modes alternating per repeat on the same batch serials: `before` (the model's own forward for
  every step, each `generate` call runs to its end: rollout.fast_decode=false
  rollout.join_running=false), `fast` (fast_decode alone: rollout.join_running=false) and
  `fast+join` (the default: plus rollout.join_running, a request that arrives while a batch
  decodes, e.g. an episode's next turn after its expert reply, joins it).
  Prints wall and CPU (process) milliseconds per generated sample and forward calls per batch;
  CPU time is the steadier number on a shared machine;
- expert: CPU per `Expert.answer_full` call (the Serve replica's work) with and without the answers'
  log-prob pass (`answer_logprobs`, on only for the LUFFY-style channel).

Alternating on/off per repeat keeps a shared machine's load drift out of the ratio. Prints
seconds per call, padded vs real tokens, and the ratios.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/components.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--parts", nargs="+", default=["gen", "learner", "rollout", "expert"],
                    choices=["gen", "learner", "rollout", "expert"])
    ap.add_argument("--expert-latency", type=float, default=0.02)
    args = ap.parse_args(argv)
    import torch

    from eapo_ray.algo.batching import collate, collate_prompts, collate_responses, padded_tokens, split_by_length, split_shared
    from eapo_ray.algo.logprobs import token_logprobs
    from eapo_ray.config import TINY_DIR, load_config
    from eapo_ray.data import encode_prompt, train_examples
    from eapo_ray.learner.forward import PolicyLogProbs
    from eapo_ray.rollout.hf_engine import HFEngine

    torch.set_num_threads(1)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    cfg = load_config(None, [])
    engine = HFEngine(str(TINY_DIR / "policy"))
    tok = engine.tokenizer
    ex = train_examples(cfg)[:args.prompts]
    prompts = [encode_prompt(tok, cfg.data, e.problem) for e in ex for _ in range(args.group)]
    stop = [cfg.protocol.consult_close, cfg.protocol.answer_close]
    n = len(prompts)
    if "rollout" in args.parts:
        rollout_batches(cfg, args)
    if "expert" in args.parts:
        expert_calls(cfg, args)
    if "gen" not in args.parts and "learner" not in args.parts:
        print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return 0
    engine.fast_decode = engine.join_running = False  # the parts below time prune_finished and the learner alone
    gen_t = {False: [], True: []}
    gens = None
    for rep in range(args.repeats):
        for flag in (False, True):
            engine.prune_finished = flag
            torch.manual_seed(rep)
            t0 = time.perf_counter()
            g = engine.generate(prompts, [64] * n, 1.0, stop)
            gen_t[flag].append(time.perf_counter() - t0)
            gens = gens or g
    lens = [len(x.tokens) for x in gens]
    print(f"\ngeneration: {n} samples, new tokens mean {sum(lens) / n:.1f}, max {max(lens)}")
    for flag in (False, True):
        print(f"  prune_finished={flag!s:5}  median {sorted(gen_t[flag])[len(gen_t[flag]) // 2]:.3f} s/batch")
    ratios = sorted(a / b for a, b in zip(gen_t[False], gen_t[True]))
    print(f"  off/on per repeat: {' '.join(f'{r:.2f}' for r in ratios)}  median {ratios[len(ratios) // 2]:.2f}x")

    batch = {"input_ids": [p + g.tokens for p, g in zip(prompts, gens)], "prompt_len": [len(p) for p in prompts],
             "policy_mask": [[1] * len(g.tokens) for g in gens], "expert_mask": [[0] * len(g.tokens) for g in gens],
             "behav_logp": [g.logprobs for g in gens], "advantage": [((i % 3) - 1.0) for i in range(n)],
             "version": [0] * n}
    model = engine.model.train()
    pad = tok.pad_token_id or 0
    buckets = split_by_length(batch)
    real = sum(len(x) for x in batch["input_ids"])
    print(f"\nlearner forward+backward: {n} samples, {real} real tokens; padded: one batch "
          f"{padded_tokens(batch)}, {len(buckets)} length buckets {sum(map(padded_tokens, buckets))}")
    total_mask = sum(sum(m) for m in batch["policy_mask"])

    def fwd_bwd(parts):
        model.zero_grad(set_to_none=True)
        for p in parts:
            b = collate(p, pad)
            logp = token_logprobs(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["input_ids"], 1.0)
            loss = -(logp * b["policy_mask"] * b["advantage"][:, None]).sum() / total_mask
            loss.backward()
        return {k: v.grad.clone() for k, v in model.named_parameters()}

    wrapper = PolicyLogProbs(model, 1.0)
    uniq, shared_parts = split_shared(batch)
    prompt_cols = collate_prompts(uniq, pad)
    resp_cols = [collate_responses(x, pad) for x in shared_parts]
    print(f"  shared prompts (learner.share_prompts): {len(uniq)} prompts, {len(resp_cols)} response micro-batches, "
          f"{PolicyLogProbs.shared_tokens(prompt_cols['prompt_ids'], resp_cols)} tokens forwarded")

    def fwd_bwd_shared():
        model.zero_grad(set_to_none=True)
        logps = wrapper(shared={**prompt_cols, "buckets": resp_cols})
        loss = -sum((lp * c["policy_mask"] * c["advantage"][:, None]).sum() for lp, c in zip(logps, resp_cols))
        (loss / total_mask).backward()
        return {k: v.grad.clone() for k, v in model.named_parameters()}

    modes = {"padded": lambda: fwd_bwd([batch]), "length_buckets": lambda: fwd_bwd(buckets),
             "+share_prompts": fwd_bwd_shared}
    learn_t = {m: [] for m in modes}
    grads = {}
    for rep in range(args.repeats):
        for m, fn in modes.items():
            t0 = time.perf_counter()
            grads[m] = fn()
            learn_t[m].append(time.perf_counter() - t0)
    scale = max(float(grads["padded"][k].abs().max()) for k in grads["padded"])
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    for m in modes:
        diff = max(float((grads[m][k] - grads["padded"][k]).abs().max()) for k in grads[m])
        print(f"  {m:15s} median {med(learn_t[m]):.3f} s/step; gradients vs padded: max |difference| {diff:.2e}")
    for a, b in (("padded", "length_buckets"), ("length_buckets", "+share_prompts")):
        ratios = sorted(x / y for x, y in zip(learn_t[a], learn_t[b]))
        print(f"  {a} / {b} per repeat: {' '.join(f'{r:.2f}' for r in ratios)}  median {med(ratios):.2f}x")
    print(f"  (max |grad| {scale:.2e})")
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


ROLLOUT_MODES = {"before": (False, False), "fast": (True, False), "fast+join": (True, True)}


def expert_calls(cfg, args) -> None:
    """The expert part: process CPU milliseconds per `Expert.answer_full` call on 1 / 4 / 16 queries,
    with and without the answers' teacher-forced log-prob pass (`answer_logprobs`: only a run with
    algo.expert_token_channel luffy needs it), alternating per repeat; the replies compared."""
    import torch

    from eapo_ray.expert import Expert
    from eapo_ray.models import resolve_model

    path = resolve_model(cfg.model.expert)
    experts = {True: Expert(path, cfg.expert), False: Expert(path, cfg.expert, answer_logprobs=False)}
    torch.set_num_threads(1)
    print("\nexpert: CPU ms per answer_full call (median of repeats x 10 calls), with / without answer log-probs")
    for n in (1, 4, 16):
        qs = [f"{3 + i}*{7 + 2 * i}" for i in range(n)]
        same = [(r.text, r.span) for r in experts[True].answer_full(qs)] == [(r.text, r.span) for r in
                                                                              experts[False].answer_full(qs)]
        cpu = {True: [], False: []}
        for _ in range(args.repeats):
            for flag, e in experts.items():
                t = time.process_time()
                for _ in range(10):
                    e.answer_full(qs)
                cpu[flag].append((time.process_time() - t) * 100)
        med = {f: sorted(v)[len(v) // 2] for f, v in cpu.items()}
        print(f"  {n:2d} queries: {med[True]:6.2f} / {med[False]:6.2f} ms  ({med[True] / med[False]:.2f}x)"
              f"  same replies: {same}")


def rollout_batches(cfg, args) -> None:
    """The rollout part (see the module docstring)."""
    import asyncio

    from eapo_ray.rollout.actor import RolloutWorker

    worker = RolloutWorker(cfg, 0, None)

    async def oracle(queries):  # the right answer after a fixed latency, None where it cannot
        await asyncio.sleep(args.expert_latency)
        out = []
        for q in queries:
            try:
                out.append(f"{q}={int(eval(q, {'__builtins__': {}}, {}))}")  # noqa: S307 -- arithmetic queries only
            except Exception:  # noqa: BLE001 -- a malformed query reads "unavailable"
                out.append(None)
        return out

    worker.expert = oracle
    eng, calls = worker.engine, {"forward": 0, "fast": 0}
    fwd, fast_step = eng.model.forward, eng._fast.step if eng._fast is not None else None

    def count_forward(*a, **k):
        calls["forward"] += 1
        return fwd(*a, **k)

    def count_fast(*a, **k):
        calls["fast"] += 1
        return fast_step(*a, **k)

    eng.model.forward = count_forward
    if eng._fast is not None:
        eng._fast.step = count_fast
    for serial in (1000, 1001):  # warm-up: the grading pool, the token texts
        worker.produce(0, None, serial)
    res = {m: [] for m in ROLLOUT_MODES}
    for rep in range(args.repeats):
        for mode, (fast, join) in ROLLOUT_MODES.items():
            eng.fast_decode, eng.join_running = fast, join
            calls.update(forward=0, fast=0)
            c0, t0 = time.process_time(), time.perf_counter()
            stats, _ = worker.produce(rep % 3, None, rep)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            res[mode].append((wall, cpu, stats["samples"], calls["forward"] + calls["fast"], stats["engine_s"]))
    print(f"\nrollout batches (default config, expert latency {args.expert_latency} s, {args.repeats} repeats):")
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    base = {k: med([x[k] / x[2] for x in res["before"]]) for k in (0, 1)}
    for mode, rows in res.items():
        w, c = med([x[0] / x[2] for x in rows]), med([x[1] / x[2] for x in rows])
        print(f"  {mode:10s} wall {w * 1e3:6.2f} ms/sample ({base[0] / w:.2f}x)  CPU {c * 1e3:6.2f} ms/sample "
              f"({base[1] / c:.2f}x)  forward calls/batch {med([x[3] for x in rows])}  samples/batch "
              f"{med([x[2] for x in rows])}  wall s/batch {' '.join(f'{x[0]:.2f}' for x in rows)}")


if __name__ == "__main__":
    raise SystemExit(main())
