"""Where each role of a run lands on a multi-node cluster (issue 22, item 4): the layout of
configs/gpu_paper_7b_32b.yaml (a learner node, a rollout node holding the rollout engines and the
evaluator, expert nodes; a GPU-less head running the driver), scaled down, on four raylets on this
machine (ray.cluster_utils.Cluster).

THE GPUs ARE FAKE: each raylet advertises `num_gpus` it does not have (placement needs no real
GPU). Everything else is the real run: `start_system` (the driver's own start-up: the learners'
placement group, the Serve expert, the buffer, the rollout actors, the evaluator, the DeepSpeed
learner group over gloo) with the bundled tiny models on CPU engines; the actors ask for the fake
GPUs (Ray only sets CUDA_VISIBLE_DEVICES for them, which the CPU torch ignores). The node
resources' names and the learners' strategy are read from the GPU config itself."""
import time
from pathlib import Path

import pytest

from eapo_ray.config import load_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "configs" / "gpu_paper_7b_32b.yaml"


def scaled_config(paper, **extra):
    """The paper config's placement (node resources, strategy, one GPU per learner / rollout engine /
    evaluator) at 2 learners, 2 rollout actors + the evaluator, 1-2 expert replicas of 1 GPU, on the
    tiny models and CPU engines."""
    lc, r, e, ex = paper.learner, paper.rollout, paper.eval, paper.expert
    over = {"learner.num_learners": 2, "learner.num_gpus": 1, "learner.num_cpus": 0.5,
            "learner.node_resource": lc.node_resource, "learner.placement_strategy": lc.placement_strategy,
            "learner.placement_timeout_s": 60,
            "rollout.num_actors": 2, "rollout.num_gpus": 1, "rollout.num_cpus": 0.5,
            "rollout.node_resource": r.node_resource,
            "eval.num_gpus": 1, "eval.num_cpus": 0.5, "eval.node_resource": e.node_resource,
            "expert.num_gpus": 1, "expert.num_cpus": 0.25, "expert.min_replicas": 1, "expert.max_replicas": 2,
            "expert.node_resource": ex.node_resource, "expert.start_timeout_s": 120,
            "rollout.prompts_per_batch": 4, "data.num_heldout": 8, **extra}
    return load_config(None, [f"{k}={v}" for k, v in over.items()])


def actor_nodes(ray, timeout_s: float = 120) -> dict:
    """{actor class name: [node id of each live actor]} once no actor is pending (GCS actor table)."""
    from ray._private import state

    deadline = time.time() + timeout_s
    while True:
        actors = [a for a in state.actors().values() if a["State"] != "DEAD"]
        pending = [a["ActorClassName"] for a in actors if a["State"] != "ALIVE"]
        if not pending:
            out: dict = {}
            for a in actors:
                out.setdefault(a["ActorClassName"], []).append(a["Address"]["NodeID"])
            return out
        assert time.time() < deadline, f"actors still pending after {timeout_s}s: {pending}"
        time.sleep(0.5)


def test_each_role_lands_on_its_own_nodes(tmp_path):
    """The learners (STRICT_PACK on the node advertising learner.node_resource) all on the learner
    node, the rollout actors and the evaluator on the rollout node, the expert replica on the
    expert node, the buffer on the driver's (GPU-less) head; and nothing of another role on the
    learner node. The learner node's GPUs are reserved before anything else starts: with the old
    start order (learners last, PACK, GPU only) the evaluator, which prefers the driver's node and
    then takes any free GPU, could take one, leaving the learners split over nodes or starved.
    Last, a group shaped like the old learners' ({CPU, GPU}, PACK, no node resource) asked for
    after the other roles lands on the one GPU left, the expert node's, and the driver's check
    (shared_learner_nodes) names it. (Run on the old code with the old 7B keys, this layout put
    both rollout actors on the learner node and both learners on the rollout node: docs/gpu.md.)"""
    import ray
    from ray.cluster_utils import Cluster

    from eapo_ray.driver.system import System, shared_learner_nodes, start_system

    paper = load_config(PAPER)
    lc, r, e, ex = paper.learner, paper.rollout, paper.eval, paper.expert
    assert lc.node_resource and r.node_resource and e.node_resource and ex.node_resource, \
        "the paper config pins every role to its node group"
    cfg = scaled_config(paper)
    if ray.is_initialized():  # another module's local cluster
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    s = System()
    try:
        # the scaled nodes: each advertises its role's resource, one unit per GPU (as cluster/ray-cluster.yaml)
        learner = cluster.add_node(num_cpus=2, num_gpus=2, resources={lc.node_resource: 2})
        roll_units = 3 if e.node_resource == r.node_resource else 2
        rollout = cluster.add_node(num_cpus=2, num_gpus=3, resources={r.node_resource: roll_units})
        if e.node_resource != r.node_resource:
            cluster.add_node(num_cpus=1, num_gpus=1, resources={e.node_resource: 1})
        expert = cluster.add_node(num_cpus=1, num_gpus=2, resources={ex.node_resource: 2})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        head_id = ray.get_runtime_context().get_node_id()
        t0 = time.time()
        start_system(cfg, "layout", tmp_path, s)
        nodes = actor_nodes(ray)
        took = time.time() - t0
        from ray.util import placement_group_table

        bundles = placement_group_table(s.learner_pg)
        assert bundles["strategy"] == lc.placement_strategy and set(bundles["bundles_to_node_id"].values()) == {
            learner.node_id}, bundles
        assert nodes["Learner"] == [learner.node_id] * 2, nodes
        assert sorted(nodes["RolloutWorker"]) == [rollout.node_id] * 2, nodes
        eval_node = rollout.node_id if e.node_resource == r.node_resource else None
        assert len(nodes["Evaluator"]) == 1 and nodes["Evaluator"][0] != learner.node_id, nodes
        if eval_node:
            assert nodes["Evaluator"] == [eval_node], nodes
        replicas = [n for cls, ns in nodes.items() if cls.startswith("ServeReplica:") for n in ns]
        assert replicas and set(replicas) == {expert.node_id}, nodes
        assert nodes["TrajectoryBuffer"] == [head_id], nodes
        on_learner_node = sorted(cls for cls, ns in nodes.items() for n in ns if n == learner.node_id)
        assert on_learner_node == ["Learner", "Learner"], on_learner_node
        assert shared_learner_nodes(cfg, s.learner_pg) == []
        # The old learners' group (PACK, {CPU, GPU}, no node resource) asked for now, after the other
        # roles, as the old start order did: the one free GPU left is the expert node's (for its second
        # replica), and that is where it lands; the driver's check names it
        from ray.util.placement_group import placement_group, remove_placement_group

        old = placement_group([{"CPU": 0.5, "GPU": 1}], strategy="PACK", name="old-style-learners")
        try:
            assert old.wait(timeout_seconds=30)
            assert set(placement_group_table(old)["bundles_to_node_id"].values()) == {expert.node_id}
            (warning,) = shared_learner_nodes(cfg, old)
            assert f"expert.node_resource={ex.node_resource}" in warning and "learner.node_resource" in warning
        finally:
            remove_placement_group(old)
        print(f"layout placed in {took:.1f}s: learners {nodes['Learner']}, rollout {nodes['RolloutWorker']}, "
              f"evaluator {nodes['Evaluator']}, expert {replicas}")
    finally:
        s.teardown()
        ray.shutdown()
        cluster.shutdown()
