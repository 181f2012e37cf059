"""Write DAPO-Math-17k as the {problem, answer} JSONL that the GPU configs read.

    python cluster/prepare_data.py --out /data/dapo_math_17k.jsonl            # from the HF hub
    python cluster/prepare_data.py --src dapo-math-17k.parquet --out FILE     # from a local copy

BytedTsinghua-SIA/DAPO-Math-17k rows look like (verl's RL format)
  {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Solve the following
   math problem step by step. The last line of your response should be of the form Answer:
   $Answer ... \n\n<problem>\n\nRemember to put your answer on its own line after \"Answer:\"."}],
   "ability": "MATH", "reward_model": {"ground_truth": "34", "style": "rule-math"},
   "extra_info": {"index": "..."}}
and the ~17.4k problems appear ~100 times each (1.79M rows). eapo_ray/data.py reads flat
string columns only, so this script takes the user message, strips DAPO's answer-format
instruction (our protocol asks for <answer>\\boxed{}</answer> instead), takes
reward_model.ground_truth as the answer, and drops repeated problems.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DAPO_HEAD = re.compile(r"^\s*Solve the following math problem step by step\..*?\n\s*\n", re.S)
DAPO_TAIL = re.compile(r"\n\s*\n\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$")


def convert_row(row: dict) -> tuple[dict | None, bool]:
    """(the {problem, answer} row or None if unusable, whether DAPO's wrapper was found)."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):  # chat messages: the (last) user turn
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else ""
    answer = (row.get("reward_model") or {}).get("ground_truth") if isinstance(row.get("reward_model"), dict) else None
    answer = answer if answer is not None else row.get("solution", row.get("answer"))
    if not isinstance(prompt, str) or answer is None:
        return None, False
    head, tail = DAPO_HEAD.search(prompt), DAPO_TAIL.search(prompt)
    problem = prompt[head.end() if head else 0: tail.start() if tail else len(prompt)].strip()
    if not problem or not str(answer).strip():
        return None, False
    return {"problem": problem, "answer": str(answer).strip()}, bool(head and tail)


def read_rows(src: str):
    if src.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from pq.read_table(src).to_pylist()
    elif src.endswith(".jsonl"):
        with open(src, encoding="utf-8") as f:
            yield from (json.loads(line) for line in f if line.strip())
    else:
        try:
            import datasets
        except ImportError:
            sys.exit("error: reading from the hub needs the 'datasets' package (pip install 'eapo_ray[hf]')")
        yield from datasets.load_dataset(src, split="train")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="BytedTsinghua-SIA/DAPO-Math-17k", help="HF dataset name, or a .parquet/.jsonl file")
    ap.add_argument("--out", required=True, help="output JSONL (problem, answer, source)")
    args = ap.parse_args(argv)
    seen, n_in, unwrapped, bad = set(), 0, 0, 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as out:
        for row in read_rows(args.src):
            n_in += 1
            conv, wrapped = convert_row(row)
            if conv is None:
                bad += 1
                continue
            if conv["problem"] in seen:
                continue
            seen.add(conv["problem"])
            unwrapped += not wrapped
            out.write(json.dumps({**conv, "source": args.src}, ensure_ascii=False) + "\n")
    print(f"{n_in} rows read, {len(seen)} distinct problems written to {args.out}; "
          f"{bad} unusable rows skipped; {unwrapped} written without DAPO's instruction wrapper found "
          f"(kept whole: check them if this is not 0)")
    return 0 if seen else 1


if __name__ == "__main__":
    sys.exit(main())
