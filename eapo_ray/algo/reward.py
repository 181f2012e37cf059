"""Reward: math-verify correctness plus EAPO's format reward.

reward = 1.0 if correct, `format_reward` (0.1) if the answer is well formed but wrong,
0.0 if malformed; or your own function (`reward.fn`, below). math-verify's own timeouts use signal.alarm, which fails outside the
main thread, so they are switched off and a timeout is enforced here with a one-worker
process pool (a timeout scores 0 and the stuck worker is replaced). Thread-safe.
Integer answers (the bundled task) are compared directly and never reach the pool. The
pool starts with "spawn", which re-imports the caller's __main__: scripts that call
`score` need the usual `if __name__ == "__main__":` guard.

Your own reward: `reward.fn: "package.module:function"`, called as
``function(response: str, gold: str, row: dict) -> float`` where `response` is the text of the
policy's final turn (the text the built-in reward reads, tags included: `extract_answer(response)`
gives the answer inside the answer tag), `gold` the row's answer, `row` the problem row (every
field of the data file's row; for the bundled task problem, answer and level). It runs like
math-verify: in the one-process pool, under `reward.timeout_s` (a timeout scores 0), so a hang or
a crash never takes the rollout actor with it; an exception or a non-number scores 0 and is
reported once per process. A reward >= 1 counts as correct (accuracy), > 0 as well formed. The
module must be importable where the rollout actors run (the driver's current directory and
PYTHONPATH are on a local cluster's path; elsewhere ship it with the Ray job).
"""
from __future__ import annotations

import importlib
import math
import multiprocessing
import re
import sys
import threading
import unicodedata
from dataclasses import dataclass

from eapo_ray.algo.protocol import ProtocolConfig

_INT = re.compile(r"^[+-]?\d+\Z")

__all__ = ["RewardConfig", "RewardResult", "last_boxed", "last_number", "extract_answer", "quick_score", "score", "warm_up",
           "load_fn"]


@dataclass
class RewardConfig:
    format_reward: float = 0.1
    timeout_s: float | None = 5.0  # None or 0: grade in-process (main thread only is safe)
    require_answer_tags: bool = True  # False: also accept a bare \boxed{} outside the tags
    last_number_fallback: bool = False  # no tags, no \boxed{}: take the response's last number
    # (lm-eval's "flexible extract"; for evaluating small models that rarely box, never for training)

    # your own reward instead of math-verify: "package.module:function", called as
    # function(response, gold, row) -> float in the grading process, under timeout_s (module docstring)
    fn: str = ""

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


def load_fn(spec: str):
    """The function a `reward.fn` "package.module:function" names; ValueError saying what is wrong."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"{spec!r} must look like 'package.module:function'")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 -- ImportError, or the module's own error at import
        raise ValueError(f"cannot import module {module!r} ({type(e).__name__}: {e}); it must be importable "
                         f"from the current directory or PYTHONPATH") from None
    fn = mod
    for part in name.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ValueError(f"module {module!r} has no function {name!r}")
    return fn


_FNS: dict = {}  # reward.fn spec -> function, per process (the grading process keeps its imports)


def _call_fn(spec: str, response: str, gold: str, row: dict) -> float:
    """Call reward.fn `spec` (in the grading process); its value as a finite float, else TypeError."""
    fn = _FNS.get(spec) or _FNS.setdefault(spec, load_fn(spec))
    value = fn(response, gold, row)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"returned {value!r}; it must return a finite float")
    return float(value)


def _load_only(spec: str) -> None:
    """Import reward.fn `spec` into this (grading) process; nothing to send back."""
    _FNS.setdefault(spec, load_fn(spec))


POOL_START_S = 120.0  # a new grading process's spawn and reward.fn import, not charged to the first grade


_REPORTED: set = set()


def _report_once(spec: str, error: BaseException) -> None:
    if spec not in _REPORTED:
        _REPORTED.add(spec)
        print(f"[eapo] warning: reward.fn {spec} failed ({type(error).__name__}: {error}); that sample scores 0 "
              "(reported once per process)", file=sys.stderr, flush=True)


class _Grader:
    """A lazily started one-process pool; replaced after a timeout."""

    def __init__(self):
        self._lock, self._pool = threading.Lock(), None

    def __call__(self, pred: str, gold: str, timeout_s: float) -> tuple[bool, bool] | None:
        return self.run(_grade, (pred, gold), timeout_s)

    def run(self, fn, args: tuple, timeout_s: float):
        """`fn(*args)` in the grading process; None if it takes longer than `timeout_s` (the
        process is then replaced); its exception if it raises."""
        with self._lock:
            fresh = self._pool is None
            if fresh:
                self._pool = multiprocessing.get_context("spawn").Pool(1)
            pool = self._pool
        try:
            if fresh and fn is _call_fn:  # the spawn and the user module's import are not the grade's time
                pool.apply_async(_load_only, (args[0],)).get(POOL_START_S)
            return pool.apply_async(fn, args).get(timeout_s)
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


    def warm_up(self, fn_spec: str = "") -> None:
        """Start the pool and have its worker import math-verify (or reward.fn's module) now (~2 s
        of CPU: a spawn and the import), without waiting: the first answer that needs it would
        otherwise pay that."""
        with self._lock:
            if self._pool is None:
                self._pool = multiprocessing.get_context("spawn").Pool(1)
            if fn_spec:
                self._pool.apply_async(load_fn, (fn_spec,))
            else:
                self._pool.apply_async(_grade, ("1/2", "2/4"))


_grader = _Grader()


def warm_up(cfg: RewardConfig) -> None:
    """Start math-verify's grading process in the background (only with `timeout_s` set, i.e.
    when grades go to it); e.g. when a rollout actor starts, so its first batch does not wait
    for it. Never raises: a pool that cannot start is started (and reported) by the grade."""
    if cfg.timeout_s:
        threading.Thread(target=lambda: _try(lambda: _grader.warm_up(cfg.fn)), daemon=True,
                         name="eapo-grade-warm").start()


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
    safe on any thread, e.g. inline in an event loop); None when it does (call `score`), and
    always None with a reward.fn (it runs in the grading process)."""
    cfg = cfg or RewardConfig()
    if cfg.fn:
        return None
    return _quick(extract_answer(response, protocol, cfg.require_answer_tags, cfg.last_number_fallback), gold, cfg)


def score(response: str, gold: str, cfg: RewardConfig | None = None,
          protocol: ProtocolConfig | None = None, row: dict | None = None) -> RewardResult:
    """The reward of `response` (the policy's final turn) against `gold`; `row` (the problem
    row) is passed to a reward.fn."""
    cfg = cfg or RewardConfig()
    if cfg.fn:
        return _score_fn(response, str(gold), cfg, protocol, row if row is not None else {"answer": gold})
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


def _score_fn(response: str, gold: str, cfg: RewardConfig, protocol: ProtocolConfig | None, row: dict) -> RewardResult:
    args = (cfg.fn, response, gold, row)
    try:
        value = _grader.run(_call_fn, args, cfg.timeout_s) if cfg.timeout_s else _call_fn(*args)
    except Exception as e:  # noqa: BLE001 -- the user's function failed on this sample: it scores 0
        _report_once(cfg.fn, e)
        return RewardResult(0.0, False, False)
    if value is None:  # timed out (the grading process was replaced)
        _report_once(cfg.fn, TimeoutError(f"no value within reward.timeout_s={cfg.timeout_s:g} s"))
        return RewardResult(0.0, False, False)
    return RewardResult(value, value >= 1.0, value > 0.0)
