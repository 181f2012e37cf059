"""The trajectory buffer: a Ray actor holding ObjectRefs (never copies) of finished
batches, FIFO, with a capacity and a staleness bound: a batch more than `max_staleness`
policy versions behind the learner is dropped and counted when the learner asks for data.

The driver is the producer (it enqueues the batches that rollout actors return, and
owns them) and the consumer; it uses the non-blocking `offer`, so nothing ever waits
inside the buffer for space. `put` (waits while full) stays for producers that may block.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import NamedTuple

import ray


class BufferItem(NamedTuple):
    """One finished rollout batch as the buffer holds it."""
    version: int  # the policy version that generated it (the oldest, if weights changed mid-batch)
    box: list  # [ObjectRef] to a columnar batch (algo.batching.to_batch); boxed so Ray passes the ref
    num_samples: int  # trajectories in the batch


@ray.remote(num_cpus=0)
class TrajectoryBuffer:
    def __init__(self, capacity: int, max_staleness: int):
        self.capacity, self.max_staleness = capacity, max_staleness
        self.items: deque[BufferItem] = deque()
        self.learner_version = 0
        self.cond = asyncio.Condition()
        self.counts = {"put": 0, "got": 0, "dropped_stale": 0, "dropped_samples": 0, "waits": 0, "refused": 0}

    async def put(self, ref_box: list, version: int, num_samples: int) -> None:
        """Add one batch, waiting while the buffer is full (`ref_box` = [ObjectRef])."""
        async with self.cond:
            if len(self.items) >= self.capacity:
                self.counts["waits"] += 1
            await self.cond.wait_for(lambda: len(self.items) < self.capacity)
            self._append(BufferItem(version, ref_box, num_samples))

    async def offer(self, ref_box: list, version: int, num_samples: int) -> bool:
        """Add one batch if there is room (stale batches are dropped first); never waits.
        Returns whether it was taken."""
        async with self.cond:
            self._drop_stale()
            if len(self.items) >= self.capacity:
                self.counts["refused"] += 1
                return False
            self._append(BufferItem(version, ref_box, num_samples))
            return True

    def _append(self, item: BufferItem) -> None:
        self.items.append(item)
        self.counts["put"] += 1
        self.cond.notify_all()

    async def get(self, num_batches: int, learner_version: int, timeout_s: float | None = None) -> list[BufferItem]:
        """Wait (up to `timeout_s`; 0 = not at all) for `num_batches` fresh batches and
        return what there is, oldest first."""
        async with self.cond:
            self.learner_version = learner_version
            out = []

            def ready():
                self._drop_stale()
                return len(self.items) >= num_batches - len(out)

            if not ready() and timeout_s != 0:
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
        fresh = deque(i for i in self.items if self.learner_version - i.version <= self.max_staleness)
        for item in self.items:
            if self.learner_version - item.version > self.max_staleness:
                self.counts["dropped_stale"] += 1
                self.counts["dropped_samples"] += item.num_samples
        self.items = fresh
        if len(fresh) < self.capacity:
            self.cond.notify_all()

    def stats(self) -> dict:
        return dict(self.counts, size=len(self.items), size_samples=sum(i.num_samples for i in self.items),
                    learner_version=self.learner_version)
