"""The trajectory buffer: a Ray actor holding ObjectRefs (never copies) of finished
batches, FIFO, with a capacity that makes producers wait (backpressure) and a staleness
bound: a batch more than `max_staleness` policy versions behind the learner is dropped
and counted when the learner asks for data."""
from __future__ import annotations

import asyncio
from collections import deque

import ray


@ray.remote(num_cpus=0)
class TrajectoryBuffer:
    def __init__(self, capacity: int, max_staleness: int):
        self.capacity, self.max_staleness = capacity, max_staleness
        self.items: deque = deque()  # (version, [ref], num_samples)
        self.learner_version = 0
        self.cond = asyncio.Condition()
        self.counts = {"put": 0, "got": 0, "dropped_stale": 0, "dropped_samples": 0, "waits": 0}

    async def put(self, ref_box: list, version: int, num_samples: int) -> None:
        """Add one batch (`ref_box` = [ObjectRef], boxed so Ray passes the ref itself)."""
        async with self.cond:
            if len(self.items) >= self.capacity:
                self.counts["waits"] += 1
            await self.cond.wait_for(lambda: len(self.items) < self.capacity)
            self.items.append((version, ref_box, num_samples))
            self.counts["put"] += 1
            self.cond.notify_all()

    async def get(self, num_batches: int, learner_version: int, timeout_s: float | None = None) -> list:
        """Wait for `num_batches` fresh batches; returns [(version, [ref], n), ...]."""
        async with self.cond:
            self.learner_version = learner_version
            out = []

            def ready():
                self._drop_stale()
                return len(self.items) >= num_batches - len(out)

            try:
                await asyncio.wait_for(self.cond.wait_for(ready), timeout_s)
            except asyncio.TimeoutError:
                pass
            while self.items and len(out) < num_batches:
                out.append(self.items.popleft())
            self.counts["got"] += len(out)
            self.cond.notify_all()
            return out

    def _drop_stale(self):
        fresh = deque(i for i in self.items if self.learner_version - i[0] <= self.max_staleness)
        for v, _, n in self.items:
            if self.learner_version - v > self.max_staleness:
                self.counts["dropped_stale"] += 1
                self.counts["dropped_samples"] += n
        self.items = fresh
        if len(fresh) < self.capacity:
            self.cond.notify_all()

    def stats(self) -> dict:
        return dict(self.counts, size=len(self.items), learner_version=self.learner_version)
