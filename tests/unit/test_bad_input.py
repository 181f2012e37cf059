"""Bad input fails at once with a clear error naming the file and line (nothing started), and
`evaluate` evaluates every row of a file unless told otherwise, saying how many."""
import json

import pytest

from eapo_ray import data as data_mod
from eapo_ray.config import TINY_DIR, ConfigError, load_config
from eapo_ray.data import DataError, load_rows
from eapo_ray.evaluate import main


def _rows(n):
    return "".join(json.dumps({"problem": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(n))


def test_non_utf8_row_names_file_and_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(_rows(2).encode() + '{"problem": "caf\xe9", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:3: not UTF-8 \(byte 0xe9 at column 17\)"):
        load_rows(str(p))


def test_huge_line_is_an_error_not_a_memory_blow_up(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "MAX_LINE_BYTES", 1000)
    p = tmp_path / "huge.jsonl"
    p.write_text(_rows(1) + json.dumps({"problem": "x" * 5000, "answer": "1"}) + "\n")
    with pytest.raises(DataError, match=r"huge\.jsonl:2: line longer than"):
        load_rows(str(p))


def test_empty_file_and_missing_column(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows \(an empty file"):
        load_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "cols.jsonl").write_text(_rows(3) + json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    with pytest.raises(DataError, match=r"cols\.jsonl:4: missing field\(s\) \['problem'\]"):
        load_rows(str(tmp_path / "cols.jsonl"))


@pytest.mark.parametrize("override,key", [("rollout.group_size=1", "rollout.group_size"),
                                          ("rollout.num_actors=0", "rollout.num_actors")])
def test_config_values_that_cannot_train(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_evaluate_takes_every_row_by_default_and_says_how_many(tmp_path, capsys):
    """Before: --limit defaulted to 200 and silently dropped the rest of a file."""
    p = tmp_path / "many.jsonl"
    p.write_text(_rows(203))
    out = tmp_path / "out"
    assert main(["--checkpoint", str(TINY_DIR / "policy"), "--data", str(p), "--out", str(out),
                 "rollout.max_response_tokens=4"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["problems"] == 203 and len((out / "samples.jsonl").read_text().splitlines()) == 203
    assert f"203 problems from {p} (every row)" in capsys.readouterr().err
    assert main(["--checkpoint", str(TINY_DIR / "policy"), "--data", str(p), "--out", str(out), "--limit", "5",
                 "rollout.max_response_tokens=4"]) == 0
    assert json.loads((out / "metrics.json").read_text())["problems"] == 5
    assert "5 problems from" in capsys.readouterr().err


@pytest.mark.slow
def test_grader_storm_of_slow_answers_with_a_tiny_timeout_does_not_hang():
    """16 threads (as many episodes grading at once) each send slow non-integer answers with a
    0.1 s budget: every call returns within its bound (0 reward), the storm ends, the grader
    then grades correctly, and no grading process is left behind."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    from eapo_ray.reward import RewardConfig, score

    big = "+".join(f"x_{{{i}}}^{{{i}}}" for i in range(300))  # seconds of math-verify work
    slow = f"<answer>\\boxed{{{big}}}</answer>"
    cfg = RewardConfig(timeout_s=0.1)
    before = {p.pid for p in psutil.Process().children(recursive=True)}

    def one(_):
        t0 = time.time()
        r = score(slow, "0.5", cfg)
        return r.reward, time.time() - t0

    t0 = time.time()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(64)))
    took = time.time() - t0
    assert all(r == 0.0 for r, _ in got)
    assert max(d for _, d in got) < 10 and took < 60, (max(d for _, d in got), took)
    assert score("<answer>\\boxed{\\frac{1}{2}}</answer>", "0.5", RewardConfig(timeout_s=30)).correct
    deadline = time.time() + 30
    while time.time() < deadline:
        left = [p for p in psutil.Process().children(recursive=True)
                if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE
                and "resource_tracker" not in " ".join(p.cmdline())]  # multiprocessing's own helper
        if len(left) <= 1:  # the live grading worker
            break
        time.sleep(0.5)
    assert len(left) <= 1, [(p.pid, ' '.join(p.cmdline())[:100]) for p in left]
    print(f"storm: 64 slow answers on 16 threads in {took:.1f}s, slowest call {max(d for _, d in got):.2f}s, "
          f"threads alive {threading.active_count()}")
