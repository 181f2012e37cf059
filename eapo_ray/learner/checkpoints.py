"""The learner's checkpoint files: DeepSpeed tag directories step<version> in <run>/checkpoint,
pruned to the newest learner.checkpoint_keep by rank 0 after each save."""
from __future__ import annotations

import re
import shutil
from pathlib import Path


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` DeepSpeed tag directories step<version> (never the
    one the `latest` file names); keep_last <= 0 keeps all. Returns the deleted tags."""
    if keep_last <= 0:
        return []
    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").exists() else None
    tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and re.fullmatch(r"step\d+", p.name)),
                  key=lambda p: int(p.name[4:]))
    old = [p for p in tags[:-keep_last] if p.name != latest]
    for p in old:
        shutil.rmtree(p)
    return [p.name for p in old]
