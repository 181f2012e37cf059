"""Where every trainable sample of a launch went (no Ray here).

A rollout batch is *produced* when its actor returns it to the driver with kept samples
(dynamic sampling may drop whole groups inside the actor first: those are `filtered`, never
trainable). Each produced batch then ends in exactly one place:

    produced = trained + dropped_stale + buffered_at_end + lost

- trained: the learner read it and trained on it;
- dropped_stale: the buffer dropped it for being more than `buffer.max_staleness` versions old;
- buffered_at_end: still in the buffer, or waiting in the driver for buffer room, when the run ended;
- lost: the learner could not read it (its object was lost), counted by the learner itself.

Every term is counted by a different party (driver, buffer, learner), so the identity is a
real check, in batches and in samples. Batches still being generated when the run ends were
never produced (`in_flight_at_end`, for information). The counts cover one launch: a resumed
run starts a fresh buffer, and regenerates what its previous attempt had not trained on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


class AccountingError(RuntimeError):
    pass


@dataclass
class Accounting:
    produced_batches: int = 0
    produced_samples: int = 0
    filtered_samples: int = 0  # generated but dropped by dynamic sampling inside the actor (never trainable)
    taken_batches: int = 0  # handed to the learner
    taken_samples: int = 0
    trained_batches: int = 0
    trained_samples: int = 0
    lost_batches: int = 0
    lost_samples: int = 0
    expert_unavailable: int = 0  # accepted expert queries that got "unavailable" (timeout, dead replica)

    def rollout(self, stats: dict) -> None:
        """A finished rollout batch came back to the driver (RolloutWorker.produce's stats)."""
        self.filtered_samples += stats["samples"] - stats["kept_samples"]
        self.expert_unavailable += stats.get("expert_failures", 0)
        if stats["kept_samples"]:
            self.produced_batches += 1
            self.produced_samples += stats["kept_samples"]

    def step(self, item_samples: list[int], lost_batches: int, learner_samples: int) -> None:
        """One train step: the sizes of the batches taken from the buffer, and what the learner
        reports (batches it could not read, samples it trained on)."""
        self.taken_batches += len(item_samples)
        self.taken_samples += sum(item_samples)
        self.trained_batches += len(item_samples) - lost_batches
        self.trained_samples += learner_samples
        self.lost_batches += lost_batches
        self.lost_samples += sum(item_samples) - learner_samples

    def close(self, buffer_stats: dict, pending: list[int], in_flight: int) -> dict:
        """The accounting block of summary.json. `buffer_stats`: TrajectoryBuffer.stats() at the
        end; `pending`: sizes of the batches the driver still holds for the buffer; `in_flight`:
        rollout calls still running. `closes` says whether the identity holds (`check` raises if not)."""
        b = {"batches": {"produced": self.produced_batches, "trained": self.trained_batches,
                         "dropped_stale": buffer_stats["dropped_stale"],
                         "buffered_at_end": buffer_stats["size"] + len(pending), "lost": self.lost_batches},
             "samples": {"produced": self.produced_samples, "trained": self.trained_samples,
                         "dropped_stale": buffer_stats["dropped_samples"],
                         "buffered_at_end": buffer_stats["size_samples"] + sum(pending), "lost": self.lost_samples}}
        out = {**b, "filtered_samples": self.filtered_samples, "in_flight_at_end": in_flight,
               "expert_unavailable": self.expert_unavailable, "closes": True}
        errors = []
        for unit, c in b.items():
            rest = c["trained"] + c["dropped_stale"] + c["buffered_at_end"] + c["lost"]
            if c["produced"] != rest:
                errors.append(f"in {unit}: produced {c['produced']} != trained {c['trained']} + dropped_stale "
                              f"{c['dropped_stale']} + buffered_at_end {c['buffered_at_end']} + lost {c['lost']} (= {rest})")
        if errors:
            out["closes"] = False
            out["error"] = f"accounting does not close {'; '.join(errors)}; the driver's counters: {asdict(self)}"
        return out


def check(block: dict) -> None:
    """Raise AccountingError when an accounting block (from `Accounting.close`) does not close."""
    if not block["closes"]:
        raise AccountingError(block["error"])
