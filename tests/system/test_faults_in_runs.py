"""Faults injected into real launches (`python -m eapo_ray.launch` in a subprocess, its own
local Ray cluster): processes are found by PID among the launch's descendants and killed with
SIGKILL, or the driver gets SIGTERM (Ctrl-C: test_e2e's default run). Each test checks the run's outcome: the right step
count and an accounting block with nothing lost, or a clean shutdown with no process left."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from launching import ROOT, Launch, cmdline, interrupt_and_check_nothing_is_left, kill, still_alive_after

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_kill9_rollout_actor_expert_replica_and_learner_mid_run(tmp_path):
    """One launch, three faults, each SIGKILL by PID:
    - the only rollout actor, while it generates: Ray restarts it, its batch in flight is
      discarded (a failed call, counted) and the next goes to it once it is back; batches it
      had finished survive (the driver owns them);
    - the Serve expert's replica: Serve starts a new one; queries in flight or sent before it is
      up read "unavailable" and are counted;
    - one of two learners: the launcher sees it at once (not after the other rank's collective
      times out), rebuilds the learner group from the last checkpoint and redoes the steps
      after it, training again on the batch it held.
    The run reaches its step count and the accounting closes with nothing lost."""
    run = Launch(tmp_path, "faults", "steps=7", "rollout.num_actors=1", "expert.timeout_s=3",
                 "acceptance.kind=constant", "acceptance.start=1.0", "checkpoint_every=2",
                 "learner.num_learners=2",  # the surviving rank blocks in a collective: must not hang
                 "eval.enabled=true")  # evaluations of a dead learner's weights are part of the fault
    try:
        run.wait_for(r"^\[eapo\] step 1/7")
        t_kill = time.time()
        run.find("ray::RolloutWorker").send_signal(signal.SIGKILL)
        run.wait_for(r"^\[eapo\] step 3/7")
        run.find("ServeReplica:faults-expert").send_signal(signal.SIGKILL)
        run.wait_for(r"^\[eapo\] step 5/7")
        run.find("ray::Learner").send_signal(signal.SIGKILL)
        rc = run.finish()
        log = run.log
        assert rc == 0, log[-5000:]
        s = run.summary()
        a = s["accounting"]
        assert s["steps"] == 7 and a["closes"] and a["batches"]["lost"] == 0 and a["samples"]["lost"] == 0, a
        assert s["rollout_failed_calls"] >= 1 and not s["rollout_actors_retired"]  # the killed call
        assert a["expert_unavailable"] >= 1, a  # the replica's death was seen and counted, not hidden
        assert s["learner_restarts"] == 1 and "learner group rebuilt at version 4" in log, log[-5000:]
        steps = [int(m) for m in re.findall(r"^\[eapo\] step (\d+)/7", log, re.M)]
        assert steps[:5] == [1, 2, 3, 4, 5] and steps[-3:] == [5, 6, 7], steps  # 5 redone after the rebuild
        rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(8)), rows  # one row per step: the redone step's first went
        # trained = training that survives (one batch a step); the steps thrown away by the rebuild are
        # rolled_back; batches of the discarded versions are dropped, so staleness never goes negative
        assert a["batches"]["trained"] == 7 and a["samples"]["trained"] == s["samples"], a
        assert a["batches"]["rolled_back"] >= 1 and a["samples"]["rolled_back"] >= 1, a
        assert all(r.get("staleness", 0) >= 0 for r in rows), [r.get("staleness") for r in rows]
        print(f"faults: rollout actor, expert replica, learner killed; the run took {time.time() - t_kill:.0f}s "
              f"after the first kill; failed rollout calls {s['rollout_failed_calls']}, expert unavailable "
              f"{a['expert_unavailable']}, learner restarts {s['learner_restarts']}, "
              f"accounting {a['batches']} / {a['samples']}")
    finally:
        run.kill_all()


def test_learner_killed_before_a_checkpoint_then_with_no_restart_left(tmp_path):
    """learner.max_restarts=1, checkpoint_every=3. Killed at step 2 (no checkpoint yet): rebuilt
    from the start. Killed again after the step-3 checkpoint: no restart left, so the run stops
    with a clear error naming the resume= command (exit 1)."""
    run = Launch(tmp_path, "learner", "steps=30", "learner.max_restarts=1", "checkpoint_every=3",
                 "acceptance.kind=constant", "acceptance.start=0.0")
    try:
        run.wait_for(r"^\[eapo\] step 1/30")
        run.find("ray::Learner").send_signal(signal.SIGKILL)
        run.wait_for(r"^\[eapo\] learner group rebuilt at version 0")
        run.wait_for(r"^\[eapo\] step 4/30")  # past the step-3 checkpoint
        run.find("ray::Learner").send_signal(signal.SIGKILL)
        rc = run.finish(timeout=180)
        log = run.log
        assert rc == 1, log[-4000:]
        assert "rebuilding the learner group from the start (no checkpoint yet" in log, log[-4000:]
        assert re.search(r"error: a learner died at step \d+ .*rebuilt 1 times already \(learner.max_restarts=1\)"
                         rf".*Continue from the last checkpoint with: python -m eapo_ray.launch resume={run.run_dir}",
                         log), log[-4000:]
        assert (run.run_dir / "checkpoint" / "latest").exists()
    finally:
        run.kill_all()


def _rows(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if r["step"] > 0}


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_kill9_driver_then_resume_continues_exactly(tmp_path):
    """Synchronous (overlap=false), one rollout actor, no expert: 4 steps straight, against 4
    steps whose driver is SIGKILLed after step 2 and resumed with resume=<run dir>. Same batch
    serials (so the same prompts and coins) in the same order, the same rewards and losses per
    step, and the same final weights within fp tolerance; the killed run's processes all exit
    (Ray's agents included: eapo_ray.reaper)."""
    common = ["steps=4", "rollout.num_actors=1", "rollout.overlap=false", "acceptance.kind=constant",
              "acceptance.start=0.0", "checkpoint_every=1"]
    straight = Launch(tmp_path, "straight", *common)
    assert straight.finish() == 0, straight.log[-4000:]

    run = Launch(tmp_path, "killed", *common)
    try:
        run.wait_for(r"^\[eapo\] step 2/4")
        procs = run.descendants()
        os.kill(run.p.pid, signal.SIGKILL)
        run.p.wait(timeout=30)
        # Ray's processes share the driver's fate, and eapo_ray.reaper ends those that would not
        # (on Ray 2.60 the dashboard and runtime-env agents outlived it)
        left = still_alive_after(procs, 30, poll_s=1)
        assert not left, [(p.pid, cmdline(p)[:80]) for p in left]
    finally:
        run.kill_all()
    # the resume point is the learners' newest checkpoint tag (DeepSpeed's `latest`): the kill can land
    # inside step 2's save, after `latest` moved but before driver_state.json (the newest copy, for
    # people) did; the per-version driver_state_step<v>.json is written before either
    ckpt = run.run_dir / "checkpoint"
    saved = int((ckpt / "latest").read_text().strip().removeprefix("step"))
    assert saved in (1, 2, 3) and (ckpt / f"driver_state_step{saved}.json").exists()
    resumed = Launch(tmp_path, "killed", *common, f"resume={run.run_dir}")
    assert resumed.finish() == 0, resumed.log[-4000:]
    assert f"step {saved + 1}/4" in resumed.log and f"step {saved}/4" not in resumed.log

    a, b = _rows(straight.run_dir), _rows(run.run_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step]["rollout_serial"] == b[step]["rollout_serial"] == step - 1, (step, a[step], b[step])
        assert a[step]["rollout_reward"] == b[step]["rollout_reward"], step
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-5, (step, a[step]["loss"], b[step]["loss"])
    wa, wb = _weights(straight.run_dir), _weights(run.run_dir)
    assert wa.keys() == wb.keys()
    gap = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    moved = max((wa[k].float() - w0.float()).abs().max().item()
                for k, w0 in _weights_base().items() if k in wa)
    assert gap < 1e-5 < moved, (gap, moved)
    print(f"exact resume: killed after checkpoint {saved}, max weight gap {gap:.2e} (training moved them {moved:.2e})")


def _weights_base() -> dict:
    from safetensors.torch import load_file

    from eapo_ray.config import TINY_DIR

    return load_file(str(TINY_DIR / "policy" / "model.safetensors"))


def _replica_pids(run: Launch, app: str) -> set:
    return {q.pid for q in run.descendants() if f"ServeReplica:{app}" in cmdline(q)}


def test_expert_scale_changes_only_the_bounds_keeps_the_replicas_and_survives_a_resume(tmp_path):
    """`python -m eapo_ray.expert scale --run-name R --address A --min 2 --max 2`, run outside the run
    directory, on a launch whose expert was capped at 1 replica: the replica that served before
    still serves (same process: no model reload; a Python serve.run redeploy replaced it) beside a
    second one, and training goes on. Bounds that cannot be reached in --timeout exit 1. The bounds
    reach the run directory (the driver copies the cluster's record at its checkpoints), and a
    resumed run (a fresh local cluster) starts its expert with them, not the config's 1-1."""
    run = Launch(tmp_path, "scale", "steps=100000", "acceptance.kind=constant", "acceptance.start=1.0",
                 "checkpoint_every=1",  # so the interrupted run names its resume command
                 "expert.max_replicas=1")  # so the second replica can only come from the CLI
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"}

    def cli(*args, timeout=300):
        return subprocess.run([sys.executable, "-m", "eapo_ray.expert", "scale", "--run-name", "scale", "--address",
                               addr, *args], cwd=tmp_path, env=env | {"PYTHONPATH": str(ROOT)}, capture_output=True,
                              text=True, timeout=timeout)
    resumed = None
    try:
        run.wait_for(r"^\[eapo\] step 1/100000")
        addr = (run.run_dir / "ray_address").read_text().strip()
        before = _replica_pids(run, "scale-expert")
        assert len(before) == 1
        p = cli("--min", "2", "--max", "2")
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "1-1 -> 2-2" in p.stdout and "'RUNNING': 2" in p.stdout, p.stdout
        after = _replica_pids(run, "scale-expert")
        assert before < after and len(after) == 2, (before, after)  # the serving replica kept its process
        t0 = time.time()
        p = cli("--min", "40", "--max", "40", "--timeout", "3")
        assert p.returncode == 1 and "not within 40-40" in p.stderr and time.time() - t0 < 60, p.stderr[-3000:]
        p = cli("--min", "2", "--max", "2")
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        # back to 2-2 after bounds Serve could not reach: 2 replicas serve (which ones Serve keeps when it gives up
        # the unplaceable ones is Serve's choice: a fresh-clone run saw both replaced, so no identity check here)
        assert len(_replica_pids(run, "scale-expert")) == 2
        n = len(re.findall(r"^\[eapo\] step \d+/100000", run.log, re.M))
        run.wait_for(rf"^\[eapo\] step {n + 2}/100000", timeout=180)  # training went on, checkpoints taken
        rec = json.loads((run.run_dir / "expert_bounds.json").read_text())
        assert (rec["min_replicas"], rec["max_replicas"]) == (2, 2), rec
        interrupt_and_check_nothing_is_left(run, "sigterm")
        resumed = Launch(tmp_path, "scale", "steps=100000", f"resume={run.run_dir}", "expert.max_replicas=1",
                         out_name="resumed.out")
        resumed.wait_for(r"^\[eapo\] expert Serve app 'scale-expert' up \(2-2 replicas\)")
        assert "expert replicas 2-2, as `python -m eapo_ray.expert scale` set them" in resumed.log, resumed.log[-3000:]
        resumed.wait_for(r"^\[eapo\] step \d+/100000")
        assert len(_replica_pids(resumed, "scale-expert")) == 2
    finally:
        run.kill_all()
        if resumed is not None:
            resumed.kill_all()


def _ray_titles(root: psutil.Process) -> list[str]:
    out = []
    for proc in root.children(recursive=True):
        title = cmdline(proc)
        if title.startswith("ray::"):
            out.append(title.split()[0])
    return out


def test_two_node_cluster_loses_the_node_of_a_rollout_actor(tmp_path):
    """Two raylets on this machine (ray.cluster_utils.Cluster); the launch joins the cluster
    (RAY_ADDRESS). rollout.node_resource=rollout and one unit of it per node put one rollout
    actor on each node (the second node has no CPUs: nothing else of the run can land there; the
    evaluator keeps eval.num_cpus 0.5 while the rollout actors take 0 CPUs: a CI run once found a
    0-CPU evaluator there, whose soft preference for the driver's node does not bind).
    After step 2 the second node is killed (every process of it, SIGKILL): its actor's call
    fails, its restart can never be placed, so the fleet retires it after
    rollout.restart_timeout_s and the run finishes its steps on the first node, nothing lost."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "resources": {"rollout": 1}, "include_dashboard": False,
        # the GCS declares a silent node dead after 3 missed 1 s health checks (default 5 x 3 s)
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    run = None
    try:
        node2 = cluster.add_node(num_cpus=0, resources={"rollout": 1})
        # 40 steps: the run must outlast the node's detection (3 missed 1 s health checks) plus
        # rollout.restart_timeout_s; with 12, a CI run on the faster engine finished in 3 s after
        # the kill, before the dead actor was due for retirement
        run = Launch(tmp_path, "twonode", "steps=40", "rollout.num_actors=2", "rollout.node_resource=rollout",
                     "rollout.num_cpus=0", "rollout.restart_timeout_s=5", "acceptance.kind=constant",
                     "acceptance.start=0.0", "eval.enabled=true",  # the evaluator must not land on node 2
                     ray_address=cluster.address)
        run.wait_for(r"^\[eapo\] step 2/40")
        raylet2 = psutil.Process(node2.all_processes["raylet"][0].process.pid)
        on_node2 = _ray_titles(raylet2)
        others = [t for t in on_node2 if re.search(r"Learner|Evaluator|TrajectoryBuffer", t)]
        assert any(t.startswith("ray::RolloutWorker") for t in on_node2) and not others, on_node2
        t_kill = time.time()
        node2_procs = raylet2.children(recursive=True)  # its workers: a dead node's processes all die
        cluster.remove_node(node2, allow_graceful=False)
        kill(node2_procs)
        rc = run.finish(timeout=400)
        log = run.log
        assert rc == 0, log[-5000:]
        s = run.summary()
        a = s["accounting"]
        assert s["steps"] == 40 and a["closes"] and a["batches"]["lost"] == 0 and a["samples"]["lost"] == 0, a
        assert len(s["rollout_actors_retired"]) == 1, s
        assert "did not come back within rollout.restart_timeout_s=5s" in log, log[-5000:]
        print(f"two nodes: the second node (one rollout actor) killed after step 2; actor "
              f"{s['rollout_actors_retired']} retired; finished {time.time() - t_kill:.0f}s after the kill; "
              f"batches by actor {s['rollout_batches_by_worker']}; accounting {a['batches']} / {a['samples']}")
    finally:
        if run is not None:
            run.kill_all()
        cluster.shutdown()
