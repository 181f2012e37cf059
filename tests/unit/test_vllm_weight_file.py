"""The vLLM engine's weight file (VLLMEngine.load_weights, object-store path): where it goes,
tensors that share memory, and files left by a killed writer. No vLLM needed: these helpers
are plain Python (the load itself is tests/system/test_vllm.py)."""
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from eapo_ray.rollout import vllm_engine as V


def test_tied_weights_are_unaliased_so_safetensors_can_write_them(tmp_path):
    emb = torch.randn(10, 4)
    sd = {"model.embed_tokens.weight": emb, "lm_head.weight": emb, "w": torch.randn(4, 6).t()}  # tied + non-contiguous
    with pytest.raises(RuntimeError, match="share memory"):
        save_file(sd, str(tmp_path / "raw.safetensors"))
    out = V._unaliased(sd)
    save_file(out, str(tmp_path / "ok.safetensors"))
    back = load_file(str(tmp_path / "ok.safetensors"))
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert out["model.embed_tokens.weight"] is not out["lm_head.weight"] and out["w"].is_contiguous()


def test_the_weight_file_leaves_shared_memory_that_is_too_small():
    assert V._shared_dir(10**18) == tempfile.gettempdir()
    if os.access("/dev/shm", os.W_OK):
        assert V._shared_dir(1) == "/dev/shm"


def test_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    orphan = tmp_path / f"{V.WEIGHT_FILE_PREFIX}{dead_pid}-abc.safetensors"
    mine = tmp_path / f"{V.WEIGHT_FILE_PREFIX}{os.getpid()}-def.safetensors"
    other = tmp_path / "unrelated.safetensors"
    young = tmp_path / f"{V.WEIGHT_FILE_PREFIX}{dead_pid}-young.safetensors"  # e.g. a writer in another pid namespace
    for f in (orphan, mine, other, young):
        f.write_bytes(b"x")
    old = time.time() - 3600
    for f in (orphan, mine, other):
        os.utime(f, (old, old))
    assert str(orphan) in V.remove_orphan_weight_files()
    assert not orphan.exists() and mine.exists() and other.exists() and young.exists()
