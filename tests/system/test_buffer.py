"""The trajectory buffer on a real local Ray cluster."""
import time

import numpy as np

from eapo_ray.buffer import TrajectoryBuffer


def test_fifo_holds_refs_not_copies(ray_local):
    ray = ray_local
    buf = TrajectoryBuffer.remote(capacity=4, max_staleness=10)
    data = [np.full(1000, i) for i in range(3)]
    refs = [ray.put(d) for d in data]
    for i, r in enumerate(refs):
        ray.get(buf.put.remote([r], 0, 1000))
    got = ray.get(buf.get.remote(3, 0, 1.0))
    assert [g.box[0] for g in got] == refs  # the very same ObjectRefs, in order
    assert [int(ray.get(g.box[0])[0]) for g in got] == [0, 1, 2]


def test_backpressure_blocks_producers_until_consumed(ray_local):
    ray = ray_local
    buf = TrajectoryBuffer.remote(capacity=1, max_staleness=10)
    ray.get(buf.put.remote([ray.put(1)], 0, 1))
    blocked = buf.put.remote([ray.put(2)], 0, 1)
    ready, _ = ray.wait([blocked], timeout=1.0)
    assert not ready, "a put into a full buffer must wait"
    assert ray.get(buf.stats.remote())["waits"] == 1
    first = ray.get(buf.get.remote(1, 0, 1.0))
    assert ray.get(first[0].box[0]) == 1
    ray.get(blocked, timeout=10)  # unblocked by the get
    assert ray.get(ray.get(buf.get.remote(1, 0, 1.0))[0].box[0]) == 2


def test_staleness_bound_drops_and_counts(ray_local):
    ray = ray_local
    buf = TrajectoryBuffer.remote(capacity=8, max_staleness=2)
    for version in (0, 1, 2, 3):
        ray.get(buf.put.remote([ray.put(version)], version, 10))
    got = ray.get(buf.get.remote(2, 4, 1.0))  # learner at version 4: versions 0 and 1 are too old
    assert [g[0] for g in got] == [2, 3]
    st = ray.get(buf.stats.remote())
    assert st["dropped_stale"] == 2 and st["dropped_samples"] == 20


def test_get_times_out_with_what_it_has(ray_local):
    ray = ray_local
    buf = TrajectoryBuffer.remote(capacity=8, max_staleness=2)
    t0 = time.time()
    assert ray.get(buf.get.remote(1, 0, 0.3)) == []
    assert time.time() - t0 < 5


def test_offer_never_waits_and_refuses_when_full(ray_local):
    ray = ray_local
    buf = TrajectoryBuffer.remote(capacity=1, max_staleness=1)
    assert ray.get(buf.offer.remote([ray.put(1)], 0, 1), timeout=5) is True
    assert ray.get(buf.offer.remote([ray.put(2)], 0, 1), timeout=5) is False  # full: refused at once
    assert ray.get(buf.stats.remote())["refused"] == 1
    assert ray.get(buf.get.remote(1, 5, 0)) == []  # learner at version 5: the batch went stale
    assert ray.get(buf.offer.remote([ray.put(3)], 5, 1), timeout=5) is True
    got = ray.get(buf.get.remote(1, 5, 0))
    assert got[0].version == 5 and got[0].num_samples == 1


def test_rollback_drops_batches_of_discarded_versions(ray_local):
    """Learners rebuilt at version 3 (an older checkpoint): batches made by versions 4 and 5 come
    from a policy that no longer exists. They are dropped and counted, the buffer's learner
    version goes back to 3, and what it hands out is never ahead of the learner (staleness >= 0)."""
    ray = ray_local
    buf = TrajectoryBuffer.remote(capacity=8, max_staleness=2)
    for v in (3, 4, 5):
        assert ray.get(buf.offer.remote([ray.put(v)], v, 10), timeout=5)
    ray.get(buf.get.remote(0, 5, 0))  # the learner was at 5
    assert ray.get(buf.rollback.remote(3), timeout=5) == 2
    st = ray.get(buf.stats.remote())
    assert (st["dropped_discarded"], st["dropped_discarded_samples"], st["size"], st["learner_version"]) == (2, 20, 1, 3)
    got = ray.get(buf.get.remote(4, 3, 0))
    assert [g.version for g in got] == [3] and all(3 - g.version >= 0 for g in got)
