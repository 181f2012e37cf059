import pytest

from eapo_ray.algo.paired import paired_difference


def test_paired_difference_exact_means_and_interval():
    a = {0: [1, 1, 0, 1], 1: [1, 0, 0, 0]}
    b = {0: [0, 1, 0, 1], 1: [1, 0, 0, 1]}
    r = paired_difference(a, b, n_boot=500)
    assert r["per_seed"] == {0: 0.25, 1: -0.25} and r["mean"] == 0.0
    assert r["ci95"][0] <= 0.0 <= r["ci95"][1] and r["wins"] == 1 and r["losses"] == 1
    # a row that wins on every problem: the interval sits above zero
    big = paired_difference({0: [4] * 50}, {0: [1] * 25 + [2] * 25}, samples=4, n_boot=200)
    assert big["mean"] == pytest.approx(0.625) and big["ci95"][0] > 0.5


def test_paired_difference_rejects_mismatched_sets():
    with pytest.raises(ValueError):
        paired_difference({0: [1, 0]}, {0: [1]})
    with pytest.raises(ValueError):
        paired_difference({0: [1]}, {1: [1]})
