"""The memory plan's learner estimate (eapo_ray/algo/memory.py) against what one learner step
really holds, on CPU: peak RSS of a real `Learner` (DeepSpeed ZeRO-0, gloo, world 1, fp32) over
one `train_step` on a synthetic batch whose rows all have the longest length (the plan's worst
case is then the actual case), minus the RSS just before the step.

    python benchmarks/plan_vs_rss.py                      # tiny policy and SmolLM2-135M, several paths
    python benchmarks/plan_vs_rss.py --only tiny

Each case runs in its own process (a fresh peak), with MALLOC_MMAP_THRESHOLD_ fixed so that freed
tensors leave the RSS. The step runs twice: step 1 also allocates Adam's m and v (8 B/param),
step 2 has them already (its base includes them). The estimate compared is the step's share:
gradients (+ Adam at step 1) + activations + the lm_head chunk (weights are in the base). No Ray:
the batch is handed to the learner directly (`fetch_batches` replaced by the list itself)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name, model, rows, prompt tokens, response tokens, group size, overrides
CASES = [
    ("tiny: shared prompts (default path)", "tiny", 32, 32, 480, 8, []),
    ("tiny: buckets, no checkpointing", "tiny", 32, 32, 480, 8, ["learner.share_prompts=false"]),
    ("tiny: buckets, checkpointing", "tiny", 32, 32, 480, 8, ["learner.gradient_checkpointing=true"]),
    ("tiny: 2048-token micro-batches, ckpt", "tiny", 32, 32, 480, 8,
     ["learner.gradient_checkpointing=true", "learner.max_tokens_per_microbatch=2048"]),
    ("smollm2: buckets, no checkpointing", "smollm2-135m", 4, 64, 320, 4, ["learner.share_prompts=false"]),
    ("smollm2: buckets, checkpointing", "smollm2-135m", 4, 64, 320, 4, ["learner.gradient_checkpointing=true"]),
    ("smollm2: shared prompts (default path)", "smollm2-135m", 4, 64, 320, 4, []),
]


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def one(model: str, rows: int, p: int, r: int, group: int, overrides: list[str]) -> dict:
    import torch

    import eapo_ray.learner.actor as actor
    from eapo_ray.algo import memory as mem
    from eapo_ray.config import load_config
    from eapo_ray.models import resolve_model
    from eapo_ray.plan import model_shape

    path = str(ROOT / "eapo_ray/assets/tiny/policy") if model == "tiny" else resolve_model(model)
    cfg = load_config(None, [f"model.policy={path}", f"rollout.prompts_per_batch={rows // group}",
                             f"rollout.group_size={group}", f"rollout.max_response_tokens={r}",
                             "learner.torch_threads=2", *overrides])
    actor.fetch_batches = lambda boxes: [b[0] for b in boxes]  # the batch itself, no object store
    learner = actor.Learner(cfg, 0, 1)
    learner.setup("127.0.0.1", actor.free_port())
    g = torch.Generator().manual_seed(0)
    vocab = learner.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (p,), generator=g).tolist() for _ in range(rows // group)]
    ids = [prompts[i // group] + torch.randint(3, vocab, (r,), generator=g).tolist() for i in range(rows)]
    batch = {"input_ids": ids, "prompt_len": [p] * rows, "policy_mask": [[1] * r] * rows,
             "expert_mask": [[0] * r] * rows, "behav_logp": [[-2.0] * r] * rows,
             "expert_logp": [[0.0] * r] * rows, "accept_prob": [0.0] * rows,
             "advantage": [1.0 if i % 2 else -1.0 for i in range(rows)], "version": [0] * rows}
    shape = model_shape(path, "model.policy")
    lc = cfg.learner
    ls = mem.LearnerShape(world=1, zero_stage=lc.zero_stage, bf16=lc.bf16, gradient_checkpointing=lc.gradient_checkpointing,
                          max_tokens_per_microbatch=lc.max_tokens_per_microbatch, length_buckets=lc.length_buckets,
                          share_prompts=learner.share_prompts, minibatches=1, epochs=1, rows=rows,
                          prompts=rows // group, prompt_tokens=p, response_tokens=r)
    est = mem.learner_memory(shape, ls, overhead=0.0)
    out = {"params": sum(x.numel() for x in learner.model.parameters()), "shape_params": shape.params,
           "path": est.notes[0], "share_prompts": learner.share_prompts, "steps": []}
    for step in (1, 2):
        base = rss("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS) to the current RSS
        learner.train_step([[batch]])
        peak = rss("VmHWM")
        want = est.parts["gradients"] + est.parts["activations"] + est.parts["lm_head chunk"]
        want += est.parts["adam m, v (fp32)"] if step == 1 else 0.0
        out["steps"].append({"step": step, "base_gb": base / 1e9, "peak_gb": peak / 1e9,
                             "measured_gb": (peak - base) / 1e9, "estimate_gb": want / 1e9})
    out["parts_gb"] = {k: v / 1e9 for k, v in est.parts.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--case", type=int, default=-1, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.case >= 0:
        _, model, rows, p, r, group, ov = CASES[args.case]
        print(json.dumps(one(model, rows, p, r, group, ov)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
           "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    print(f"{'case':<40} {'rows x tokens':>13} {'step':>4} {'measured GB':>11} {'estimate GB':>11} {'est/meas':>8}")
    for i, (name, _, rows, p, r, *_rest) in enumerate(CASES):
        if args.only not in name:
            continue
        res = subprocess.run([sys.executable, __file__, "--case", str(i)], env=env, capture_output=True, text=True)
        if res.returncode:
            print(f"{name}: failed\n{res.stderr[-2000:]}")
            continue
        out = json.loads(res.stdout.strip().splitlines()[-1])
        for st in out["steps"]:
            print(f"{name:<40} {f'{rows} x {p + r}':>13} {st['step']:>4} {st['measured_gb']:>11.3f} "
                  f"{st['estimate_gb']:>11.3f} {st['estimate_gb'] / max(st['measured_gb'], 1e-9):>8.2f}")
        print(f"    {out['path']}; params {out['params']:,} (shape {out['shape_params']:,}); "
              f"base RSS {out['steps'][0]['base_gb']:.2f} GB")


if __name__ == "__main__":
    main()
