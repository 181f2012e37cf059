import json
import math

import pytest

from eapo_ray.config import TINY_DIR
from eapo_ray.evaluate import main, pass_at_k


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - math.comb(7, 4) / math.comb(10, 4))
    assert pass_at_k(5, 2, 4) == 1.0  # fewer than k wrong samples: some size-k subset always has a correct one


def test_cli_independent_and_workflow(tmp_path, capsys):
    for mode in ("independent", "workflow"):
        out = tmp_path / mode
        assert main(["--checkpoint", str(TINY_DIR / "policy"), "--limit", "12", "--samples", "2",
                     "--mode", mode, "--out", str(out)]) == 0
        m = json.loads((out / "metrics.json").read_text())
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert len(rows) == 24 and m["problems"] == 12 and 0 <= m["pass@1"] <= m["pass@2"] <= 1
        assert m["avg@2"] == pytest.approx(sum(r["correct"] for r in rows) / 24)
        if mode == "independent":
            assert all(r["consults"] == 0 for r in rows)  # the consult tag is banned
    assert "pass@2" in capsys.readouterr().out


def test_cli_bad_data_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"question": "1+1"}\n')
    assert main(["--checkpoint", str(TINY_DIR / "policy"), "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_actors_give_the_same_greedy_results(tmp_path):
    """--actors 2 shards the problems over two Ray actors; greedy decoding must give the
    same per-problem results as the in-process run."""
    import ray

    args = ["--checkpoint", str(TINY_DIR / "policy"), "--limit", "16", "--temperature", "0"]
    try:
        assert main(args + ["--actors", "2", "--out", str(tmp_path / "ray")]) == 0
    finally:
        ray.shutdown()
    assert main(args + ["--out", str(tmp_path / "local")]) == 0

    def rows(d):
        return sorted((r["problem"], r["response"], r["correct"])
                      for r in map(json.loads, (tmp_path / d / "samples.jsonl").read_text().splitlines()))
    assert len(rows("ray")) == 16 and rows("ray") == rows("local")
