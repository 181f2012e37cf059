"""The GPU memory plan (`--plan`, eapo_ray/plan.py, eapo_ray/algo/memory.py): the arithmetic against
hand-computed numbers, the learner path it assumes, both GPU configs fitting (and not fitting as they
were before learner.gradient_checkpointing / max_tokens_per_microbatch were set), the key named
when a role does not fit, and the launcher's check stopping a GPU run before anything starts.
No GPU is used: the plan is arithmetic on the config and the model shapes."""
import json

import pytest

from eapo_ray.algo import memory as mem
from eapo_ray.config import load_config
from eapo_ray.launch import main
from eapo_ray.plan import PlanError, check_before_start, model_shape, plan

SMALL = mem.ModelShape(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)
P7B, P15B = "configs/gpu_paper_7b_32b.yaml", "configs/gpu_node8_1p5b.yaml"


def test_params_and_states_by_hand():
    # embed 80 + lm_head 80 + 2 layers x (q 64 + k 32 + v 32 + o 64 + mlp 384 + norms 16) + final norm 8
    assert SMALL.params == 80 + 80 + 2 * 592 + 8 == 1352
    st = mem.model_state_bytes(1352, bf16=True, zero_stage=2, world=4)
    assert st == {"weights": 2704, "gradients": 676, "adam m, v (fp32)": 2704, "fp32 master": 1352,
                  "fp32 gradients": 1352}
    z3 = mem.model_state_bytes(1352, bf16=True, zero_stage=3, world=4)
    assert sum(z3.values()) == 20 * 1352 / 4  # everything partitioned: 2 + 2 + 4 + 8 + 4 B per parameter
    fp32 = mem.model_state_bytes(1352, bf16=False, zero_stage=0, world=1)
    assert sum(fp32.values()) == 16 * 1352  # weights, gradients, Adam m and v
    # the shipped shapes give the published parameter counts
    assert round(model_shape("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "k").params / 1e9, 2) == 7.62
    assert round(model_shape("Qwen/QwQ-32B", "k").params / 1e9, 2) == 32.76
    assert model_shape("smollm2-135m", "k").params == 134_515_008


def test_activations_by_hand():
    # per token and layer, bf16: norms 2 x (4 + 4) x 8 = 128, attention 2 x (5 x 8 + 4 x 4 + 2 x 8) = 144
    # (GQA: k, v repeated), MLP 4 x 2 x 16 = 128
    assert mem.layer_activation_bytes(SMALL, 2) == 400
    temps, outside = 2 * (2 * 8 + 2 * 16), (4 + 4) * 8 + 2 * 2 * 8
    assert mem.activation_bytes(SMALL, 10, 2, checkpointing=False) == 10 * (2 * 400 + temps + outside)
    # checkpointing: each layer keeps its input (d x h), one layer is recomputed at a time
    assert mem.activation_bytes(SMALL, 10, 2, checkpointing=True) == 10 * (2 * 16 + 400 + temps + outside)
    assert mem.logits_bytes(SMALL, 10, 2, 1024) == 10 * 10 * 18
    assert mem.logits_bytes(SMALL, 5000, 2, 1024) == 1024 * 10 * 18  # one chunk of LOGP_CHUNK_TOKENS positions


def test_vllm_kv_cache_by_hand():
    s7 = model_shape("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "k")
    assert s7.kv_bytes_per_token(2) == 2 * 28 * 4 * 128 * 2 == 57344  # 56 KiB
    assert s7.kv_bytes_per_token(2, tp=8) == 2 * 28 * 1 * 128 * 2  # 4 kv heads over 8 GPUs: replicated
    v = mem.vllm_memory(s7, 80e9, 0.85, 1, 2)
    assert v.kv_cache == 0.85 * 80e9 - s7.params * 2 - mem.VLLM_OTHER_BYTES
    assert v.kv_tokens == int(v.kv_cache // 57344)


def _ls(**kw):
    base = dict(world=1, zero_stage=0, bf16=True, gradient_checkpointing=False, max_tokens_per_microbatch=0,
                length_buckets=True, share_prompts=True, minibatches=1, epochs=1, rows=8, prompts=1,
                prompt_tokens=100, response_tokens=900)
    return mem.LearnerShape(**{**base, **kw})


def test_learner_paths():
    """The paths of learner/actor.py train_step: shared prompts, every bucket's forward before any
    backward, and micro-batches; the padded tokens live at once in the worst case."""
    assert mem.learner_path(_ls())[1:] == (8000, True)
    name, tokens, shared = mem.learner_path(_ls(gradient_checkpointing=True))  # no sharing with checkpointing
    assert name.startswith("_train_buckets") and (tokens, shared) == (8000, False)
    assert mem.learner_path(_ls(minibatches=2))[0].startswith("micro-batches (length buckets")
    assert mem.learner_path(_ls(zero_stage=3))[0].startswith("micro-batches (the whole minibatch")
    assert mem.learner_path(_ls(max_tokens_per_microbatch=2500))[1] == 2000  # 2 rows of 1000 under the cap
    assert mem.learner_path(_ls(max_tokens_per_microbatch=500))[1] == 1000  # a longer row goes alone
    # checkpointing and token micro-batches each shrink the estimate
    full = mem.learner_memory(SMALL, _ls(share_prompts=False)).total
    assert mem.learner_memory(SMALL, _ls(share_prompts=False, gradient_checkpointing=True)).total < full
    assert mem.learner_memory(SMALL, _ls(share_prompts=False, max_tokens_per_microbatch=1000)).total < full


def test_gpu_configs_fit(capsys):
    for f in (P7B, P15B):
        assert main(["--config", f, "--plan"]) == 0, capsys.readouterr()
        out = capsys.readouterr().out
        assert out.count(" fits") == 4 and "DOES NOT FIT" not in out  # learner, rollout, evaluator, expert


@pytest.mark.parametrize("cfg_file,overrides,key", [
    # the configs as they were: no checkpointing, no token cap
    (P7B, ["learner.gradient_checkpointing=false", "learner.max_tokens_per_microbatch=0"],
     "learner.gradient_checkpointing=true learner.max_tokens_per_microbatch=18432"),
    (P15B, ["learner.gradient_checkpointing=false"], "learner.gradient_checkpointing=true"),
    (P7B, ["learner.max_tokens_per_microbatch=0"], "learner.max_tokens_per_microbatch=18432"),
    (P7B, ["learner.max_tokens_per_microbatch=200000"], "learner.max_tokens_per_microbatch=18432"),
    (P7B, ["rollout.vllm.gpu_memory_utilization=0.2"], "rollout.vllm.tensor_parallel_size"),
    (P7B, ["rollout.vllm.gpu_memory_utilization=0.24"], "raise rollout.vllm.gpu_memory_utilization"),
    (P7B, ["rollout.vllm.gpu_memory_utilization=0.99"], "lower rollout.vllm.gpu_memory_utilization"),
    (P7B, ["expert.vllm.tensor_parallel_size=1", "expert.num_gpus=1", "expert.vllm.gpu_memory_utilization=0.8"],
     "expert.vllm.tensor_parallel_size"),
    (P15B, ["gpu_memory_gb=24"], "learner.max_tokens_per_microbatch=10240"),
])
def test_does_not_fit_names_the_key(capsys, cfg_file, overrides, key):
    assert main(["--config", cfg_file, *overrides, "--plan"]) == 1
    cap = capsys.readouterr()
    assert "DOES NOT FIT" in cap.out and key in cap.err, cap.err


def test_cpu_config_prints_and_passes(capsys):
    assert main(["--plan"]) == 0
    out = capsys.readouterr().out
    assert "learner rank" in out and "nothing is placed on a GPU" in out
    assert main(["--config", "configs/smollm2_cpu.yaml", "--plan"]) == 0  # a name from eapo_ray.models, not built
    assert main(["gpu_memory_gb=0", "--plan"]) == 2  # validated: a config error
    assert "gpu_memory_gb" in capsys.readouterr().err


def test_local_model_dir_and_unknown_model(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
                                               "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 10}))
    assert model_shape(str(d), "model.policy") == SMALL
    assert main([f"model.policy={tmp_path / 'nowhere'}", "--plan"]) == 1
    assert "config key 'model.policy'" in capsys.readouterr().err


def test_launch_check_stops_a_gpu_run_before_anything_starts(tmp_path, capsys):
    """run() raises before it makes a run directory (or starts Ray) when a GPU role does not fit;
    on a CPU config the check does nothing."""
    from eapo_ray.driver.run import run

    bad = load_config(P15B, ["learner.gradient_checkpointing=false", f"run_root={tmp_path}"])
    with pytest.raises(PlanError, match="learner.gradient_checkpointing"):
        run(bad)
    assert not list(tmp_path.iterdir())
    check_before_start(load_config(None, []))  # CPU: nothing to check, no error
    check_before_start(load_config(P15B, []))  # the fixed GPU config passes
    unknown = load_config(P15B, ["model.policy=org/unknown-model"])
    check_before_start(unknown)  # a shape it cannot find is reported, not fatal
    assert "not checked" in capsys.readouterr().err
    assert {r.name for r in plan(load_config(P7B, []))} == {"learner rank", "rollout engine", "evaluator",
                                                            "expert replica"}
