import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from eapo_ray.algo.reward import RewardConfig, extract_answer, score


@pytest.mark.parametrize("response,gold,expected", [
    ("3+4=7;<answer>\\boxed{7}</answer>", "7", (1.0, True, True)),
    ("<answer>\\boxed{8}</answer>", "7", (0.1, False, True)),
    ("<answer>7</answer>", "7", (1.0, True, True)),  # a bare value inside the tags
    ("<answer>\\boxed{\\frac{1}{2}}</answer>", "0.5", (1.0, True, True)),
    ("<answer>\\boxed{0.5}</answer>", "\\frac{1}{2}", (1.0, True, True)),
    ("<answer>\\boxed{\\frac{\\sqrt{3}}{2}}</answer>", "\\frac{\\sqrt 3}{2}", (1.0, True, True)),
    ("<answer>\\boxed{}</answer>", "7", (0.0, False, False)),
    ("\\boxed{7}", "7", (0.0, False, False)),  # no answer tags
    ("<answer>\\boxed{7</answer>", "7", (0.0, False, False)),  # unbalanced box is not an answer
    ("", "7", (0.0, False, False)),
])
def test_score(response, gold, expected):
    r = score(response, gold)
    assert (r.reward, r.correct, r.formatted) == expected


def test_untagged_boxed_option_and_format_reward():
    assert score("so \\boxed{7}", "7", RewardConfig(require_answer_tags=False)).correct
    assert score("<answer>\\boxed{8}</answer>", "7", RewardConfig(format_reward=0.0)).reward == 0.0
    assert extract_answer("<answer>a</answer> x <answer>\\boxed{b}</answer>") == "b"


def test_safe_in_threads_and_event_loops():
    cases = [("<answer>\\boxed{\\frac{1}{2}}</answer>", "0.5", True), ("<answer>\\boxed{x^2}</answer>", "x^3", False)] * 4
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: score(c[0], c[1]).correct, cases))
    assert got == [c[2] for c in cases]

    async def main():
        return await asyncio.gather(*(asyncio.to_thread(score, c[0], c[1]) for c in cases))
    assert [r.correct for r in asyncio.run(main())] == [c[2] for c in cases]


def test_grading_timeout_scores_zero():
    # math-verify needs seconds on this 300-term sum: a 0.2 s budget times out for real.
    big = "+".join(f"x_{{{i}}}^{{{i}}}" for i in range(300))
    r = score(f"<answer>\\boxed{{{big}}}</answer>", "0.5", RewardConfig(timeout_s=0.2))
    assert (r.reward, r.correct, r.formatted) == (0.0, False, False)
    # and the grader recovers afterwards
    assert score("<answer>\\boxed{\\frac{1}{2}}</answer>", "0.5").correct


def test_last_number_fallback_is_opt_in_and_only_without_a_box():
    from eapo_ray.algo.reward import last_number

    assert last_number("she pays 1,234 dollars, i.e. 5.5 per day.") == "5.5"
    assert last_number("no digits") is None
    flexible = RewardConfig(require_answer_tags=False, last_number_fallback=True, timeout_s=None)
    assert score("So she makes 18 dollars.", "18", flexible).correct
    assert not score("So she makes 18 dollars.", "18", RewardConfig(require_answer_tags=False)).formatted
    assert not score("18 ... \\boxed{17}", "18", flexible).correct  # a box, when present, is the answer
    assert not score("18 ... \\boxed{17", "18", flexible).formatted  # a broken box is not rescued
    tagged = RewardConfig(require_answer_tags=True, last_number_fallback=True, timeout_s=None)
    assert not score("So she makes 18 dollars.", "18", tagged).formatted  # training rewards keep the tags


@pytest.mark.parametrize("response,gold,expected", [
    ("<answer>\\boxed{7}</answer>", "7", (1.0, True, True)), ("<answer>\\boxed{8}</answer>", "7", (0.1, False, True)),
    ("<answer>-12</answer>", " -12 ", (1.0, True, True)), ("<answer>+007</answer>", "7", (1.0, True, True)),
    ("<answer>-0</answer>", "0", (1.0, True, True)), ("<answer>-3</answer>", "3", (0.1, False, True)),
    ("<answer>\\boxed{}</answer>", "7", (0.0, False, False)), ("no answer", "7", (0.0, False, False)),
])
def test_quick_score_grades_integers_as_math_verify_does(response, gold, expected):
    """The episode grades these inline on its event loop (no hop to the grading thread); where
    there is an answer, math-verify itself (no fast path) agrees on correctness."""
    from math_verify import parse, verify

    from eapo_ray.algo.reward import extract_answer, quick_score

    r = quick_score(response, gold)
    assert (r.reward, r.correct, r.formatted) == expected
    pred = extract_answer(response)
    if pred is not None:
        assert bool(verify(parse(f"${gold.strip()}$", parsing_timeout=None), parse(f"${pred}$", parsing_timeout=None),
                           timeout_seconds=None)) == expected[1]


def test_a_very_long_integer_answer_is_graded_not_raised():
    """Cold review: int() refuses strings over 4300 digits (Python 3.11), and the inline fast path
    had no try: one degenerate "1111..." answer failed the whole rollout batch."""
    from eapo_ray.algo.reward import quick_score

    long = "1" * 5000
    assert quick_score(f"<answer>{long}</answer>", long).correct
    assert not score(f"<answer>{long}</answer>", long + "0").correct
    assert score(f"<answer>-{long}</answer>", "7").formatted
    assert quick_score("<answer>\uff13</answer>", "3").correct  # a full-width 3: int() read it as 3, so does the key


@pytest.mark.parametrize("response,gold", [("<answer>\\boxed{\\frac{1}{2}}</answer>", "0.5"),
                                           ("<answer>\\boxed{7}</answer>", "\\frac{14}{2}"),
                                           ("<answer>\\boxed040}</answer>", "40")])
def test_quick_score_defers_everything_else_to_math_verify(response, gold):
    from eapo_ray.algo.reward import quick_score

    assert quick_score(response, gold) is None


def test_warm_up_starts_the_grading_process_without_waiting_and_grades_still_work(monkeypatch):
    """A rollout actor calls warm_up when it starts, so its first batch does not pay math-verify's
    process start and import (~2 s, measured in the default demo's first batch). On a fresh grader:
    the pool exists (and has started its worker) before any grade asks for it."""
    import time

    from eapo_ray.algo import reward

    fresh = reward._Grader()
    monkeypatch.setattr(reward, "_grader", fresh)
    reward.warm_up(RewardConfig(timeout_s=None))  # in-process grading: nothing to start
    time.sleep(0.2)
    assert fresh._pool is None
    t = time.perf_counter()
    reward.warm_up(RewardConfig())
    assert time.perf_counter() - t < 0.5  # returns at once: the pool starts on a thread
    deadline = time.time() + 30
    while (fresh._pool is None or not getattr(fresh._pool, "_pool", None)) and time.time() < deadline:
        time.sleep(0.05)
    pool = fresh._pool
    assert pool is not None and all(w.is_alive() for w in pool._pool)
    try:  # a generous timeout: on a loaded box the grade waits behind the worker's import and the warm-up task
        assert score("<answer>\\boxed{\\frac{1}{2}}</answer>", "0.5", RewardConfig(timeout_s=60)).correct
    finally:
        pool.terminate()
