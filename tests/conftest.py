import os
import time

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray cluster for one test module (never a stray one on the machine)."""
    import ray

    if ray.is_initialized():  # a stray connection (e.g. a library thread's auto-init) must not fail this module
        ray.shutdown()
    for attempt in range(3):  # a loaded machine can miss Ray's start-up deadline once
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # Ray raises a bare Exception when the raylet misses its 30 s registration
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(5)  # let the previous module's processes finish dying
    yield ray
    ray.shutdown()


# `make test` runs the suite on 2 pytest-xdist workers, a file at a time per worker (module
# fixtures such as a module's Ray cluster or vLLM engine are made once). Files start longest
# first (measured durations, serial, CI machine) so the two workers finish together.
LONG_FIRST = ["test_faults_in_runs.py", "test_smollm2_run.py", "test_e2e.py", "test_engine_correctness.py",
              "test_expert_serve.py", "test_vllm.py", "test_paper_table_run.py", "test_real_benchmarks.py",
              "test_learner_correctness.py", "test_fault_tolerance.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: file order kept otherwise
