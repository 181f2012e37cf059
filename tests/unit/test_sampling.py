"""Batch building: dynamic sampling, per-consult cost, overlong filtering, collation."""
from types import SimpleNamespace

import pytest
import torch

from eapo_ray.algo.batching import assign_advantages, collate, loss_mask, shaped_reward, split_batch, to_batch


def traj(group, reward, consults=0, overlong=False, n_resp=3):
    return SimpleNamespace(group=group, reward=reward, consults=consults, overlong=overlong, version=0,
                           prompt_ids=[1, 2], response_ids=list(range(10, 10 + n_resp)),
                           policy_mask=[1] * n_resp, expert_mask=[0] * n_resp, behav_logp=[-0.5] * n_resp)


def test_dynamic_sampling_drops_all_equal_groups():
    trajs = [traj(0, 1.0), traj(0, 0.1), traj(1, 0.1), traj(1, 0.1), traj(2, 0.0), traj(2, 0.0)]
    kept, dropped = assign_advantages(trajs)
    assert dropped == 2 and [t.group for t in kept] == [0, 0]
    assert kept[0].advantage > 0 > kept[1].advantage
    kept_all, dropped_none = assign_advantages(trajs, dynamic_sampling=False)
    assert dropped_none == 0 and len(kept_all) == 6 and trajs[2].advantage == 0.0


def test_consult_cost_changes_advantages():
    trajs = [traj(0, 1.0, consults=3), traj(0, 1.0, consults=0)]
    assert assign_advantages(trajs)[1] == 1  # equal rewards, no cost: dropped
    kept, _ = assign_advantages(trajs, consult_cost=0.1)
    assert kept[0].advantage < 0 < kept[1].advantage
    assert shaped_reward(1.0, 3, 0.1) == pytest.approx(0.7)


def test_unequal_groups_are_an_error():
    with pytest.raises(ValueError, match="same size"):
        assign_advantages([traj(0, 1.0), traj(0, 0.0), traj(1, 1.0)])


def test_overlong_samples_are_masked_but_counted():
    long, short = traj(0, 0.0, overlong=True), traj(0, 1.0)
    kept, _ = assign_advantages([long, short])
    assert len(kept) == 2  # the overlong sample still shaped its group's baseline
    assert loss_mask(long, True) == [0, 0, 0] and loss_mask(long, False) == [1, 1, 1]
    assert to_batch(kept, overlong_filter=True)["policy_mask"] == [[0, 0, 0], [1, 1, 1]]


def test_collate_aligns_response_tokens_and_splits():
    t1, t2 = traj(0, 1.0, n_resp=3), traj(0, 0.0, n_resp=1)
    t1.policy_mask, t1.expert_mask = [1, 0, 1], [0, 1, 0]
    kept, _ = assign_advantages([t1, t2])
    b = collate(to_batch(kept), pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 10, 11, 12], [1, 2, 10, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # per-token index j scores input token j+1: the response starts at index len(prompt)-1
    assert b["policy_mask"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 0]]
    assert b["expert_mask"].tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]
    assert torch.equal(b["behav_logp"][1], torch.tensor([0.0, -0.5, 0.0, 0.0]))
    shards = split_batch(to_batch(kept), 2)
    assert [len(s["input_ids"]) for s in shards] == [1, 1]
    assert [len(s["input_ids"]) for s in split_batch(to_batch(kept), 3)] == [1, 0, 1]
