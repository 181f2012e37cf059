"""What each trained policy of a chain table run writes alone, greedy, consult tag banned (the
evaluation's setting): how many steps it writes against the chain's length, whether its own
product step is right (its result against its own operands), and the exact-answer accuracy.
The mechanism beside the end score: on 6-operation chains a policy can fail by miscounting the
steps as well as by getting the product wrong.

    python -m experiments.chain_behaviour --out runs/chain2_L6
    python -m experiments.chain_behaviour --out runs/mul_replay --policy eapo_ray/assets/tiny_mul/policy

Each run on its own held-out problems (the launcher's evaluation, so `accuracy` is the table's
greedy accuracy); the untrained policy (row `base`) on every seed's problems.
Reads <out>/runs/<row>-s<seed>/final and config.json; writes <out>/chain_behaviour.json
(resumable) and prints a table, mean over seeds.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path


def behaviour(model_dir: str, problems, threads: int = 2) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eapo_ray.tools.make_tiny import TEMPLATE
    from eapo_ray.tools.make_tiny_chain import STEP, alone_replies, answered

    torch.set_num_threads(threads)
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    replies = alone_replies(model, tok, problems, TEMPLATE, 160)
    n = len(problems)
    exact = more = fewer = prod_written = prod_right = correct = 0
    for r, p in zip(replies, problems):
        steps = STEP.findall(r)
        exact += len(steps) == p.level
        more += len(steps) > p.level
        fewer += len(steps) < p.level
        prods = [s for s in steps if s[1] == "*" and len(s[0]) >= 2]
        prod_written += bool(prods)
        prod_right += bool(prods) and int(prods[0][0]) * int(prods[0][2]) == int(prods[0][3])
        correct += answered(r, p.answer)
    return {"problems": n, "accuracy": correct / n, "steps_exact": exact / n, "steps_more": more / n,
            "steps_fewer": fewer / n, "product_written": prod_written / n,
            "product_right_when_written": prod_right / max(1, prod_written)}


def main(argv=None) -> int:
    from eapo_ray.config import load_config
    from eapo_ray.data import heldout_examples

    ap = argparse.ArgumentParser(prog="python -m experiments.chain_behaviour", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="a paper_table output directory (its runs/ are read)")
    ap.add_argument("--rows", nargs="*", default=None, help="only these rows (default: every run)")
    ap.add_argument("--policy", default="eapo_ray/assets/tiny_chain/policy", help="the untrained policy (row base)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out)
    path = out / "chain_behaviour.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    runs = [d for d in sorted((out / "runs").glob("*-s*")) if (d / "final" / "config.json").exists()
            and (args.rows is None or re.sub(r"-s\d+$", "", d.name) in args.rows)]
    # each run on its own held-out problems (the launcher's evaluation: accuracy = the table's); the
    # untrained policy on every seed's problems
    seed_of = lambda d: d.name.rsplit("-s", 1)[1]  # noqa: E731
    # a run without a launcher config (distill) takes its seed's problems from a run that has one
    configs = {seed_of(d): d / "config.json" for d in runs if (d / "config.json").exists()}
    models = {d.name: (str(d / "final"), configs[seed_of(d)]) for d in runs}
    for d in runs:
        models.setdefault("base-s" + seed_of(d), (args.policy, configs[seed_of(d)]))
    for name, (model_dir, config) in sorted(models.items()):
        if name not in results:
            problems = heldout_examples(load_config(config))
            results[name] = behaviour(model_dir, problems, args.threads)
            path.write_text(json.dumps(results, indent=2))
            print(name, json.dumps({k: round(v, 3) for k, v in results[name].items()}), flush=True)
    by_row = defaultdict(list)
    for name, r in results.items():
        by_row[re.sub(r"-s\d+$", "", name)].append(r)
    keys = ["accuracy", "steps_exact", "steps_more", "steps_fewer", "product_written", "product_right_when_written"]
    print("| row | seeds | " + " | ".join(keys) + " |\n|---|---|" + "---|" * len(keys))
    for row, rs in by_row.items():
        print(f"| {row} | {len(rs)} | " + " | ".join(f"{sum(r[k] for r in rs) / len(rs):.3f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
