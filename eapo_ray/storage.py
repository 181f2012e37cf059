"""Where a run's output lives, so that it outlives the job that wrote it.

* `resolve_run_root`: the run root on the driver's node. Under `ray job submit` the current
  directory is Ray's unpacked copy of --working-dir (/tmp/ray/session_*/runtime_resources/...), a
  per-node cache that Ray evicts and a restart or a /tmp cleanup removes: there the default root is
  ~/eapo_runs and a relative run_root is refused.
* `storage_path` (a pyarrow.fs URI, s3://, gs://, hdfs://, file://, or a local/NFS path):
  `sync_run` uploads the run directory there at every checkpoint and at the end, from every alive
  node (each node's copy: the learners write their checkpoint shards on their own nodes), only
  the files that changed, all nodes within one deadline; a failed node raises `UploadFailed`
  (after the others have uploaded), which the driver reports and lives with.
* `resume=<URI>`: `fetch_resume` (called by the launcher before the config is read) downloads the
  stored run (onto the driver's node) and points `resume` at the local copy, so the resume takes
  the run's saved config and checks its pinned keys as for a local run directory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from eapo_ray.config import ConfigError, parse_override, read_yaml

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


class UploadFailed(RuntimeError):
    """A sync to storage_path failed on some node (the others' files are uploaded)."""


def _on_every_node(fn, *args, timeout_s: float) -> tuple[list, list[str]]:
    """fn(*args) here (the driver's node, in a thread) and, as a 0-CPU task pinned to it, on every
    other alive node, all at once and all within one deadline of `timeout_s` seconds. Returns
    (the results of the nodes that finished, one line per node that failed or ran past the
    deadline: that node's task is cancelled; a local call past it is left in its daemon thread)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from eapo_ray.ray_runtime import bounded_call, wait_get

    deadline = time.monotonic() + timeout_s
    here = ray.get_runtime_context().get_node_id()
    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {n["NodeID"]: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(*args) for n in ray.nodes() if n["Alive"] and n["NodeID"] != here}
    results, errors = [], []
    try:
        results.append(bounded_call(lambda: fn(*args), timeout_s, "the driver's node"))
    except Exception as e:  # noqa: BLE001 -- pyarrow OSError, TimeoutError, ...: reported, the others go on
        errors.append(f"the driver's node: {type(e).__name__}: {e}")
    for node, ref in refs.items():
        try:
            results.append(wait_get(ref, max(0.0, deadline - time.monotonic())))
        except Exception as e:  # noqa: BLE001 -- GetTimeoutError, the task's error, a dead node
            errors.append(f"node {node[:12]}: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 -- already finished / node gone
                pass
    return results, errors


def sync_run(run_dir: Path, storage_path: str, run_name: str, keep: int, timeout_s: float = 3600.0) -> int:
    """Upload the run directory to <storage_path>/<run_name> from every node, within `timeout_s`
    seconds in all; returns the files copied. Raises UploadFailed naming each node that failed
    (then the store's old checkpoint tags are not pruned: its newest tag may be incomplete)."""
    uri = f"{storage_path.rstrip('/')}/{run_name}"
    results, errors = _on_every_node(upload_tree, str(run_dir), uri, timeout_s=timeout_s)
    if errors:
        raise UploadFailed(f"upload to {uri} failed on {len(errors)} node(s) ({sum(results)} files copied from "
                           f"the others; old checkpoint tags there kept): " + "; ".join(errors))
    prune_remote(uri, keep)
    return sum(results)


def run_name_of(uri: str) -> str:
    """The run's name in a storage URI: its last path component (a ?query left out)."""
    return uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def fetch_run(uri: str, run_root: Path) -> Path:
    """`resume=<URI>`: download the stored run into <run_root>/<its name> on the driver's node (only
    there: a multi-node run resumes from a URI only if run_root is shared by the nodes). Returns
    the local run directory. It goes into a temporary sibling first and is renamed into place
    once complete. If <run_root>/<name> already exists, nothing is downloaded and the error says
    so: a local copy may hold files newer than the store's (a later checkpoint not yet
    uploaded), and mixing the two could pair one checkpoint's shards with another's."""
    local = Path(run_root) / run_name_of(uri)
    if local.exists():
        raise ConfigError(f"config key 'resume': {uri} would be downloaded into {local}, which already exists "
                          f"(it may hold newer files than the store): resume from it with resume={local}, or "
                          "move it away to download the stored run")
    part = local.with_name(local.name + ".download")
    shutil.rmtree(part, ignore_errors=True)  # an earlier, interrupted download
    try:
        if download_tree(uri, part) == 0:
            raise ConfigError(f"config key 'resume': nothing is stored at {uri}")
        part.rename(local)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return local


def fetch_resume(config_path: str | Path | None, overrides: list[str]) -> list[str]:
    """The launcher's step before load_config: when `resume` (an override, else the --config
    file's) is a storage URI, download that run with `fetch_run` into the run root (the command
    line's / config file's run_root, else the default) and return the overrides with
    `resume=<the local copy>`; otherwise the overrides unchanged."""
    data = read_yaml(Path(config_path)) if config_path else {}
    resume, root = data.get("resume"), data.get("run_root", "")
    for item in overrides:
        keys, value = parse_override(item)
        if keys == ["resume"]:
            resume = value
        elif keys == ["run_root"]:
            root = value
    if not (isinstance(resume, str) and is_uri(resume)):
        return list(overrides)
    local = fetch_run(resume, resolve_run_root(root if isinstance(root, str) else str(root)))
    import sys

    print(f"[eapo] downloaded {resume} into {local}", file=sys.stderr, flush=True)  # stdout: --print-config's YAML
    kept = [o for o in overrides if parse_override(o)[0] != ["resume"]]
    return kept + [f"resume={json.dumps(str(local))}"]  # quoted: YAML reads it back as this very string
