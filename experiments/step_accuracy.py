"""Per-step accuracy of each trained policy of a table run, teacher-forced: for every held-out
problem, the reference steps so far, then ``a op b=``, greedy until ``;`` (the measure
make_tiny_mul used to build the mul policy: tools/make_tiny_mul.policy_step_accuracy). Shows the
mechanism next to the end score: did a row's policy learn the products the expert knew?

    python -m experiments.step_accuracy --out runs/mul_x [--n 200] [--task tiny:arith-mul]

Reads <out>/runs/<row>-s<seed>/final (the launcher's HF checkpoint) and the untrained policy
(row `base`, from --policy); writes <out>/step_accuracy.json and prints a table (mean over seeds).
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path


def measure(model_dir: str, problems: list, threads: int = 1) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eapo_ray.tools.make_tiny import TEMPLATE
    from eapo_ray.tools.make_tiny_mul import policy_step_accuracy

    torch.set_num_threads(threads)
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    return policy_step_accuracy(model.eval(), tok, problems, TEMPLATE)


def main(argv=None) -> int:
    from eapo_ray import task

    ap = argparse.ArgumentParser(prog="python -m experiments.step_accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="a paper_table output directory (its runs/ are read)")
    ap.add_argument("--task", default="tiny:arith-mul", choices=sorted(task.FAMILIES))
    ap.add_argument("--levels", type=int, nargs="*", default=None, help="default: every level of the family")
    ap.add_argument("--n", type=int, default=200, help="held-out problems (the same for every model)")
    ap.add_argument("--policy", default="eapo_ray/assets/tiny_mul/policy", help="the untrained policy (row base)")
    args = ap.parse_args(argv)
    family = task.FAMILIES[args.task]
    levels = args.levels or list({"mul": task.MUL_LEVELS, "chain": task.CHAIN_LEVELS}.get(family, (2, 3, 4)))
    problems = task.sample_problems(args.n, levels, "heldout", 12345, family)
    out = Path(args.out)
    path = out / "step_accuracy.json"
    results = json.loads(path.read_text()) if path.exists() else {}  # resumable: done models are kept
    models = {"base-s0": args.policy} | {d.name: str(d / "final") for d in sorted((out / "runs").glob("*-s*"))
                                         if (d / "final" / "config.json").exists()}
    for name, model_dir in models.items():
        if name not in results:
            results[name] = measure(model_dir, problems)
            path.write_text(json.dumps(results, indent=2))
            print(name, json.dumps({k: round(v["accuracy"], 3) for k, v in results[name].items()}), flush=True)
    by_row = defaultdict(list)
    for name, r in results.items():
        by_row[re.sub(r"-s\d+$", "", name)].append(r)
    kinds = sorted({k for r in results.values() for k in r})
    print("| row | seeds | " + " | ".join(kinds) + " |\n|---|---|" + "---|" * len(kinds))
    for row, rs in by_row.items():
        cells = [f"{sum(r[k]['accuracy'] for r in rs if k in r) / max(1, sum(k in r for r in rs)):.3f}" for k in kinds]
        print(f"| {row} | {len(rs)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
