"""Wall-clock accounting for the per-step time breakdown (issue 13). No Ray, no torch.

`Overlap` splits a span of wall time by which kinds of work were in flight at each moment,
so concurrent work (episodes are coroutines: while some wait for the expert, others generate)
is not double-counted: e.g. a rollout batch's `expert_wait` is the time the expert had a query
in flight while the engine had nothing to do, i.e. the time the batch was blocked on it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager


class Overlap:
    """Counts in-flight work per kind and accumulates wall time per set of busy kinds.
    Single-threaded use (the rollout actor's event loop)."""

    def __init__(self, kinds: tuple[str, ...] = ("engine", "expert", "reward"), clock=time.perf_counter):
        self.kinds, self.clock = kinds, clock
        self.inflight = dict.fromkeys(kinds, 0)
        self.spent: dict[frozenset, float] = {}
        self.t0 = self.last = clock()

    def _tick(self) -> None:
        now = self.clock()
        key = frozenset(k for k, n in self.inflight.items() if n > 0)
        self.spent[key] = self.spent.get(key, 0.0) + now - self.last
        self.last = now

    def enter(self, kind: str) -> None:
        self._tick()
        self.inflight[kind] += 1

    def exit(self, kind: str) -> None:
        self._tick()
        self.inflight[kind] -= 1

    @contextmanager
    def busy(self, kind: str):
        self.enter(kind)
        try:
            yield
        finally:
            self.exit(kind)

    def busy_s(self, kind: str) -> float:
        """Wall time with at least one `kind` in flight."""
        self._tick()
        return sum(t for key, t in self.spent.items() if kind in key)

    def only_s(self, kind: str) -> float:
        """Wall time with `kind` in flight and nothing else."""
        self._tick()
        return self.spent.get(frozenset([kind]), 0.0)

    def idle_s(self) -> float:
        self._tick()
        return self.spent.get(frozenset(), 0.0)

    def total_s(self) -> float:
        self._tick()
        return self.last - self.t0


def fraction(part: float, whole: float) -> float:
    """part / whole clipped to [0, 1] (0 when whole is 0)."""
    return min(1.0, max(0.0, part / whole)) if whole > 0 else 0.0
