"""Issue 24 end to end (real local Ray, DeepSpeed learner, tiny models): a configs/mul/eapo.yaml
run resumed with `resume=DIR steps=4` alone continues the mul run (its models, its task, its
reward.fn: a function in a module on PYTHONPATH, run in the rollout actor's grading process),
keeping config.json; and a batch with zero reward everywhere prints its likely causes."""
import json
import re
import textwrap

import pytest
from launching import Launch

pytestmark = pytest.mark.slow

# the expert off (acceptance 0: no Serve app, ~10 s of CPU saved); a first-attempt override the resume keeps
NO_EXPERT = ["acceptance.kind=constant", "acceptance.start=0.0"]


def test_mul_run_resumed_with_resume_and_steps_only_is_the_same_run(tmp_path):
    """Attempt 1: --config configs/mul/eapo.yaml, 2 steps, reward.fn logging every row it scores.
    Attempt 2: `resume=DIR steps=4` (and the harness's fixed keys). Steps 3-4 train on the mul
    task (the rows the reward saw have multi-digit operands; tiny:arith's never do) with the mul
    models; config.json still holds attempt 1's config, attempt 2's is beside it."""
    log = tmp_path / "rewarded.jsonl"
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(f'''
        import json, multiprocessing

        def exact(response, gold, row):
            from eapo_ray.reward import extract_answer
            with open({str(log)!r}, "a") as f:
                f.write(json.dumps({{"problem": row["problem"], "process": multiprocessing.current_process().name}}) + "\\n")
            return 1.0 if extract_answer(response) == gold else 0.0
        '''))
    env = {"PYTHONPATH": str(tmp_path)}
    first = Launch(tmp_path, "mul", "steps=2", "reward.fn=my_rewards:exact", *NO_EXPERT,
                   "--config", "configs/mul/eapo.yaml", env=env)
    assert first.finish() == 0, first.log[-4000:]
    run_dir = first.run_dir
    saved = (run_dir / "config.json").read_bytes()
    seen_first = len(log.read_text().splitlines())
    assert seen_first > 0

    again = Launch(tmp_path, "mul", f"resume={run_dir}", "steps=4", env=env, out_name="resume.out")
    assert again.finish() == 0, again.log[-4000:]
    out = again.log
    assert f"[eapo] resuming {run_dir}, attempt 2" in out and "[eapo]   steps: 2 -> 4" in out, out[:3000]
    steps = [int(m) for m in re.findall(r"\[eapo\] step (\d+)/4", out)]
    assert steps == [3, 4], out[-3000:]
    assert (run_dir / "config.json").read_bytes() == saved  # the first attempt's record, untouched
    first_cfg = json.loads(saved)
    assert first_cfg["steps"] == 2 and first_cfg["data"]["train"] == "tiny:arith-mul"
    used = json.loads((run_dir / "config.attempt2.json").read_text())
    assert used["steps"] == 4 and used["data"]["train"] == used["data"]["heldout"] == "tiny:arith-mul"
    assert "tiny_mul/policy" in used["model"]["policy"] and "tiny_mul/expert" in used["model"]["expert"]
    assert used["reward"]["fn"] == "my_rewards:exact" and used["acceptance"]["start"] == 0.0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4

    rows = [json.loads(line) for line in log.read_text().splitlines()]
    later = rows[seen_first:]  # scored by attempt 2
    assert later, "attempt 2 scored nothing with reward.fn"
    multi_digit = sum(bool(re.search(r"\d\d", r["problem"])) for r in later) / len(later)
    assert multi_digit > 0.5, later[:5]  # tiny:arith-mul (~96%), not tiny:arith (0%)
    assert all(r["process"].startswith("SpawnPoolWorker") for r in rows)  # graded in the grading process


def test_a_batch_with_zero_reward_everywhere_prints_its_likely_causes(tmp_path):
    """The tiny policy shown a template it was not trained on, with 3 tokens to answer in: no
    sample earns anything; the first such batch prints the causes (template without the answer
    tag, responses cut by the length budget) before the empty-batch bound stops the run."""
    run = Launch(tmp_path, "zero", "steps=2", "data.template='{problem} ='", "rollout.max_response_tokens=3",
                 "rollout.max_new_tokens_per_turn=3", "rollout.max_empty_batches=1", *NO_EXPERT)
    rc = run.finish()
    log = run.log
    assert rc == 1 and "kept no samples" in log, log[-4000:]
    assert "zero reward on all" in log and "likely causes" in log, log[-4000:]
    assert "data.template never mentions the answer tag <answer>" in log
    assert "cut by the length budget" in log and "rollout.max_response_tokens=3" in log
    assert log.index("likely causes") < log.index("kept no samples")
