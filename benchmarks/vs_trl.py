"""eapo_ray vs TRL's GRPOTrainer on the same job (expert off), side by side in one run.

    python benchmarks/vs_trl.py [--steps 20] [--seed 0] [--heldout 200]
    (needs `pip install trl==1.16.0`; it installs beside this project's transformers)

Both train the bundled tiny policy on the bundled task (2-4 operations) with the same
settings, for the same number of optimizer steps (= the same number of samples):
16 prompts x 8 samples per step, temperature 1.0, up to 160 new tokens, one turn (no
expert: eapo_ray runs acceptance constant 0, one policy turn), lr 5e-5 constant, AdamW,
grad clip 1.0, no KL, the DAPO token-mean loss with clip 0.2 / 0.28, group advantages
(reward - mean) / std, no dynamic sampling and no overlong filter (TRL has neither by
default), the same reward function (eapo_ray.algo.reward.score: 1 correct, 0.1 well
formed, 0 malformed) and generation stopped at `</answer>` / `</consult>` / EOS on both.

What differs is the system: eapo_ray runs its launcher (a local Ray cluster, a rollout
actor generating the next batch while a DeepSpeed learner trains: rollout.overlap) and
TRL runs generate-then-train in one process with 2 torch threads. Printed: training
samples/s (eapo_ray: its training loop, start-up and evaluations excluded; TRL:
trainer.train() wall time), and held-out accuracy after training, both measured here by
the same evaluator (eapo_ray.evaluate.evaluate_alone, greedy) on the same problems.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, GROUP, MAX_NEW, LR = 16, 8, 160, 5e-5
sys.path.insert(0, str(ROOT / "benchmarks"))
from before_after import BEFORE  # noqa: E402 -- eapo_ray as it was before issue 13's optimisations


def run_eapo(steps: int, seed: int, root: str, name: str = "eapo", extra: tuple = ()) -> dict:
    cmd = [sys.executable, "-m", "eapo_ray.launch", f"steps={steps}", f"seed={seed}", "eval.every=0",
           "data.num_heldout=16", f"rollout.prompts_per_batch={PROMPTS}", f"rollout.group_size={GROUP}",
           f"rollout.max_response_tokens={MAX_NEW}", "rollout.train_turns=1", "rollout.eval_turns=1",
           "acceptance.kind=constant", "acceptance.start=0", "algo.dynamic_sampling=false",
           "algo.overlong_filter=false", f"learner.lr={LR}", f"run_root={root}", f"run_name={name}", *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    print("eapo_ray: " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = json.loads((Path(root) / name / "summary.json").read_text())
    # trained samples (= TRL's count); generated equals it here unless a batch finished after the last step
    return {"samples": s["samples"], "seconds": s["loop_seconds"], "model": s["checkpoint"]}


def run_trl(steps: int, seed: int, out: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from eapo_ray.algo.reward import score
    from eapo_ray.config import TINY_DIR, load_config
    from eapo_ray.data import render_prompt, train_examples

    torch.set_num_threads(2)
    cfg = load_config(None, [f"seed={seed}"])
    path = str(TINY_DIR / "policy")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    p = cfg.protocol
    # stop where eapo_ray's engine stops (the closing tags are single tokens of the tiny tokenizer)
    model.generation_config.eos_token_id = [tok.eos_token_id, *tok.convert_tokens_to_ids([p.answer_close,
                                                                                          p.consult_close])]
    ex = train_examples(cfg)
    data = Dataset.from_list([{"prompt": render_prompt(cfg.data.template, e.problem), "answer": e.answer} for e in ex])

    def reward(completions, answer, **_):
        return [score(c, a, cfg.reward, p).reward for c, a in zip(completions, answer)]

    args = GRPOConfig(
        output_dir=out, use_cpu=True, seed=seed, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, beta=0.0,
        loss_type="dapo", epsilon=0.2, epsilon_high=0.28, scale_rewards="group", num_iterations=1,
        num_generations=GROUP, per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
        max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0, mask_truncated_completions=False,
        report_to="none", save_strategy="no", logging_steps=max(1, steps // 4), disable_dropout=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    final = Path(out) / "final"
    trainer.save_model(str(final))
    tok.save_pretrained(str(final))
    return {"samples": steps * PROMPTS * GROUP, "seconds": seconds, "model": str(final)}


def heldout_accuracy(model_dir: str, n: int, seed: int) -> float:
    import torch

    from eapo_ray.config import load_config
    from eapo_ray.data import heldout_examples
    from eapo_ray.evaluate import evaluate_alone
    from eapo_ray.rollout.hf_engine import HFEngine

    torch.set_num_threads(2)
    cfg = load_config(None, [f"seed={seed}", f"data.num_heldout={n}", f"rollout.max_response_tokens={MAX_NEW}"])
    engine = HFEngine(model_dir)
    return evaluate_alone(engine, engine.tokenizer, heldout_examples(cfg), cfg, 0.0)["accuracy"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/vs_trl.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--before", action="store_true",
                    help="also run eapo_ray as before issue 13 (" + " ".join(BEFORE) + ")")
    args = ap.parse_args(argv)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}.items():
        os.environ.setdefault(k, v)
    from eapo_ray.config import TINY_DIR

    with tempfile.TemporaryDirectory() as tmp:
        ours = run_eapo(args.steps, args.seed, tmp)
        runs = [("eapo", ours)]
        if args.before:
            runs.append(("eapo_before", run_eapo(args.steps, args.seed, tmp, "eapo_before", BEFORE)))
        print("trl: GRPOTrainer, same settings", flush=True)
        trl = run_trl(args.steps, args.seed, str(Path(tmp) / "trl"))
        runs.append(("trl", trl))
        base = heldout_accuracy(str(TINY_DIR / "policy"), args.heldout, args.seed)
        acc = {name: heldout_accuracy(r["model"], args.heldout, args.seed) for name, r in runs}
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rate = {name: r["samples"] / r["seconds"] for name, r in runs}
    print(f"\n{args.steps} steps x {PROMPTS * GROUP} samples, seed {args.seed}, held-out {args.heldout} (greedy), "
          f"base policy {base:.3f}")
    print(f"{'system':10s} {'samples':>8s} {'seconds':>8s} {'samples/s':>10s} {'held-out acc':>13s}")
    labels = {"eapo": "eapo_ray", "eapo_before": "eapo_ray (before issue 13)", "trl": "TRL"}
    for k, r in runs:
        print(f"{labels[k]:10s} {r['samples']:8d} {r['seconds']:8.1f} {rate[k]:10.1f} {acc[k]:13.3f}")
    print(f"eapo_ray / TRL samples/s: {rate['eapo'] / rate['trl']:.2f}x")
    if args.before:
        print(f"eapo_ray before issue 13 / TRL samples/s: {rate['eapo_before'] / rate['trl']:.2f}x; "
              f"after / before: {rate['eapo'] / rate['eapo_before']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
