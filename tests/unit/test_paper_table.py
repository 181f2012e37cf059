"""The paper-table experiment: its pure parts (aggregation, rendering, plan arithmetic,
the expert-built distillation data) and the row configs. The end-to-end run is in
tests/system/test_paper_table_run.py."""
import math
import os
from pathlib import Path

import pytest

from eapo_ray import task
from eapo_ray.config import TINY_DIR, load_config
from experiments import budget, report
from experiments import distill as D
from experiments import paper_table as P
from experiments import rows as R

# ---------------------------------------------------------------- aggregation and rendering

def test_mean_std_is_sample_std():
    m, s = report.mean_std([0.5, 0.7, 0.6])
    assert m == pytest.approx(0.6) and s == pytest.approx(0.1)
    assert report.mean_std([0.4]) == (0.4, 0.0)
    assert all(math.isnan(x) for x in report.mean_std([]))


def test_aggregate_skips_missing_values():
    per = {0: {"greedy": 0.5, "sampled": 0.3}, 1: {"greedy": 0.7, "sampled": None}, 2: {"greedy": 0.6}}
    a = report.aggregate(per, ["greedy", "sampled"])
    assert a["greedy"]["n"] == 3 and a["greedy"]["mean"] == pytest.approx(0.6)
    assert a["greedy"]["values"] == {0: 0.5, 1: 0.7, 2: 0.6}
    assert a["sampled"] == {"mean": 0.3, "std": 0.0, "n": 1, "values": {0: 0.3}}


def fake(greedy, sampled, samples=0, steps=0):
    return {"greedy": greedy, "sampled": sampled, "samples": samples, "steps": steps}


def test_render_table_from_fake_results():
    rows = [R.ROW_BY_NAME[n] for n in ("base", "workflow", "rl", "eapo", "eapo_step")]
    results = {
        "base": {0: fake(0.2, 0.25), 1: fake(0.2, 0.23), 2: fake(0.18, 0.21)},
        "workflow": {0: fake(0.2, 0.3), 1: fake(0.2, 0.28), 2: fake(0.18, 0.26)},
        "rl": {0: fake(0.5, 0.4, 5000, 40), 1: fake(0.6, 0.42, 5100, 40), 2: fake(0.55, 0.41, 5050, 40)},
        "eapo": {0: fake(0.52, 0.45, 5000, 40), 2: fake(0.58, 0.47, 5100, 40)},  # seed 1 missing
    }
    md = report.render_table(rows, results, [0, 1, 2], num_heldout=400, sample_k=4)
    lines = md.splitlines()
    assert lines[0].startswith("| row | evaluated | greedy acc. | greedy per seed (0 / 1 / 2) | sampled acc. (T=1, avg@4)")
    table = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert "policy + expert" in table[R.ROW_BY_NAME["workflow"].label]
    assert "policy alone" in table[R.ROW_BY_NAME["base"].label]
    rl = table[R.ROW_BY_NAME["rl"].label]
    assert "0.550 ± 0.050" in rl and "0.500 / 0.600 / 0.550" in rl and "| 5050 | 40 |" in rl
    eapo = table[R.ROW_BY_NAME["eapo"].label]
    assert "0.520 / - / 0.580" in eapo and "0.550 ± 0.042" in eapo
    assert "| - | - / - / - | - | - / - / - | - | - |" in table[R.ROW_BY_NAME["eapo_step"].label]  # no runs yet
    assert "400 held-out problems" in md and "policy alone" in md
    assert "(2-4 operations;" in md  # the bundled task's default
    chain = report.render_table(rows, results, [0, 1, 2], num_heldout=400, sample_k=4, levels=[6])
    assert "(6 operations;" in chain  # the run's held-out levels, not a fixed 2-4


def test_curve_aligns_seeds_on_common_steps():
    m = {0: [{"step": 0, "heldout_accuracy": 0.2}, {"step": 10, "samples": 1000, "heldout_accuracy": 0.4},
             {"step": 20, "samples": 2000, "heldout_accuracy": 0.5}],
         1: [{"step": 0, "heldout_accuracy": 0.1}, {"step": 10, "samples": 1200, "heldout_accuracy": 0.6}]}
    c = report.curve(m, "heldout_accuracy")
    assert c["steps"] == [0, 10] and c["samples"] == [0, 1100]
    assert c["mean"] == pytest.approx([0.15, 0.5]) and c["min"] == [0.1, 0.4] and c["max"] == [0.2, 0.6]
    assert report.curve({0: [{"step": 1}]}, "heldout_accuracy")["steps"] == []


def test_train_stats_first_and_last_quarter():
    rows = [{"step": 0, "heldout_accuracy": 0.1}] + [
        {"step": s, "reward": s / 10, "consult_rate": 1.0 if s <= 2 else 0.0} for s in range(1, 9)]
    t = report.train_stats(rows)
    assert t["reward_first"] == pytest.approx(0.15) and t["reward_last"] == pytest.approx(0.75)
    assert t["consult_rate_first"] == 1.0 and t["consult_rate_last"] == 0.0 and t["rollout_accuracy_first"] is None


# ---------------------------------------------------------------- plan and budget

ALL = list(R.ROWS)


def test_plan_keeps_everything_when_it_fits():
    t = budget.Timing(step_s=1, run_overhead_s=10, eval_s=5, workflow_eval_s=5, distill_s=5)
    plan = budget.make_plan(ALL, [0, 1, 2], 40, 10_000, t)
    # 7 training rows x (10 + 40 + 5) + distill (5 + 5) + base 5 + workflow 5, per seed
    assert plan.estimate_s == pytest.approx(3 * (7 * 55 + 10 + 5 + 5))
    assert plan.rows == [r.name for r in ALL] and plan.steps == 40 and plan.dropped == [] and plan.fits


def test_plan_drops_ablations_last_first_then_scales_steps():
    t = budget.Timing(step_s=1, run_overhead_s=10, eval_s=5, workflow_eval_s=5, distill_s=5)
    per_seed_core = 2 * 55 + 20  # rl, eapo + distill, base, workflow
    plan = budget.make_plan(ALL, [0, 1, 2], 40, 3 * (per_seed_core + 2 * 55), t)  # room for two ablations
    assert plan.rows[-2:] == ["eapo_weak_expert", "eapo_constant"]
    assert plan.dropped == ["eapo_step", "eapo_inverse", "eapo_sequential"] and plan.steps == 40 and plan.fits

    plan = budget.make_plan(ALL, [0, 1, 2], 40, 3 * (20 + 2 * 45), t, min_steps=20)  # core rows at 30 steps
    assert all(R.ROW_BY_NAME[n].core for n in plan.rows) and plan.steps == 30 and plan.fits
    plan = budget.make_plan(ALL, [0, 1, 2], 40, 60, t, min_steps=20)
    assert plan.steps == 20 and not plan.fits
    assert budget.make_plan(ALL, [0, 1, 2], 40, 60, t, scale_steps=False).steps == 40


def test_plan_counts_only_unfinished_runs_and_keeps_started_rows():
    t = budget.Timing(step_s=1, run_overhead_s=10, eval_s=5, workflow_eval_s=5, distill_s=5)
    rows = [R.ROW_BY_NAME[n] for n in ("rl", "eapo", "eapo_weak_expert", "eapo_step")]
    done = {("rl", 0), ("rl", 1), ("eapo_step", 0)}
    plan = budget.make_plan(rows, [0, 1], 40, 3 * 55, t, done=done)
    assert plan.dropped == ["eapo_weak_expert"]  # eapo_step has a finished run: kept
    assert plan.estimate_s == pytest.approx(3 * 55)  # eapo x 2 + eapo_step seed 1


def test_step_overrides_scale_the_schedules():
    cfg = load_config(R.config_path(R.ROW_BY_NAME["eapo"]))
    assert R.step_overrides(cfg, cfg.steps) == []
    assert R.step_overrides(cfg, 20) == ["steps=20", "acceptance.total_steps=15", "eval.every=5"]
    inv = load_config(R.config_path(R.ROW_BY_NAME["eapo_inverse"]))
    assert "acceptance.scale=5" in R.step_overrides(inv, 20)
    assert R.distill_steps(cfg, 40, 32) == 160  # 40 x 16 prompts x 8 samples / 32


def test_job_order_core_by_seed_then_ablations_by_row():
    rows = [R.ROW_BY_NAME[n] for n in ("base", "rl", "eapo_step", "eapo_weak_expert")]
    order = [(r.name, s) for r, s in budget.job_order(rows, [0, 1])]
    assert order == [("base", 0), ("rl", 0), ("base", 1), ("rl", 1),
                     ("eapo_step", 0), ("eapo_step", 1), ("eapo_weak_expert", 0), ("eapo_weak_expert", 1)]


def test_run_watched_stops_a_stalled_process(tmp_path):
    import sys
    import time

    t0 = time.time()
    status = P.run_watched([sys.executable, "-c", "print('hi', flush=True); import time; time.sleep(60)"],
                           tmp_path / "stall.log", dict(os.environ), tmp_path, stall_s=1.5, poll_s=0.2)
    assert status == "stalled" and time.time() - t0 < 20
    assert "no output for 2s" in (tmp_path / "stall.log").read_text()
    assert P.run_watched([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "x.log", dict(os.environ),
                         tmp_path, stall_s=30, poll_s=0.1) == "exit 3"
    assert P.run_watched([sys.executable, "-c", "pass"], tmp_path / "y.log", dict(os.environ), tmp_path,
                         stall_s=30, poll_s=0.1) == "ok"


# ---------------------------------------------------------------- configs

def test_every_row_has_a_loadable_config_and_they_differ_only_as_intended():
    cfgs = {r.name: load_config(R.config_path(r)) for r in R.ROWS}
    eapo = cfgs["eapo"]
    for name, c in cfgs.items():  # same task, held-out set, learner and budget everywhere
        assert (c.data, c.steps, c.learner, c.rollout, c.eval) == (eapo.data, eapo.steps, eapo.learner, eapo.rollout,
                                                                   eapo.eval), name
        assert c.eval.temperature == 0.0
    rl = cfgs["rl"].acceptance
    assert rl.kind == "constant" and rl.start == 0.0  # driver/system.py: no expert app at all
    assert not (rl.kind != "constant" or rl.start > 0)  # the launcher's use_expert rule
    assert rl.total_steps == eapo.acceptance.total_steps  # same turn-budget schedule
    assert cfgs["eapo_sequential"].protocol.max_parallel == 1 and eapo.protocol.max_parallel == 3
    assert cfgs["eapo_weak_expert"].expert.temperature > 0 and eapo.expert.temperature == 0
    assert cfgs["eapo_constant"].acceptance.start == 1.0 and cfgs["eapo_constant"].acceptance.kind == "constant"
    assert cfgs["eapo_inverse"].acceptance.kind == "inverse" and cfgs["eapo_step"].acceptance.kind == "step"


# ---------------------------------------------------------------- distillation data

def test_expert_solutions_with_a_perfect_expert_are_the_reference_solutions():
    probs = task.sample_problems(30, [1, 2, 3, 4], "train", 3)
    calls = []

    def ask(queries):
        calls.append(list(queries))
        return [str(eval(q)) for q in queries]  # noqa: S307 -- a+b / a-b / a*b of integers

    sols = D.expert_solutions(probs, ask, chunk=7)
    assert [s for s, _ in sols] == [task.solution(p) for p in probs]
    assert [v for _, v in sols] == [p.answer for p in probs]
    assert max(len(c) for c in calls) <= 7


def test_expert_solutions_propagate_an_expert_error():
    p = task.Problem("(3+4)*5-2", "33", ((3, "+", 4, 7), (7, "*", 5, 35), (35, "-", 2, 33)), 3)
    asked = []

    def ask(queries):
        asked.extend(queries)
        return ["8" if q == "3+4" else str(eval(q)) for q in queries]  # noqa: S307 -- wrong on 3+4

    (resp, value), = D.expert_solutions([p], ask)
    assert asked == ["3+4", "8*5", "40-2"]  # the next step starts from the expert's (wrong) answer
    assert resp == "3+4=8;8*5=40;40-2=38;<answer>\\boxed{38}</answer>" and value == "38"


def test_encode_masks_the_prompt():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_DIR / "policy")
    ids, labels = D.encode(tok, "Q:3+4\nA:", "3+4=7;<answer>\\boxed{7}</answer>")
    n_prompt = len(tok("Q:3+4\nA:")["input_ids"])
    assert ids[0] == tok.bos_token_id and labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and tok.decode(ids[n_prompt:]) == "3+4=7;<answer>\\boxed{7}</answer>"
    assert D.lr_factor(0, 100, 10) == pytest.approx(0.1 * 0.5 * (1 + math.cos(0)))
    assert D.lr_factor(100, 100, 10) == pytest.approx(0.0)


def test_mul_rows_take_their_labels_from_their_config_files(monkeypatch):
    """Rows run with --config-dir configs/mul are labelled from each config's `# label:` line,
    not with the paper task's labels (its weak expert is "T=2.0" there, a weaker model here)."""
    root = Path(__file__).resolve().parents[2]
    monkeypatch.setattr(R, "CONFIG_DIR", root / "configs" / "mul")
    mul = {r.name: R.labelled(r) for r in R.ROWS + R.EXTRA_ROWS if R.config_path(r).exists()}
    assert {"rl", "eapo", "eapo_weak_expert", "eapo_sft", "eapo_luffy"} <= set(mul)
    for name, row in mul.items():  # every mul config declares its label
        assert R.config_path(row).read_text().startswith("# label: "), name
    assert "T=2.0" not in mul["eapo_weak_expert"].label and "30%" in mul["eapo_weak_expert"].label
    assert "LUFFY" in mul["eapo_luffy"].label
    monkeypatch.setattr(R, "CONFIG_DIR", root / "configs" / "paper")
    assert R.labelled(R.ROW_BY_NAME["eapo_weak_expert"]).label == "ablation: weak expert (T=2.0)"


def test_a_weaker_expert_model_gets_its_own_accuracy_key():
    """configs/mul's weak expert is another model at the same temperature: keyed by temperature
    alone it was reported with the strong expert's accuracy (results.json, 2026-12-02)."""
    mul = Path(__file__).resolve().parents[2] / "configs" / "mul"
    eapo, weak = load_config(mul / "eapo.yaml"), load_config(mul / "eapo_weak_expert.yaml")
    sft = load_config(mul / "eapo_sft.yaml")
    assert P.expert_key(eapo, eapo) == P.expert_key(sft, eapo) == "T=0"
    assert P.expert_key(weak, eapo) != "T=0" and "weak_expert" in P.expert_key(weak, eapo)
    paper = Path(__file__).resolve().parents[2] / "configs" / "paper"
    hot = load_config(paper / "eapo_weak_expert.yaml")
    assert P.expert_key(hot, load_config(paper / "eapo.yaml")) == f"T={hot.expert.temperature:g}"


def test_help_plot_reads_help_and_accuracy_per_row(tmp_path):
    """experiments.help_plot: help = answered queries per sample over the helped steps (no
    config.json here: the first 75%, steps 1-3 of 4), accuracy = greedy pass@1, both averaged
    over seeds; a run without metrics rows is skipped."""
    import json

    from experiments import help_plot

    for seed, (helps, acc) in enumerate([([1.0, 0.5, 0.0, 9.0], 0.2), ([0.5, 0.5, 0.5, 9.0], 0.4)]):
        run = tmp_path / "runs" / f"eapo-s{seed}"
        run.mkdir(parents=True)
        rows = [{"step": 0}] + [{"step": i + 1, "rollout_accuracy": 0.1, "rollout_accepted_per_sample": h}
                                for i, h in enumerate(helps)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "eval.json").write_text(json.dumps({"greedy": {"pass@1": acc}}))
    (tmp_path / "runs" / "rl-s0").mkdir()
    (tmp_path / "runs" / "rl-s0" / "metrics.jsonl").write_text("")
    (tmp_path / "runs" / "rl-s0" / "eval.json").write_text(json.dumps({"greedy": {"pass@1": 0.1}}))
    pts = help_plot.points(tmp_path)
    assert "rl" not in pts
    h, g, sd = pts["eapo"]
    assert h == pytest.approx((0.5 + 0.5) / 2) and g == pytest.approx(0.3) and sd == pytest.approx(0.1414, abs=1e-3)
