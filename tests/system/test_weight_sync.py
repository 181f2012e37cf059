"""The NCCL weight-sync glue (eapo_ray/weight_sync.py) on CPU. The NCCL broadcast itself
needs GPUs and is not run here (benchmarks/gpu_check.py is the GPU check); these tests
cover our two pieces around vLLM's weight-transfer API: the weight source the trainer
iterates, and the client that gives each independent engine its own NCCL ranks. The
rollout actors in the client test are recording stand-ins for vLLM engines on GPUs."""
import pytest
import torch

pytest.importorskip("vllm")


def test_deepspeed_source_matches_vllm_contract():
    from transformers import AutoModelForCausalLM

    from eapo_ray.config import TINY_DIR
    from eapo_ray.weight_sync import _weight_source_cls

    model = AutoModelForCausalLM.from_pretrained(TINY_DIR / "policy")
    src = _weight_source_cls()(model, zero3=False)
    meta = src.metadata()
    pairs = list(src)
    assert [m.name for m in meta] == [n for n, _ in pairs]
    assert all(tuple(t.shape) == m.shape and t.dtype == m.dtype for m, (_, t) in zip(meta, pairs))
    assert "lm_head.weight" not in [m.name for m in meta]  # tied: sent once, as the embedding
    groups = list(src.iter_groups())  # vLLM's own order check over our names
    assert sum(len(names) for names, _ in groups) == len(meta)
    sd = model.state_dict()
    assert all(torch.equal(t, sd[n]) for n, t in pairs)


def test_fleet_client_gives_each_engine_its_own_ranks(ray_local):
    import ray

    from eapo_ray.weight_sync import _client_cls

    @ray.remote
    class Recorder:
        def __init__(self):
            self.calls = []

        def init_weight_transfer_engine(self, request):
            self.calls.append(("init", request.init_info))

        def finish_weight_update(self, version=None):
            self.calls.append(("finish", version))

        def get(self):
            return self.calls

    actors = [Recorder.remote() for _ in range(3)]
    client = _client_cls()(actors, tp=2)
    client.init_weight_transfer_engine({"master_address": "10.0.0.1", "master_port": 1234, "world_size": 7,
                                        "rank_offset": 1})
    client.version = 5
    client.finish_weight_update()
    calls = ray.get([a.get.remote() for a in actors])
    assert [c[0][1]["rank_offset"] for c in calls] == [1, 3, 5]
    assert all(c[0][1]["world_size"] == 7 and c[0][1]["master_port"] == 1234 for c in calls)
    assert all(c[1] == ("finish", 5) for c in calls)


def test_load_published_follows_generation_then_version(ray_local):
    """After the learner group is rebuilt from a checkpoint, version numbers go back and are
    reused for other weights: (generation, version) decides, so an actor that held v6 loads the
    rebuilt group's v4, and the evaluator never keeps a pre-crash v6 for the redone v6."""
    import torch

    from eapo_ray.weight_sync import load_published, publish

    class Eng:
        version = 0

        def load_weights(self, sd, version):
            self.sd, self.version = sd, version

    e = Eng()
    assert load_published(e, publish(6, {"w": torch.ones(1)})) and e.version == 6
    assert not load_published(e, publish(4, {"w": torch.zeros(1)}))  # an older version of the same group
    assert load_published(e, publish(4, {"w": torch.zeros(1)}, generation=1)) and e.version == 4
    assert not load_published(e, publish(4, {"w": torch.zeros(1)}, generation=1))
    assert load_published(e, publish(6, {"w": torch.full((1,), 2.0)}, generation=1), newer_only=False)
    assert float(e.sd["w"]) == 2.0 and e.weights_generation == 1
    assert not load_published(e, None)
