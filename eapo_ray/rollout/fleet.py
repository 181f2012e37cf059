"""The rollout fleet, seen from the driver: at most one `produce` call in flight per
actor, finished calls collected with `ray.wait` (no polling), and two bounds that turn
a silent spin into a clear error:

- an actor whose calls fail `max_failures` times in a row is retired; when every actor is
  retired, `FleetError` says so with the last error. Ray restarts a crashed actor on its own:
  after a call that finds it dead or restarting (RayActorError) the actor gets no new call
  until it answers a `ping`; if it does not within `restart_timeout_s` (a restart that can never
  be placed, e.g. its node is gone and no other node can host it), it is killed and retired, so
  it never holds the run; other failures back off, doubling each time;
- `max_empty` finished batches in a row that kept no sample (every group had equal
  rewards, so dynamic sampling dropped it) raise `FleetError` too.

Each finished call comes back as a `RolloutResult`; its batch is an ObjectRef owned by
the driver (the actor's return value), so it outlives the actor that made it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray

from eapo_ray.data import warn_overlong, warn_zero_reward


class FleetError(RuntimeError):
    pass


@dataclass
class RolloutResult:
    """One finished `produce` call."""
    worker: int
    stats: dict | None  # RolloutWorker.produce's stats; None when the call failed
    batch: Any = None  # ObjectRef of the batch (None-valued when nothing was kept); owned by the driver
    error: str = ""  # why the call failed
    tag: Any = None  # what the caller passed to `submit` with the call


class RolloutFleet:
    def __init__(self, actors: list, max_failures: int = 3, max_empty: int = 20, restart_backoff_s: float = 2.0,
                 restart_timeout_s: float = 300.0):
        self.actors = list(actors)
        self.max_failures, self.max_empty, self.backoff_s = max_failures, max_empty, restart_backoff_s
        self.restart_timeout_s = restart_timeout_s
        self.recovering: dict[int, tuple] = {}  # actor -> (ping ObjectRef, deadline): waiting for it to come back
        self.not_before = [0.0] * len(self.actors)  # no new call to an actor before this time (backoff)
        self.inflight: dict = {}  # stats ObjectRef -> (worker index, batch ObjectRef, tag)
        self.failures = [0] * len(self.actors)  # consecutive failed calls per actor
        self.retired: set[int] = set()
        self.empty_in_a_row = 0
        self.last_error = ""
        self.failed_calls = 0  # every failed call so far, restarts included

    def idle(self) -> list[int]:
        busy, now = {i for i, *_ in self.inflight.values()}, time.time()
        return [i for i in range(len(self.actors)) if i not in busy and i not in self.retired
                and i not in self.recovering and self.not_before[i] <= now]

    @property
    def num_alive(self) -> int:
        return len(self.actors) - len(self.retired)

    @property
    def num_inflight(self) -> int:
        return len(self.inflight)

    def submit(self, worker: int, tag: Any = None, **kwargs) -> None:
        """`produce(**kwargs)` on actor `worker`; `tag` comes back with its result."""
        stats_ref, batch_ref = self.actors[worker].produce.remote(**kwargs)
        self.inflight[stats_ref] = (worker, batch_ref, tag)

    def wait(self, timeout_s: float) -> list[RolloutResult]:
        """Results of the calls that finish within `timeout_s` (at least one, unless none
        finishes in time); failures are counted and may retire an actor or raise."""
        self._check_recovering()
        if not self.inflight:  # nothing to wait for but backoffs and restarts: sleep until the first ends
            # (an actor waiting for its restart is not counted: its wait is the 1 s ping cadence, not
            # its not_before, which would make this sleep 0 and spin the driver until it is back)
            waits = [t - time.time() for i, t in enumerate(self.not_before)
                     if i not in self.retired and i not in self.recovering]
            time.sleep(max(0.0, min([timeout_s, 1.0 if self.recovering else timeout_s] + waits)))
            self._check_recovering()
            return []
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout_s)
        if ready:  # take everything else that is done too
            ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
        out = []
        for ref in ready:
            worker, batch, tag = self.inflight.pop(ref)
            try:
                stats = ray.get(ref)
            except ray.exceptions.RayError as e:
                out.append(self._failed(worker, e))
                continue
            self.failures[worker] = 0
            warn_zero_reward(stats)  # the first batch with zero reward everywhere: its likely causes, once
            warn_overlong(stats)  # the first batch with many responses cut by the length budget, once
            self.empty_in_a_row = 0 if stats["kept_samples"] else self.empty_in_a_row + 1
            if self.empty_in_a_row >= self.max_empty:
                raise FleetError(
                    f"{self.empty_in_a_row} rollout batches in a row kept no samples: every group had equal rewards "
                    "(all right or all wrong), so dynamic sampling dropped them. Check the reward and data "
                    "(a harder/easier task, a longer response budget), or set algo.dynamic_sampling=false "
                    "(rollout.max_empty_batches sets this bound).")
            out.append(RolloutResult(worker, stats, batch, tag=tag))
        return out

    def _check_recovering(self) -> None:
        """Actors that answered their ping are back; a ping that failed means the actor is dead
        for good; one past its deadline means its restart cannot happen (e.g. its node is gone)."""
        now = time.time()
        for worker, (ref, deadline) in list(self.recovering.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                del self.recovering[worker]
                try:
                    ray.get(ref)
                    print(f"[eapo] rollout actor {worker} is back", flush=True)
                except ray.exceptions.ActorUnavailableError:  # still restarting: ask again, same deadline
                    self.recovering[worker] = (self.actors[worker].ping.remote(), deadline)
                except ray.exceptions.RayError as e:
                    self._retire(worker, f"rollout actor {worker} died for good: {type(e).__name__}")
            elif now > deadline:
                del self.recovering[worker]
                ray.cancel(ref, force=False)
                try:
                    ray.kill(self.actors[worker], no_restart=True)
                except Exception:  # noqa: BLE001 -- it is being retired anyway
                    pass
                self._retire(worker, f"rollout actor {worker} did not come back within rollout.restart_timeout_s="
                                     f"{self.restart_timeout_s:g}s (its restart could not be placed: its node may "
                                     "be gone)")

    def _retire(self, worker: int, why: str) -> None:
        self.retired.add(worker)
        self.last_error = why
        print(f"[eapo] {why}: retired ({self.num_alive} rollout actors left)", flush=True)
        if not self.num_alive:
            raise FleetError(f"every rollout actor is retired; last: {why} (see the actors' logs in the Ray dashboard)")

    def _failed(self, worker: int, e: Exception) -> RolloutResult:
        self.failed_calls += 1
        if isinstance(e, ray.exceptions.RayActorError):  # dead or restarting (loading its model): wait for it
            self.recovering[worker] = (self.actors[worker].ping.remote(), time.time() + self.restart_timeout_s)
            print(f"[eapo] rollout actor {worker} died or is restarting ({type(e).__name__}): its batch in flight "
                  f"is discarded, the next goes to it once it is back (at most rollout.restart_timeout_s="
                  f"{self.restart_timeout_s:g}s)", flush=True)
            return RolloutResult(worker, None, error=f"rollout actor {worker} is restarting")
        self.failures[worker] += 1
        self.not_before[worker] = time.time() + self.backoff_s * 2 ** (self.failures[worker] - 1)
        last_line = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        self.last_error = f"rollout actor {worker}: {type(e).__name__}: {last_line}"
        print(f"[eapo] {self.last_error} (failure {self.failures[worker]}/{self.max_failures} in a row)", flush=True)
        if self.failures[worker] >= self.max_failures:
            self.retired.add(worker)
            print(f"[eapo] rollout actor {worker} retired after {self.failures[worker]} failures in a row", flush=True)
            if not self.num_alive:
                raise FleetError(f"every rollout actor has failed {self.max_failures} times in a row; last error: "
                                 f"{self.last_error} (see the actors' logs in the Ray dashboard)")
        return RolloutResult(worker, None, error=self.last_error)

    def cancel_all(self) -> None:
        for ref in self.inflight:
            ray.cancel(ref, force=False)
        self.inflight.clear()
