"""Fast tests of what the real-model configs rely on: model names resolved to directories
(built once, atomically, safe under a race), relative data paths that resolve from any working
directory, and prompt encoding through a chat template."""
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from eapo_ray import models
from eapo_ray.config import TINY_DIR, DataConfig, load_config
from eapo_ray.data import REPO_ROOT, encode_prompt, load_rows, render_prompt, resolve_data_paths, resolve_path


@pytest.fixture
def fake_builder(tmp_path, monkeypatch):
    """A model cache in tmp_path and a builder that writes a 'model' slowly and counts its calls."""
    monkeypatch.setenv("EAPO_MODEL_CACHE", str(tmp_path / "cache"))
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)  # long enough for a racing caller to arrive meanwhile
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setitem(models.NAMED, "fake-model", build)
    return calls


def test_a_path_stays_a_path():
    assert models.resolve_model(str(TINY_DIR / "policy")) == str(TINY_DIR / "policy")
    assert models.resolve_model("/nonexistent/model/dir") == "/nonexistent/model/dir"
    assert models.resolve_model("runs/x/final") == "runs/x/final"


def test_default_cache_dir_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("EAPO_MODEL_CACHE", raising=False)
    assert models.cache_dir() == Path.home() / ".cache" / "eapo_ray" / "models"
    monkeypatch.setenv("EAPO_MODEL_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    assert "smollm2-135m" in models.NAMED


def test_a_name_is_built_once_into_the_cache(fake_builder, tmp_path):
    path = models.resolve_model("fake-model")
    assert path == str(tmp_path / "cache" / "fake-model")
    assert (Path(path) / "model.safetensors").read_bytes() == b"weights"
    assert models.resolve_model("fake-model") == path and len(fake_builder) == 1  # reused, not rebuilt
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755  # not mkdtemp's private 0700
    assert fake_builder[0] != Path(path)  # built elsewhere, renamed into place
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name not in ("fake-model", ".fake-model.lock")]
    assert leftovers == []


def test_racing_callers_build_once_and_agree(fake_builder):
    got = []
    threads = [threading.Thread(target=lambda: got.append(models.resolve_model("fake-model"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 and len(set(got)) == 1 and len(fake_builder) == 1
    assert (Path(got[0]) / "config.json").exists()


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("EAPO_MODEL_CACHE", str(tmp_path))

    def broken(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    monkeypatch.setitem(models.NAMED, "broken-model", broken)
    with pytest.raises(RuntimeError, match="conversion failed"):
        models.resolve_model("broken-model")
    assert [p.name for p in tmp_path.iterdir()] == [".broken-model.lock"]


def test_a_partial_directory_is_reported_not_used(tmp_path, monkeypatch, fake_builder):
    (tmp_path / "cache" / "fake-model").mkdir(parents=True)
    (tmp_path / "cache" / "fake-model" / "config.json").write_text("{}")  # no weights
    with pytest.raises(RuntimeError, match="not a complete model directory"):
        models.resolve_model("fake-model")
    assert fake_builder == []


def test_resolve_models_rewrites_names_in_place(fake_builder, tmp_path):
    cfg = load_config(None, ["model.policy=fake-model"])
    expert = cfg.model.expert
    models.resolve_models(cfg)
    assert cfg.model.policy == str(tmp_path / "cache" / "fake-model") and cfg.model.expert == expert


# ---- relative data paths ----

def _jsonl(path: Path, n: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"problem": f"p{i}", "answer": str(i)}) + "\n" for i in range(n)))
    return path


def test_resolve_path_tries_cwd_then_bases_then_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "here.jsonl")
    assert resolve_path("here.jsonl") == Path("here.jsonl")  # the current directory first
    base = tmp_path / "cfgdir"
    _jsonl(base / "d" / "x.jsonl")
    assert resolve_path("d/x.jsonl", [base]) == base / "d" / "x.jsonl"
    assert resolve_path("d/x.jsonl") == Path("d/x.jsonl")  # found nowhere: as given (the error names it)
    assert resolve_path("pyproject.toml") == REPO_ROOT / "pyproject.toml"  # the repository root last
    assert resolve_path("/abs/missing.jsonl") == Path("/abs/missing.jsonl")


def test_load_rows_finds_repo_relative_files_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shared = REPO_ROOT.parent / "shared" / "data" / "gsm8k_test.jsonl"
    if not shared.exists():
        pytest.skip("../shared/data is not beside this checkout")
    rows = load_rows("../shared/data/gsm8k_test.jsonl", limit=3)
    assert len(rows) == 3 and all(r.problem and r.answer for r in rows)


def test_config_data_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    """A config outside the repo, run from a third directory: `data/...` next to the config and
    `../shared/...` beside the config's directory both resolve, to absolute paths."""
    proj = tmp_path / "proj"
    _jsonl(proj / "configs" / "data" / "train.jsonl")
    _jsonl(proj / "shared" / "held.jsonl")
    cfg_file = proj / "configs" / "run.yaml"
    cfg_file.write_text("data:\n  train: data/train.jsonl\n  heldout: shared/held.jsonl\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(cfg_file)
    assert cfg.data.train == str(proj / "configs" / "data" / "train.jsonl")
    assert cfg.data.heldout == str(proj / "shared" / "held.jsonl")
    assert [e.answer for e in load_rows(cfg.data.train)] == ["0", "1"]
    # overrides resolve the same way; bundled / hub / missing sources are left alone
    cfg = load_config(cfg_file, ["data.train=tiny:arith", "data.heldout=missing/nowhere.jsonl"])
    assert (cfg.data.train, cfg.data.heldout) == ("tiny:arith", "missing/nowhere.jsonl")
    d = DataConfig(train="hf:org/name:test", heldout="/abs/x.jsonl")
    resolve_data_paths(d, cfg_file)
    assert (d.train, d.heldout) == ("hf:org/name:test", "/abs/x.jsonl")


def test_smollm2_config_finds_the_shared_data_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if not (REPO_ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl").exists():
        pytest.skip("../shared/data is not beside this checkout")
    cfg = load_config(REPO_ROOT / "configs" / "smollm2_cpu.yaml")
    assert Path(cfg.data.train).is_absolute() and Path(cfg.data.train).name == "gsm8k_train.jsonl"
    assert Path(cfg.data.heldout).exists() and cfg.data.chat_template


# ---- prompt encoding ----

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tiny_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_DIR / "policy")


def test_encode_prompt_plain_is_the_rendered_template(tiny_tok):
    d = DataConfig(template="Q:{problem}\nA:")
    assert encode_prompt(tiny_tok, d, "2+3") == tiny_tok(render_prompt(d.template, "2+3"))["input_ids"]


def test_encode_prompt_wraps_the_template_in_the_chat_template(tiny_tok, monkeypatch):
    monkeypatch.setattr(tiny_tok, "chat_template", CHAT)
    d = DataConfig(template="Q:{problem}", chat_template=True)
    ids = encode_prompt(tiny_tok, d, "2+3")
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    expected = tiny_tok.apply_chat_template([{"role": "user", "content": "Q:2+3"}], add_generation_prompt=True,
                                            tokenize=False)
    assert expected.endswith("<|assistant|>") and "Q:2+3" in expected
    assert ids == tiny_tok(expected, add_special_tokens=False)["input_ids"]


def test_encode_prompt_without_a_chat_template_says_so(tiny_tok):
    assert not getattr(tiny_tok, "chat_template", None)
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(tiny_tok, DataConfig(chat_template=True), "2+3")
