"""Reward: math-verify correctness plus EAPO's format reward.

reward = 1.0 if correct, `format_reward` (0.1) if the answer is well formed but wrong,
0.0 if malformed. math-verify's own timeouts use signal.alarm, which fails outside the
main thread, so they are switched off and a timeout is enforced here with a one-worker
process pool (a timeout scores 0 and the stuck worker is replaced). Thread-safe.
Integer answers (the bundled task) are compared directly and never reach the pool. The
pool starts with "spawn", which re-imports the caller's __main__: scripts that call
`score` need the usual `if __name__ == "__main__":` guard.
"""
from __future__ import annotations

import multiprocessing
import re
import threading
import unicodedata
from dataclasses import dataclass

from eapo_ray.algo.protocol import ProtocolConfig

_INT = re.compile(r"^[+-]?\d+\Z")

__all__ = ["RewardConfig", "RewardResult", "last_boxed", "last_number", "extract_answer", "quick_score", "score", "warm_up"]


@dataclass
class RewardConfig:
    format_reward: float = 0.1
    timeout_s: float | None = 5.0  # None or 0: grade in-process (main thread only is safe)
    require_answer_tags: bool = True  # False: also accept a bare \boxed{} outside the tags
    last_number_fallback: bool = False  # no tags, no \boxed{}: take the response's last number
    # (lm-eval's "flexible extract"; for evaluating small models that rarely box, never for training)

    def __post_init__(self):
        if not 0.0 <= self.format_reward < 1.0:
            raise ValueError(f"reward.format_reward must be in [0, 1), got {self.format_reward}")


@dataclass
class RewardResult:
    reward: float
    correct: bool
    formatted: bool


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in the text (thousands separators dropped, a trailing '.0' kept), or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def extract_answer(response: str, protocol: ProtocolConfig | None = None, require_tags: bool = True,
                   last_number_fallback: bool = False) -> str | None:
    """The final answer string: \\boxed{} content (or the bare value) of the last answer block;
    with `last_number_fallback`, the last number when there is no tag and no \\boxed{}."""
    p = protocol or ProtocolConfig()
    close = response.rfind(p.answer_close)
    open_ = response.rfind(p.answer_open, 0, close) if close >= 0 else -1
    if open_ >= 0:
        inner = response[open_ + len(p.answer_open): close]
        boxed = last_boxed(inner)
        if boxed is None and "\\boxed{" in inner:
            return None  # an unbalanced \boxed{ is malformed
        value = boxed if boxed is not None else inner
    elif not require_tags:
        value = last_boxed(response)
        if value is None and last_number_fallback and "\\boxed{" not in response:
            value = last_number(response)
    else:
        return None
    value = value.strip() if value is not None else None
    return value or None


def _int_key(s: str) -> tuple[bool, str]:
    """An integer string (`_INT`) as (negative, digits without leading zeros): equal keys iff equal
    values, without int() (which refuses strings over 4300 digits)."""
    digits = "".join(str(unicodedata.decimal(c)) for c in s.lstrip("+-")).lstrip("0") or "0"  # \d: any script
    return s.startswith("-") and digits != "0", digits


def _grade(pred: str, gold: str) -> tuple[bool, bool]:
    """(formatted, correct). Runs math-verify with its signal-based timeouts off (integer pairs never
    get here: `_quick` compares them)."""
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call with timeouts off

    wrap = lambda s: s if "$" in s else f"${s}$"  # noqa: E731
    p = parse(wrap(pred), parsing_timeout=None)
    if not p:
        return False, False
    g = parse(wrap(gold), parsing_timeout=None)
    return True, bool(g) and bool(verify(g, p, timeout_seconds=None))


class _Grader:
    """A lazily started one-process pool; replaced after a timeout."""

    def __init__(self):
        self._lock, self._pool = threading.Lock(), None

    def __call__(self, pred: str, gold: str, timeout_s: float) -> tuple[bool, bool] | None:
        with self._lock:
            if self._pool is None:
                self._pool = multiprocessing.get_context("spawn").Pool(1)
            pool = self._pool
        try:
            return pool.apply_async(_grade, (pred, gold)).get(timeout_s)
        except multiprocessing.TimeoutError:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            # Pool.terminate() was seen to block forever under heavy load: kill the worker
            # process first, and let terminate() tidy up off the caller's thread.
            for proc in getattr(pool, "_pool", []):
                proc.kill()
            threading.Thread(target=pool.terminate, daemon=True).start()
            return None


    def warm_up(self) -> None:
        """Start the pool and have its worker import math-verify now (~2 s of CPU: a spawn and the
        import), without waiting: the first answer that needs it would otherwise pay that."""
        with self._lock:
            if self._pool is None:
                self._pool = multiprocessing.get_context("spawn").Pool(1)
            self._pool.apply_async(_grade, ("1/2", "2/4"))


_grader = _Grader()


def warm_up(cfg: RewardConfig) -> None:
    """Start math-verify's grading process in the background (only with `timeout_s` set, i.e.
    when grades go to it); e.g. when a rollout actor starts, so its first batch does not wait
    for it. Never raises: a pool that cannot start is started (and reported) by the grade."""
    if cfg.timeout_s:
        threading.Thread(target=lambda: _try(_grader.warm_up), daemon=True, name="eapo-grade-warm").start()


def _try(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 -- the first real grade starts the pool again and reports
        pass


def _result(formatted: bool, correct: bool, cfg: RewardConfig) -> RewardResult:
    return RewardResult(1.0 if correct else cfg.format_reward if formatted else 0.0, correct, formatted)


def _quick(pred: str | None, gold: str, cfg: RewardConfig) -> RewardResult | None:
    if pred is None:
        return RewardResult(0.0, False, False)
    if _INT.match(pred) and _INT.match(str(gold).strip()):  # math-verify agrees on integers
        return _result(True, _int_key(pred) == _int_key(str(gold).strip()), cfg)
    return None


def quick_score(response: str, gold: str, cfg: RewardConfig | None = None,
                protocol: ProtocolConfig | None = None) -> RewardResult | None:
    """score(...) when it needs no math-verify call (no answer, or integer answers: microseconds,
    safe on any thread, e.g. inline in an event loop); None when it does (call `score`)."""
    cfg = cfg or RewardConfig()
    return _quick(extract_answer(response, protocol, cfg.require_answer_tags, cfg.last_number_fallback), gold, cfg)


def score(response: str, gold: str, cfg: RewardConfig | None = None,
          protocol: ProtocolConfig | None = None) -> RewardResult:
    cfg = cfg or RewardConfig()
    pred = extract_answer(response, protocol, cfg.require_answer_tags, cfg.last_number_fallback)
    quick = _quick(pred, gold, cfg)
    if quick is not None:
        return quick
    try:
        graded = _grader(pred, str(gold), cfg.timeout_s) if cfg.timeout_s else _grade(pred, str(gold))
    except Exception:  # a parser crash on odd input is a malformed answer, not a dead actor
        graded = (False, False)
    if graded is None:  # timed out
        return RewardResult(0.0, False, False)
    return _result(*graded, cfg)
