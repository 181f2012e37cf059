import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eapo_ray import task
from eapo_ray.algo.reward import score
from eapo_ray.data import DataError, load_rows, load_split, render_prompt

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_task_answers_and_solutions_are_right():
    rng = random.Random(0)
    for level in (1, 2, 3, 4):
        for _ in range(50):
            p = task.make_problem(rng, level)
            assert eval(p.problem) == int(p.answer) and len(p.steps) == level
            assert all(0 <= s[3] <= task.MAX_VALUE for s in p.steps)
            assert score(task.solution(p), p.answer).correct


def test_splits_are_disjoint_and_seeded():
    train = load_split("tiny:arith", "train", [2, 3, 4], 300, seed=0)
    held = load_split("tiny:arith", "heldout", [2, 3, 4], 100, seed=1)
    assert not {e.problem for e in train} & {e.problem for e in held}
    assert train == load_split("tiny:arith", "train", [2, 3, 4], 300, seed=0)
    assert {e.level for e in held} == {2, 3, 4}


def test_jsonl_and_parquet_with_custom_columns(tmp_path):
    rows = [{"q": "1+1", "a": "2"}, {"q": "What is $\\frac{1}{2}$ of 1?", "a": "\\frac{1}{2}"}]
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for path in (j, tmp_path / "d.parquet"):
        got = load_rows(str(path), problem_key="q", answer_key="a")
        assert [(e.problem, e.answer) for e in got] == [("1+1", "2"), (rows[1]["q"], "\\frac{1}{2}")]
    assert render_prompt("Q:{problem}\nA:", "1+1") == "Q:1+1\nA:"


@pytest.mark.parametrize("content,needle", [
    ('{"problem": "1+1", "answer": "2"}\n{not json}\n', "d.jsonl:2"),
    ('{"problem": "1+1"}\n', "missing field"),
    ('{"problem": "", "answer": "2"}\n', "empty"),
    ('[1, 2]\n', "expected an object"),
    ("", "no rows"),
])
def test_malformed_rows_name_file_and_line(tmp_path, content, needle):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match=needle):
        load_rows(str(tmp_path / "d.jsonl"))


def test_missing_file_and_bad_type(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        load_rows(str(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="unknown bundled task"):
        load_split("tiny:chess", "train", [1], 1, 0)


@pytest.mark.skipif(not SHARED.exists(), reason="shared benchmark data not present")
@pytest.mark.parametrize("name,n", [("aime2024.jsonl", 30), ("aime2025.jsonl", 30), ("math500.jsonl", 500),
                                    ("gsm8k_test.jsonl", 1319), ("aimo2_reference.jsonl", 10)])
def test_reads_shared_benchmarks(name, n):
    rows = load_rows(str(SHARED / name))
    assert len(rows) == n and all(r.problem and r.answer for r in rows)
    # their gold answers grade as correct against themselves through the reward
    for r in rows[:20]:
        assert score(f"<answer>\\boxed{{{r.answer}}}</answer>", r.answer).correct, r.answer
