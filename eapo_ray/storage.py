"""Where a run's output lives, so that it outlives the job that wrote it.

* `resolve_run_root`: the run root on the driver's node. Under `ray job submit` the current
  directory is Ray's unpacked copy of --working-dir (/tmp/ray/session_*/runtime_resources/...), a
  per-node cache that Ray evicts and a restart or a /tmp cleanup removes: there the default root is
  ~/eapo_runs and a relative run_root is refused.
* `storage_path` (a pyarrow.fs URI, s3://, gs://, hdfs://, file://, or a local/NFS path):
  `sync_run` uploads the run directory there at every checkpoint and at the end, from every alive
  node (each node's copy: the learners write their checkpoint shards on their own nodes), only
  the files that changed; `fetch_run` downloads one back (onto the driver's node) for `resume=<URI>`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from eapo_ray.config import ConfigError

JOB_RUN_ROOT = "~/eapo_runs"


def in_ray_job() -> bool:
    """True in the entrypoint of a Ray job (the job supervisor sets RAY_JOB_CONFIG_JSON_ENV_VAR for
    it), or when the current directory is inside Ray's runtime-env resources (a --working-dir copy)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or "runtime_resources" in Path.cwd().parts


def resolve_run_root(run_root: str) -> Path:
    """The absolute run root for config key `run_root` ("" = the default: runs/ here, ~/eapo_runs in a job)."""
    if not run_root:
        return Path(JOB_RUN_ROOT).expanduser() if in_ray_job() else Path("runs").resolve()
    root = Path(run_root).expanduser()
    if root.is_absolute():
        return root
    if in_ray_job():
        raise ConfigError(
            f"config key 'run_root': {run_root!r} is relative, and this is a Ray job whose current directory "
            f"({Path.cwd()}) may be Ray's temporary copy of --working-dir, which Ray deletes: give an absolute "
            f"path (shared storage for a multi-node run), or leave run_root unset for {JOB_RUN_ROOT}")
    return root.resolve()


def is_uri(path: str) -> bool:
    return "://" in path


def open_storage(uri: str):
    """(pyarrow filesystem, base path) for a storage URI or a local path."""
    from pyarrow import fs

    if not is_uri(uri):
        return fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 -- pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError
        raise ConfigError(f"config key 'storage_path': pyarrow.fs cannot open {uri!r}: {e}") from None
    return filesystem, path.rstrip("/")


def upload_tree(local_dir: str | Path, uri: str) -> int:
    """Copy the files under `local_dir` to `uri` (a directory), skipping those already there with
    the same size and a modification time no older than the local one. Returns the files copied."""
    from pyarrow import fs

    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        return 0
    dest_fs, base = open_storage(uri)
    local_fs = fs.LocalFileSystem()
    files = [p for p in local_dir.rglob("*") if p.is_file() and p.suffix != ".tmp"]
    dests = [f"{base}/{p.relative_to(local_dir).as_posix()}" for p in files]
    copied = 0
    for p, dest, info in zip(files, dests, dest_fs.get_file_info(dests) if dests else []):
        try:
            st = p.stat()
        except FileNotFoundError:  # pruned meanwhile
            continue
        if (info.type == fs.FileType.File and info.size == st.st_size and info.mtime_ns is not None
                and info.mtime_ns >= st.st_mtime_ns):
            continue
        dest_fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        fs.copy_files(str(p), dest, source_filesystem=local_fs, destination_filesystem=dest_fs)
        copied += 1
    return copied


def download_tree(uri: str, local_dir: str | Path) -> int:
    """Copy everything under `uri` into `local_dir`; returns the files there are at `uri`."""
    from pyarrow import fs

    src_fs, base = open_storage(uri)
    infos = [i for i in src_fs.get_file_info(fs.FileSelector(base, allow_not_found=True, recursive=True))
             if i.type == fs.FileType.File]
    if infos:
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        fs.copy_files(base, str(local_dir), source_filesystem=src_fs, destination_filesystem=fs.LocalFileSystem())
    return len(infos)


def prune_remote(uri: str, keep: int) -> list[str]:
    """Mirror learner.checkpoint_keep at the storage: delete all but the newest `keep` checkpoint
    tags (never the one `latest` names) and their driver_state_step*.json. Returns the deleted tags."""
    from pyarrow import fs

    if keep <= 0:
        return []
    dest_fs, base = open_storage(uri)
    ckpt = f"{base}/checkpoint"
    infos = dest_fs.get_file_info(fs.FileSelector(ckpt, allow_not_found=True))
    tags = sorted((i.base_name for i in infos if i.type == fs.FileType.Directory and re.fullmatch(r"step\d+", i.base_name)),
                  key=lambda t: int(t[4:]))
    latest_info = dest_fs.get_file_info(f"{ckpt}/latest")
    latest = None
    if latest_info.type == fs.FileType.File:
        with dest_fs.open_input_stream(f"{ckpt}/latest") as f:
            latest = f.read().decode().strip()
    old = [t for t in tags[:-keep] if t != latest]
    for tag in old:
        dest_fs.delete_dir(f"{ckpt}/{tag}")
        if dest_fs.get_file_info(f"{ckpt}/driver_state_{tag}.json").type == fs.FileType.File:
            dest_fs.delete_file(f"{ckpt}/driver_state_{tag}.json")
    return old


def _on_every_node(fn, *args, timeout_s: float) -> list:
    """fn(*args) here (the driver's node) and, as a 0-CPU task pinned to it, on every other alive node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from eapo_ray.ray_runtime import wait_get

    here = ray.get_runtime_context().get_node_id()
    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
            for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    return [fn(*args)] + [wait_get(r, timeout_s) for r in refs]


def sync_run(run_dir: Path, storage_path: str, run_name: str, keep: int, timeout_s: float = 3600.0) -> int:
    """Upload the run directory to <storage_path>/<run_name> from every node; returns the files copied."""
    uri = f"{storage_path.rstrip('/')}/{run_name}"
    copied = sum(_on_every_node(upload_tree, str(run_dir), uri, timeout_s=timeout_s))
    prune_remote(uri, keep)
    return copied


def fetch_run(uri: str, run_root: Path) -> Path:
    """`resume=<URI>`: download the stored run into <run_root>/<its name> on the driver's node (only
    there: a multi-node run resumes from a URI only if run_root is shared by the nodes). Returns
    the local run directory."""
    local = run_root / uri.rstrip("/").rsplit("/", 1)[-1]
    if download_tree(uri, local) == 0:
        raise ConfigError(f"config key 'resume': nothing is stored at {uri}")
    return local
