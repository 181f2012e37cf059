import pytest

from eapo_ray.algo.paired import paired_difference


def test_paired_difference_exact_means_and_interval():
    a = {0: [1, 1, 0, 1], 1: [1, 0, 0, 0]}
    b = {0: [0, 1, 0, 1], 1: [1, 0, 0, 1]}
    r = paired_difference(a, b, n_boot=500)
    assert r["per_seed"] == {0: 0.25, 1: -0.25} and r["mean"] == 0.0
    assert r["ci95"][0] <= 0.0 <= r["ci95"][1] and r["wins"] == 1 and r["losses"] == 1
    # a row that wins on every problem: the interval sits above zero
    big = paired_difference({0: [4] * 50}, {0: [1] * 25 + [2] * 25}, ka=4, n_boot=200)
    assert big["mean"] == pytest.approx(0.625) and big["ci95"][0] > 0.5


def test_interval_covers_seed_to_seed_variation():
    """Two seeds that disagree (+0.5 on every problem in one, -0.5 in the other): a bootstrap
    over problems only (the old interval) says [0, 0], exactly; resampling seeds too does not."""
    a = {0: [1] * 40, 1: [0] * 40}
    b = {0: [0] * 40, 1: [1] * 40}
    r = paired_difference(a, b, n_boot=400)
    assert r["mean"] == 0.0 and r["ci95_problems"] == (0.0, 0.0)
    assert r["ci95"][0] <= -0.9 and r["ci95"][1] >= 0.9  # the draws {s0, s0} and {s1, s1} are in the 95%
    # one seed: the hierarchical interval is the problem bootstrap
    one = paired_difference({0: [1, 0] * 20}, {0: [0] * 40}, n_boot=400)
    assert one["ci95"][0] > 0.2 and one["ci95"][1] < 0.8


def test_samples_per_problem_is_taken_per_row():
    a, b = {0: [4, 2, 0, 4]}, {0: [1, 0, 1, 1]}
    with pytest.raises(ValueError, match="different samples per problem"):
        paired_difference(a, b, ka=4, kb=1)
    r = paired_difference(a, b, ka=4, kb=1, allow_unequal_k=True, n_boot=100)
    assert r["per_seed"][0] == pytest.approx((1 + 0.5 + 0 + 1) / 4 - 3 / 4)
    with pytest.raises(ValueError, match="outside"):  # counts above k: the k given is not the row's
        paired_difference(a, {0: [1, 0, 1, 1]}, ka=1)
    # k per seed
    assert paired_difference({0: [2], 1: [1]}, {0: [0], 1: [0]}, ka={0: 2, 1: 1}, n_boot=10)["mean"] == 1.0


def test_paired_difference_rejects_mismatched_sets():
    with pytest.raises(ValueError):
        paired_difference({0: [1, 0]}, {0: [1]})
    with pytest.raises(ValueError):
        paired_difference({0: [1]}, {1: [1]})


def test_experiments_paired_reads_k_per_row(tmp_path):
    import json

    from experiments.paired import compare

    for row, k, counts in (("eapo", 4, [4, 0]), ("rl", 8, [8, 8])):
        d = tmp_path / "runs" / f"{row}-s0"
        d.mkdir(parents=True)
        d.joinpath("eval.json").write_text(json.dumps(
            {"greedy": {"correct_per_problem": [1, 0], "samples_per_problem": 1},
             "sampled": {"correct_per_problem": counts, "samples_per_problem": k}}))
    with pytest.raises(ValueError, match="different samples per problem"):
        compare(tmp_path, "eapo", "rl")
    r = compare(tmp_path, "eapo", "rl", allow_unequal_k=True)
    assert r["sampled"]["per_seed"][0] == pytest.approx(0.5 - 1.0) and r["greedy"]["mean"] == 0.0
