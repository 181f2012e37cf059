"""One DeepSpeed learner (a real Ray actor, gloo) moves the policy the way the advantages say,
and publishes weights that a rollout engine can load."""
import pytest
import torch

from eapo_ray.algo.batching import collate
from eapo_ray.algo.logprobs import token_logprobs
from eapo_ray.buffer import BufferItem
from eapo_ray.config import TINY_DIR, load_config
from eapo_ray.learner.group import LearnerGroup
from eapo_ray.rollout.hf_engine import HFEngine

pytestmark = pytest.mark.slow


def test_update_follows_advantages_and_weights_sync(ray_local):
    ray = ray_local
    cfg = load_config(None, ["learner.lr=5e-5", "rollout.prompts_per_batch=1", "rollout.group_size=2"])
    engine = HFEngine(str(TINY_DIR / "policy"))
    tok = engine.tokenizer
    prompt = tok("Q:(3+4)*5\nA:")["input_ids"]
    good = tok.encode("3+4=7;7*5=35;<answer>\\boxed{35}</answer>", add_special_tokens=False)
    bad = tok.encode("<answer>\\boxed{30}</answer>", add_special_tokens=False)
    with torch.no_grad():
        behav = []
        for resp in (good, bad):
            ids = torch.tensor([prompt + resp])
            behav.append(token_logprobs(engine.model(input_ids=ids).logits, ids)[0, len(prompt) - 1:].tolist())
    batch = {"input_ids": [prompt + good, prompt + bad], "prompt_len": [len(prompt)] * 2,
             "policy_mask": [[1] * len(good), [1] * len(bad)], "expert_mask": [[0] * len(good), [0] * len(bad)],
             "behav_logp": behav, "advantage": [1.0, -1.0], "version": [0, 0]}

    def seq_logp(model):
        b = collate(batch, tok.pad_token_id)
        with torch.no_grad():
            lp = token_logprobs(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["input_ids"])
        return (lp * b["policy_mask"]).sum(1)

    before = seq_logp(engine.model)
    group = LearnerGroup(cfg, "test")
    try:
        assert group.setup() == 0
        ref = ray.put(batch)
        stats = group.train_step([BufferItem(0, [ref], 2)])
        assert stats["learner_samples"] == 2 and abs(stats["is_weight_mean"] - 1.0) < 1e-3
        version, box, _ = group.publish()
        assert version == 1
        engine.load_weights(ray.get(box[0]), version)
    finally:
        group.shutdown()
    after = seq_logp(engine.model)
    assert after[0] > before[0] and after[1] < before[1]
    assert engine.version == 1


def test_learners_that_cannot_be_placed_fail_clearly_within_the_bound(ray_local):
    """More learner CPUs than the cluster has: a clear error naming the ask, the cluster's
    resources and the config keys, after learner.placement_timeout_s (not a hang); the
    placement group is removed."""
    import time

    from ray.util import placement_group_table

    from eapo_ray.learner.group import PlacementError

    cfg = load_config(None, ["learner.num_learners=2", "learner.num_cpus=3", "learner.placement_timeout_s=3"])
    t0 = time.time()
    with pytest.raises(PlacementError, match=r"2 learner\(s\) could not be placed within learner.placement_timeout_s=3s"
                                             r": they ask for 2 x \{CPU 3\} = CPU 6; the cluster has CPU 4") as e:
        LearnerGroup(cfg, "unplaceable")
    assert time.time() - t0 < 30
    assert "learner.num_cpus" in str(e.value)
    states = [pg["state"] for pg in placement_group_table().values() if pg["name"] == "unplaceable-learners"]
    assert states and all(st == "REMOVED" for st in states), states


def test_learners_pinned_to_a_node_resource_no_node_has_fail_clearly(ray_local):
    """learner.node_resource names a resource no node advertises (a cluster whose learner nodes
    are not up, or a typo): every bundle asks one unit of it, so the learners are placed nowhere
    else; the error names it (asked 2, the cluster has none) and the strategy."""
    from eapo_ray.learner.group import PlacementError, reserve_learners

    cfg = load_config(None, ["learner.num_learners=2", "learner.node_resource=learner_node",
                             "learner.placement_strategy=STRICT_PACK", "learner.placement_timeout_s=2"])
    with pytest.raises(PlacementError, match=r"2 x \{CPU 0.5, learner_node 1\} = CPU 1, learner_node 2; "
                                             r"the cluster has CPU 4 .*learner.placement_strategy=STRICT_PACK"):
        reserve_learners(cfg, "pinned")


def test_a_rebuilt_learner_group_reuses_the_reserved_placement_group(ray_local):
    """The driver reserves the learners' placement group before the other parts start and a
    rebuild (driver/recovery.py) hands the old group's to the new one: the reservation is never
    released in between (another role's pending actor could take its GPUs). The new learners run
    in the same bundles; the last shutdown removes the group."""
    ray = ray_local
    from ray.util import placement_group_table

    from eapo_ray.learner.group import reserve_learners

    cfg = load_config(None, ["learner.num_learners=2"])
    pg = reserve_learners(cfg, "reuse")
    group = LearnerGroup(cfg, "reuse", pg=pg)
    try:
        ray.get([a.endpoint.remote() for a in group.actors], timeout=120)
        group.shutdown(keep_placement=True)
        assert placement_group_table(pg)["state"] == "CREATED"
        group = LearnerGroup(cfg, "reuse", generation=1, pg=pg)
        assert group.pg is pg
        ray.get([a.endpoint.remote() for a in group.actors], timeout=120)  # the new ranks run in its bundles
    finally:
        group.shutdown()
    assert placement_group_table(pg)["state"] == "REMOVED"
