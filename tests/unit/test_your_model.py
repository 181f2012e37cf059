"""Issue 24 (items 1, 3, 4), the parts that need no cluster: resume takes the run's saved config
(command line on top, printed as a diff, the saved config never overwritten, model/task changes
refused unless forced); data files read and validated before anything starts, the bundled GSM8K
sample and the configs that read it; the likely causes of an all-zero-reward batch; reward.fn
(imported at config load, run in the grading process under reward.timeout_s, handed the row)."""
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

from eapo_ray.config import ConfigError, load_config, to_dict
from eapo_ray.data import DataError, check_data, load_rows, resolve_path, warn_zero_reward, zero_reward_causes

ROOT = Path(__file__).resolve().parents[2]
MUL = ROOT / "configs" / "mul" / "eapo.yaml"


def _run_dir(tmp_path: Path, cfg) -> Path:
    """A run directory as a first attempt leaves it: its config.json."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return d


# ---- 1. resume is the run, continued ---------------------------------------------------------------

def test_resume_starts_from_the_saved_config_and_the_command_line_applies_on_top(tmp_path):
    """The issue's case: a configs/mul/eapo.yaml run resumed with `resume=DIR steps=4` and no
    --config. Before: the embedded defaults (tiny:arith, the tiny models) plus the command line."""
    first = load_config(MUL, ["steps=2", "rollout.prompts_per_batch=4"])
    d = _run_dir(tmp_path, first)
    cfg = load_config(None, [f"resume={d}", "steps=4"])
    assert cfg.steps == 4
    assert cfg.data.train == cfg.data.heldout == "tiny:arith-mul"
    assert cfg.model.policy == first.model.policy and "tiny_mul" in cfg.model.policy
    assert cfg.model.expert == first.model.expert and "tiny_mul" in cfg.model.expert
    assert cfg.rollout.prompts_per_batch == 4 and cfg.learner.lr == first.learner.lr  # the first's own values
    assert cfg.resume == str(d.resolve())


def test_resume_refuses_a_new_model_or_task_unless_forced(tmp_path):
    d = _run_dir(tmp_path, load_config(MUL, ["steps=2"]))
    for change, key in (("model.policy=" + str(ROOT / "eapo_ray/assets/tiny/policy"), "model.policy"),
                        ("data.train=tiny:arith", "data.train"), ("data.template=Q{problem}", "data.template")):
        with pytest.raises(ConfigError, match=rf"config key '{key}'.*resume_force=true"):
            load_config(None, [f"resume={d}", change])
    cfg = load_config(None, [f"resume={d}", "data.train=tiny:arith", "resume_force=true"])
    assert cfg.data.train == "tiny:arith"
    # the forced attempt's saved config (resume_force: true in it) does not waive the check for the next resume
    (d / "config.attempt2.json").write_text(json.dumps(to_dict(cfg)))
    with pytest.raises(ConfigError, match=r"config key 'model.policy'.*resume_force=true"):
        load_config(None, [f"resume={d}", "model.policy=" + str(ROOT / "eapo_ray/assets/tiny/policy")])
    # a --config file on a resume is a delta on the saved config, checked the same way
    with pytest.raises(ConfigError, match=r"config key 'data.chat_template' \(and .*model.policy"):
        load_config(ROOT / "configs" / "smollm2_cpu.yaml", [f"resume={d}"])


def test_resume_of_a_directory_that_is_not_a_run_is_an_error_naming_resume(tmp_path):
    with pytest.raises(ConfigError, match="config key 'resume'.*no config.json"):
        load_config(None, [f"resume={tmp_path}"])


def test_a_resume_keeps_config_json_writes_its_own_attempt_and_prints_the_diff(tmp_path, capsys):
    """Before: prepare_run_dir wrote the resumed config over config.json (the record of the first
    attempt lost). Now config.json stays byte for byte; each attempt's config goes beside it, and
    the next resume starts from the newest attempt."""
    from eapo_ray.driver.checkpoints import prepare_run_dir

    d = _run_dir(tmp_path, load_config(MUL, ["steps=2"]))
    saved = (d / "config.json").read_bytes()
    (d / "checkpoint").mkdir()
    (d / "checkpoint" / "latest").write_text("step2")
    cfg = load_config(None, [f"resume={d}", "steps=4", "learner.lr=2e-4"])
    name, run_dir = prepare_run_dir(cfg)
    assert (d / "config.json").read_bytes() == saved
    attempt = json.loads((d / "config.attempt2.json").read_text())
    assert attempt["steps"] == 4 and attempt["data"]["train"] == "tiny:arith-mul"
    out = capsys.readouterr().out
    assert "attempt 2" in out and "steps: 2 -> 4" in out and "learner.lr: 0.0001 -> 0.0002" in out, out
    assert "model.policy" not in out  # only what changed
    again = load_config(None, [f"resume={d}"])  # the next resume: the newest attempt's config
    assert again.steps == 4 and again.learner.lr == 2e-4
    prepare_run_dir(again)
    assert (d / "config.attempt3.json").exists() and "unchanged" in capsys.readouterr().out
    assert (d / "config.json").read_bytes() == saved


def test_the_default_run_checkpoints_during_the_demo():
    cfg = load_config()
    assert 1 <= cfg.checkpoint_every < cfg.steps  # a Ctrl-C'd demo has a checkpoint to resume from


def test_run_config_json_reads_back_as_a_config_file(tmp_path):
    """The evaluation hint names --config <run>/config.json: JSON read as JSON (YAML 1.1 would read
    1e-05 as a string)."""
    cfg = load_config(MUL, ["learner.lr=1e-05"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(to_dict(cfg)))
    assert to_dict(load_config(path)) == to_dict(cfg)


# ---- 3. your data, checked before anything starts ----------------------------------------------------

def test_bad_data_stops_the_run_before_anything_starts(tmp_path, monkeypatch):
    """A malformed row is found by the driver before Ray, Serve or a learner starts (before: in
    RolloutWorker.__init__, after all of them), naming file:line; no run directory is made."""
    import eapo_ray.driver.run as driver_run

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n\n{"problem": "2+2", "answer": \n')

    def started(*a, **k):
        raise AssertionError("the system started before the data was checked")

    monkeypatch.setattr(driver_run, "start_system", started)
    cfg = load_config(None, [f"data.train={bad}", f"run_root={tmp_path / 'runs'}"])
    with pytest.raises(DataError, match=rf"{bad}:3: not valid JSON"):
        driver_run.run(cfg)
    assert not (tmp_path / "runs").exists()
    from eapo_ray.launch import main

    missing = tmp_path / "missing.jsonl"
    assert main([f"data.heldout={missing}", f"run_root={tmp_path / 'runs'}"]) == 2  # error: ..., exit 2


def test_check_data_reads_whole_files_and_counts_rows(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text("".join(json.dumps({"problem": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(10))
                    + '{"problem": "x"}\n')  # row 11: past num_train, still read
    cfg = load_config(None, [f"data.train={good}", "data.num_train=5", "data.heldout=tiny:arith"])
    with pytest.raises(DataError, match=rf"{good}:11: missing field\(s\) \['answer'\]"):
        check_data(cfg)
    good.write_text("".join(json.dumps({"problem": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(10)))
    line = check_data(cfg)
    assert "train 5 of 10 rows" in line and "(data.num_train=5)" in line
    assert "held-out 150 problems drawn from the bundled tiny:arith" in line


def test_the_bundled_gsm8k_sample_is_small_licensed_and_read_by_the_smollm2_configs(tmp_path, monkeypatch):
    data = ROOT / "eapo_ray" / "assets" / "data"
    files = sorted(data.glob("*.jsonl"))
    assert [f.name for f in files] == ["gsm8k_test.jsonl", "gsm8k_train.jsonl"]
    assert sum(f.stat().st_size for f in files) < 1 << 20
    assert "MIT" in (data / "README.md").read_text() and "MIT License" in (data / "LICENSE").read_text()
    assert len(load_rows(str(data / "gsm8k_train.jsonl"))) == 300 and len(load_rows(str(data / "gsm8k_test.jsonl"))) == 100
    monkeypatch.chdir(tmp_path)  # a fresh clone, run from anywhere: no ../shared/data needed
    for name in ("smollm2_cpu.yaml", "smollm2_eval.yaml"):
        assert "shared/data" not in (ROOT / "configs" / name).read_text()
    cfg = load_config(ROOT / "configs" / "smollm2_cpu.yaml")
    assert resolve_path(cfg.data.train) == data / "gsm8k_train.jsonl"
    assert resolve_path(cfg.data.heldout) == data / "gsm8k_test.jsonl"
    assert "train 200 of 300 rows" in check_data(cfg)


def test_zero_reward_causes_name_the_template_the_length_and_the_chat_template(capsys):
    bare = load_config(None, ["model.policy=my/model"])  # the case: your model, the tiny task's template
    causes = zero_reward_causes(bare, tokenizer_has_chat_template=True, overlong_frac=0.9, formatted_frac=0.0)
    text = "\n".join(causes)
    assert "data.template never mentions the answer tag <answer>" in text
    assert "90% of the responses were cut" in text and "rollout.max_response_tokens=160" in text
    assert "data.chat_template is false" in text
    told = load_config(None, ["data.template='Put the answer in <answer></answer>. {problem}'", "data.chat_template=true"])
    causes = zero_reward_causes(told, tokenizer_has_chat_template=True, overlong_frac=0.0, formatted_frac=0.5)
    assert not any("data.template" in c or "cut by" in c or "data.chat_template" in c for c in causes), causes
    # printed once per process, from a batch's stats that carry them
    import eapo_ray.data as data_mod

    data_mod._WARNED_ZERO_REWARD.clear()
    assert not warn_zero_reward({"samples": 8})
    assert warn_zero_reward({"samples": 8, "zero_reward_causes": ["x happened"]})
    assert not warn_zero_reward({"samples": 8, "zero_reward_causes": ["x happened"]})
    out = capsys.readouterr().out
    assert out.count("zero reward on all 8 samples") == 1 and "[eapo]   - x happened" in out
    data_mod._WARNED_ZERO_REWARD.clear()


def test_a_length_budget_that_cuts_answers_is_warned_about_once(capsys):
    """A rollout batch with >= 10% of its responses cut by the length budget gets one warning that
    names both budget keys (on tiny:arith-chain a 64-token turn cut every 6-operation answer and RL
    learned short wrong chains with no message); below 10% nothing; the text leaves the stats."""
    import eapo_ray.data as data_mod
    from eapo_ray.data import overlong_warning, warn_overlong

    cfg = load_config(None, ["rollout.max_new_tokens_per_turn=64"])
    assert overlong_warning(cfg, 0.05) is None
    text = overlong_warning(cfg, 0.24)
    assert "24%" in text and "rollout.max_new_tokens_per_turn=64" in text and "rollout.max_response_tokens=160" in text
    data_mod._WARNED_OVERLONG.clear()
    assert not warn_overlong({"samples": 8})
    stats = {"samples": 8, "overlong_warning": text}
    assert warn_overlong(stats) and "overlong_warning" not in stats
    assert not warn_overlong({"samples": 8, "overlong_warning": text})
    assert capsys.readouterr().out.count("cut by the length budget") == 1
    data_mod._WARNED_OVERLONG.clear()


# ---- 4. your reward ------------------------------------------------------------------------------

REWARD_MODULE = '''
import multiprocessing, os, time

def exact(response, gold, row):
    """1.0 when the answer tag holds the gold answer, 0.5 for the row's "partial" answer, else 0."""
    from eapo_ray.reward import extract_answer
    got = extract_answer(response)
    if got == gold:
        return 1.0
    return 0.5 if got == row.get("partial") else 0.0

def where(response, gold, row):
    return float(os.getpid())

def slow(response, gold, row):
    time.sleep(30)
    return 1.0

def broken(response, gold, row):
    raise KeyError("no such field")

def not_a_number(response, gold, row):
    return "1.0"
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(REWARD_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))  # the grading process is spawned with this sys.path
    # a fresh grading pool: one an earlier test in this process spawned lacks tmp_path on its sys.path
    # (a run's grading process is spawned by the rollout actor, whose path already has the user's module)
    from eapo_ray.algo import reward as reward_mod

    grader = reward_mod._Grader()
    monkeypatch.setattr(reward_mod, "_grader", grader)
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)
    if grader._pool is not None:
        grader._pool.terminate()


def test_reward_fn_is_imported_at_config_load_with_a_clear_error():
    with pytest.raises(ConfigError, match=r"config key 'reward.fn': cannot import module 'no_such_module'"):
        load_config(None, ["reward.fn=no_such_module:f"])
    with pytest.raises(ConfigError, match=r"config key 'reward.fn': 'eapo_ray.data' must look like"):
        load_config(None, ["reward.fn=eapo_ray.data"])
    with pytest.raises(ConfigError, match=r"config key 'reward.fn': module 'eapo_ray.data' has no function 'nope'"):
        load_config(None, ["reward.fn=eapo_ray.data:nope"])


def test_reward_fn_scores_in_the_grading_process_with_the_row(reward_module, capsys):
    import os

    from eapo_ray.algo.reward import RewardConfig, quick_score, score

    # a generous timeout for the calls that must answer: the first one also spawns the grading process,
    # which on a loaded 2-core machine can take longer than the default
    cfg = load_config(None, [f"reward.fn={reward_module}:exact", "reward.timeout_s=60"]).reward
    assert quick_score("<answer>7</answer>", "7", cfg) is None  # never graded inline: it goes to the process
    r = score("<answer>7</answer>", "7", cfg, row={"problem": "3+4", "answer": "7"})
    assert (r.reward, r.correct, r.formatted) == (1.0, True, True)
    r = score("<answer>6</answer>", "7", cfg, row={"problem": "3+4", "answer": "7", "partial": "6"})
    assert (r.reward, r.correct, r.formatted) == (0.5, False, True)  # the row's own fields reach it
    assert score("<answer>5</answer>", "7", cfg, row={}).reward == 0.0
    pid = score("x", "7", RewardConfig(fn=f"{reward_module}:where", timeout_s=60), row={}).reward
    assert pid != os.getpid()  # process isolation: the one-process grading pool, as math-verify
    # a hang scores 0 within reward.timeout_s; a crash or a non-number scores 0, reported once
    slow = score("x", "7", RewardConfig(fn=f"{reward_module}:slow", timeout_s=1.0), row={})
    assert (slow.reward, slow.correct) == (0.0, False)
    assert score("x", "7", RewardConfig(fn=f"{reward_module}:broken", timeout_s=60), row={}).reward == 0.0
    assert score("x", "7", RewardConfig(fn=f"{reward_module}:not_a_number", timeout_s=60), row={}).reward == 0.0
    err = capsys.readouterr().err
    assert "reward.fn my_rewards:broken failed (KeyError" in err and "my_rewards:not_a_number failed (TypeError" in err


def test_ctrl_c_before_the_first_checkpoint_names_a_resume_that_works(tmp_path, monkeypatch, capsys):
    """Before: 'no checkpoint yet: set checkpoint_every to resume' (no command), and resume= of such
    a directory was refused. Now the hint is `resume=DIR`, and that resume starts the same run over
    from step 0 with its saved config. (start_system is replaced by a Ctrl-C: what is tested is the
    driver's handling before and after it, not the cluster.)"""
    import eapo_ray.driver.run as driver_run

    seen = []

    def interrupted(cfg, run_name, run_dir, s):
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(driver_run, "start_system", interrupted)
    cfg = load_config(MUL, ["steps=3", f"run_root={tmp_path}", "run_name=r"])
    with pytest.raises(KeyboardInterrupt):
        driver_run.run(cfg)
    hint = re.search(r"continue with: (python -m eapo_ray\.launch resume=(\S+))", capsys.readouterr().err)
    assert hint and Path(hint.group(2)) == tmp_path / "r", hint
    again = load_config(None, [f"resume={hint.group(2)}"])  # the command as printed
    with pytest.raises(KeyboardInterrupt):
        driver_run.run(again)
    assert seen[-1].resume == "" and seen[-1].steps == 3 and seen[-1].data.train == "tiny:arith-mul"  # from step 0
    assert "no checkpoint yet: starting over from step 0" in capsys.readouterr().out


def test_a_reward_fn_whose_import_is_slower_than_the_timeout_still_scores(tmp_path, monkeypatch, capsys):
    """The grading process's spawn and the user module's import are not charged to the first grade
    (before: a module importing for longer than reward.timeout_s timed out every grade, each on a fresh
    process, silently: every reward 0); a grade that does time out is reported once. And reward.fn
    without a timeout is refused (it would run inline: a hang would stall the rollout)."""
    from eapo_ray.algo import reward as reward_mod

    (tmp_path / "slow_import_rewards.py").write_text(
        "import time\ntime.sleep(2.5)\n\ndef one(response, gold, row):\n    return 1.0\n\n"
        "def hang(response, gold, row):\n    time.sleep(30)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    grader = reward_mod._Grader()
    monkeypatch.setattr(reward_mod, "_grader", grader)
    monkeypatch.setattr(reward_mod, "_REPORTED", set())
    try:
        cfg = reward_mod.RewardConfig(fn="slow_import_rewards:one", timeout_s=1.0)
        assert reward_mod.score("x", "7", cfg, row={}).reward == 1.0
        assert reward_mod.score("x", "7", reward_mod.RewardConfig(fn="slow_import_rewards:hang", timeout_s=1.0),
                                row={}).reward == 0.0
        assert "reward.fn slow_import_rewards:hang failed (TimeoutError" in capsys.readouterr().err
    finally:
        sys.modules.pop("slow_import_rewards", None)
        if grader._pool is not None:
            grader._pool.terminate()
    with pytest.raises(ConfigError, match="reward.timeout_s"):
        load_config(None, ["reward.fn=eapo_ray.algo.reward:load_fn", "reward.timeout_s=0"])
