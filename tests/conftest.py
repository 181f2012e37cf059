import os
import time

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_OURS: dict = {}  # the local cluster ray_local started in this pytest process: {"gcs": address}


def _start_local_ray():
    import ray

    if ray.is_initialized():  # a stray connection (e.g. a library thread's auto-init) must not fail this module
        ray.shutdown()
    for attempt in range(3):  # a loaded machine can miss Ray's start-up deadline once
        try:
            ctx = ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
            _OURS["gcs"] = ctx.address_info["gcs_address"]
            return
        except Exception:  # Ray raises a bare Exception when the raylet misses its 30 s registration
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(5)  # let the previous module's processes finish dying


def _left_clean(ray, wait_s: float = 10.0) -> bool:
    """Every CPU/GPU free again, no actor alive or pending (0-CPU ones included, read from the
    GCS's actor table: Ray's state API needs the dashboard), no placement group left and no named
    actor (Serve's controller included): what a module's actors leave when their handles go.
    Actor deaths are asynchronous, hence the wait; any error counts as not clean."""
    from ray._private import state

    deadline = time.time() + wait_s
    while True:
        try:
            total, free = ray.cluster_resources(), ray.available_resources()
            clean = (all(free.get(k, 0) == total[k] for k in ("CPU", "GPU") if k in total)
                     and not [a for a in state.actors().values() if a["State"] != "DEAD"]
                     and not [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
                     and not ray.util.list_named_actors(all_namespaces=True))
        except Exception:  # noqa: BLE001 -- e.g. the cluster is already gone
            return False
        if clean:
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray cluster for test modules (never a stray one on the machine): started
    by the first module that asks for it and kept for the next ones in this pytest process
    (each cluster costs ~6 s of CPU to start and stop) as long as a module leaves it clean
    (`_left_clean`); otherwise, or when something shut Ray down or connected elsewhere
    meanwhile, the next module gets a fresh one. Shut down when the session ends."""
    import ray

    if not (ray.is_initialized() and _OURS.get("gcs") == ray.get_runtime_context().gcs_address):
        _start_local_ray()
    yield ray
    if ray.is_initialized() and not _left_clean(ray):
        ray.shutdown()


# Every process this pytest process starts (Ray clusters in-process, launches) inherits this mark.
# One mark per pytest process (xdist sets PYTEST_XDIST_WORKER before importing this): one worker's
# end-of-session sweep must not touch another's processes.
os.environ["EAPO_TEST_SESSION"] = f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-{os.getpid()}-{time.time():.0f}"


def _leftover_ray_processes() -> list:
    """`ray::` processes of this test session (by EAPO_TEST_SESSION) whose parent is gone: workers
    of an in-process test cluster that did not exit with their raylet (seen twice: RolloutWorkers
    orphaned after a suite run, as far as we can tell from the two-node test's removed node)."""
    import psutil

    mark = f"EAPO_TEST_SESSION={os.environ['EAPO_TEST_SESSION']}"
    out = []
    for p in psutil.process_iter(["ppid", "cmdline"]):
        try:
            if p.info["ppid"] == 1 and (p.info["cmdline"] or [""])[0].startswith("ray::"):
                if mark in open(f"/proc/{p.pid}/environ", "rb").read().decode(errors="replace").split("\0"):
                    out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


@pytest.fixture(scope="session", autouse=True)
def _ray_down_at_the_end():
    yield
    import sys

    if "ray" not in sys.modules:
        return
    if sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
    import psutil

    time.sleep(1)
    for p in _leftover_ray_processes():  # said, then ended: nothing of the suite outlives it
        print(f"\n[conftest] killing a leftover Ray process of this test session: {p.pid} {p.info['cmdline'][0]}",
              file=sys.stderr, flush=True)
        try:
            p.kill()
        except psutil.Error:
            pass


# `make test` runs the suite on 2 pytest-xdist workers, a file at a time per worker (module
# fixtures such as a module's vLLM engine are made once; ray_local's cluster serves every module of
# a worker that leaves it clean). Files start longest
# first (measured durations, serial, CI machine) so the two workers finish together.
LONG_FIRST = ["test_faults_in_runs.py", "test_resume_your_model.py", "test_smollm2_run.py", "test_e2e.py",
              "test_gpu_check_dry_run.py", "test_expert_endpoint.py", "test_job_run_dir.py",
              "test_engine_correctness.py", "test_expert_serve.py", "test_vllm.py", "test_placement_layout.py",
              "test_paper_table_run.py", "test_real_benchmarks.py", "test_learner_correctness.py",
              "test_weight_sync_deadlines.py", "test_fault_tolerance.py", "test_storage_tracking.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: file order kept otherwise
