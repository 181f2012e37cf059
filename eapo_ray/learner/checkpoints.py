"""The learner's checkpoint files: DeepSpeed tag directories step<version> in <run>/checkpoint,
pruned to the newest learner.checkpoint_keep by every rank after each save: without a shared
run_root each node holds its own ranks' shards of each tag (and a node left unpruned would keep
every tag on its disk, and upload the pruned ones to storage_path again at each sync)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path


def prune_checkpoints(ckpt_dir: Path, keep_last: int, current: str | None = None) -> list[str]:
    """Delete all but the newest `keep_last` DeepSpeed tag directories step<version> (never the
    one the `latest` file names, nor `current`: the tag just saved, which `latest` names only on
    rank 0's node); keep_last <= 0 keeps all. Returns the deleted tags. Every rank
    calls it on its own node's directory, so ranks that share one race: a tag (or a file in it)
    another rank deleted first is not an error."""
    if keep_last <= 0:
        return []
    try:  # DeepSpeed's rank 0 writes `latest`: absent on the other nodes
        latest = (ckpt_dir / "latest").read_text().strip()
    except FileNotFoundError:
        latest = None
    tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and re.fullmatch(r"step\d+", p.name)),
                  key=lambda p: int(p.name[4:]))
    old = [p for p in tags[:-keep_last] if p.name not in (latest, current)]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in old]
