"""A run submitted as a Ray job (`ray job submit --working-dir`) keeps its run directory after the
cluster is gone. Under a job the current directory is Ray's unpacked copy of the working dir
(<ray temp dir>/session_*/runtime_resources/working_dir_files/...), which Ray evicts and a restart
or /tmp cleanup removes: the default run root there is ~/eapo_runs (eapo_ray/storage.py)."""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from launching import FAST, ROOT, free_port, kill

pytestmark = pytest.mark.slow


def test_job_submission_run_directory_outlives_the_cluster(tmp_path):
    """`ray start --head` (its own temp dir and ports; HOME a tmp dir), `ray job submit
    --working-dir <copy of eapo_ray/> -- python -m eapo_ray.launch steps=1 ...` with no run_root,
    then the cluster stopped (the processes this test started, not `ray stop`, which would take
    every Ray cluster on the machine) and its temp dir deleted: the run directory the launcher
    printed is under ~/eapo_runs, outside the working-dir copy, with summary.json and a checkpoint."""
    home, work = tmp_path / "home", tmp_path / "wd"
    home.mkdir()
    shutil.copytree(ROOT / "eapo_ray", work / "eapo_ray", ignore=shutil.ignore_patterns("__pycache__"))
    ray_tmp = tempfile.mkdtemp(prefix="eapo-job-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dash = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "HOME": str(home), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--num-cpus=4", f"--temp-dir={ray_tmp}", f"--port={free_port()}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--metrics-export-port={free_port()}", "--disable-usage-stats"],
        env=env, stdout=(tmp_path / "head.out").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    procs: list = []
    try:
        address = f"http://127.0.0.1:{dash}"
        submit = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(work), "--",
                  "python", "-m", "eapo_ray.launch", "steps=1", "run_name=job", *FAST]
        deadline = time.time() + 120
        while True:  # the job API is up once the dashboard answers
            p = subprocess.run([ray_bin, "job", "list", "--address", address], env=env, capture_output=True, text=True)
            if p.returncode == 0:
                break
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.out").read_text()[-3000:]
            time.sleep(1)
        p = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=480, cwd=tmp_path)
        out = p.stdout + p.stderr
        assert p.returncode == 0 and "succeeded" in out, out[-5000:]
        m = re.search(r"^\[eapo\] run directory: (\S+)$", out, re.M)
        assert m, out[-5000:]
        run_dir = Path(m.group(1))
        assert run_dir == home / "eapo_runs" / "job", run_dir
        assert re.search(r"runtime_resources.working_dir_files", str(list(Path(ray_tmp).rglob("working_dir_files")))), \
            "the job did not run from Ray's working-dir copy"
    finally:
        try:
            procs = psutil.Process(head.pid).children(recursive=True)
        except psutil.Error:
            procs = []
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                head.kill()
        kill(procs)
        shutil.rmtree(ray_tmp, ignore_errors=True)  # the cluster's temp dir (the working-dir copy with it) is gone
    assert not Path(ray_tmp).exists()
    assert (run_dir / "summary.json").is_file() and (run_dir / "checkpoint" / "latest").is_file(), \
        sorted(map(str, run_dir.rglob("*")))[:40]
    tag = (run_dir / "checkpoint" / "latest").read_text().strip()
    assert (run_dir / "checkpoint" / tag).is_dir() and (run_dir / "final" / "model.safetensors").is_file()
