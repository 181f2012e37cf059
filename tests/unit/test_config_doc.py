"""docs/configuration.md is generated from eapo_ray/config.py and current (as cluster/grafana_eapo.json
is); the generator reads every key, its default, its choices/checks and its source comment; and the
README's checkable claims hold: its length, its links, its config files and override keys. Fast: no
Ray start."""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from eapo_ray.config import PACKAGE_DIR, RunConfig, load_config
from eapo_ray.tools import config_doc

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_MAX_WORDS = 2500  # a user guide; the lab notebook lives in docs/


def all_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += all_keys(hints[f.name], prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


# ---- the configuration page ----

def test_configuration_page_is_current():
    shipped = (ROOT / "docs" / "configuration.md").read_text()
    assert shipped == config_doc.render(), (
        f"docs/configuration.md is out of date with eapo_ray/config.py; regenerate it from the repository root with:"
        f"\n    {config_doc.REGENERATE}")


def test_every_key_has_a_row_with_its_default():
    page = config_doc.render()
    defaults = dataclasses.asdict(RunConfig())
    for key in all_keys():
        value = defaults
        for part in key.split("."):
            value = value[part]
        row = re.search(rf"^\| `{re.escape(key)}` \| [^|]+ \| `(.*?)` \|", page, re.M)
        assert row, f"no row for {key}"
        assert row.group(1) == config_doc.format_value(value).replace("|", "\\|"), key
    assert str(PACKAGE_DIR) not in page and str(ROOT) not in page, "the page must not depend on where the checkout is"


def test_check_flag_passes_on_the_current_page_and_fails_on_a_stale_one(tmp_path, capsys):
    current = tmp_path / "configuration.md"
    current.write_text(config_doc.render())
    assert config_doc.main(["--check", str(current)]) == 0
    stale = tmp_path / "stale.md"
    stale.write_text(config_doc.render().replace("| `learner.lr` |", "| `learner.learning_rate` |"))
    assert config_doc.main(["--check", str(stale)]) == 1
    assert config_doc.REGENERATE in capsys.readouterr().err


@dataclass
class _Section:
    """A section's docstring."""

    # a comment block above a field
    # (two lines)
    above: int = 1
    trailing: Literal["x", "y"] = "x"  # a trailing comment
    bare: float = 0.5
    wrapped: bool = False  # a trailing comment
    # lines directly above a field are that field's
    last: str = "a|b"  # a trailing comment that
    # wraps onto the next line (no field follows)

    def __post_init__(self):
        if self.above < 0:
            raise ValueError(f"demo.above must be >= 0, got {self.above}")
        if self.bare > self.above:
            raise ValueError(f"demo needs bare <= above, got {self.bare}")


def test_comments_are_read_from_above_beside_and_wrapped_below():
    assert config_doc.field_comments(_Section) == {
        "above": "a comment block above a field (two lines)",
        "trailing": "a trailing comment",
        "bare": "",
        "wrapped": "a trailing comment",
        "last": "lines directly above a field are that field's a trailing comment that wraps onto the next line "
                "(no field follows)",
    }
    per_key, other = config_doc.post_init_checks(_Section, "demo")
    assert per_key == {"above": ["must be >= 0"]}
    assert other == ["demo needs bare <= above"]
    assert config_doc._type_name(typing.get_type_hints(_Section)["trailing"]) == ("str", ['"x"', '"y"'])


def test_choices_and_checks_reach_the_page():
    page = config_doc.render()
    engine = next(line for line in page.splitlines() if line.startswith("| `rollout.engine` |"))
    assert '`"hf"`' in engine and '`"vllm"`' in engine
    steps = next(line for line in page.splitlines() if line.startswith("| `steps` |"))
    assert "must be >= 1" in steps  # from config.validate


# ---- the README ----

def readme() -> str:
    return README.read_text()


def test_readme_is_a_guide_not_a_notebook():
    words = len(readme().split())  # what `wc -w README.md` counts
    assert words <= README_MAX_WORDS, (
        f"README.md has {words} words (limit {README_MAX_WORDS}): move detail into docs/ and link it")
    assert "../shared" not in readme(), "the README must not point outside the repository"
    assert not re.search(r"\bissues? #?\d+", readme(), re.I), "no internal issue numbers in the README"


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings (lower case, punctuation dropped, spaces -> -)."""
    out, seen, fenced = set(), {}, False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} (.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


@pytest.mark.parametrize("page", ["README.md", "docs/operations.md", "docs/configuration.md"])
def test_relative_links_and_their_anchors_resolve(page):
    path = ROOT / page
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        dest = path.parent / target if target else path
        assert dest.exists(), f"{page} links to {target}, which does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in heading_anchors(dest), f"{page} links to {target}#{anchor}: no such heading"


def test_readme_configs_and_override_keys_exist():
    """Every `--config FILE` in the README and docs/operations.md loads; every `section.key` the README
    names (backticked, or as `key=` in a code block) is a config key."""
    text = readme()
    for page in (README, ROOT / "docs" / "operations.md"):
        for cfg in set(re.findall(r"--config (configs/[\w./-]+\.yaml)", page.read_text())):
            assert (ROOT / cfg).is_file(), f"{page.name} runs a config that does not exist: {cfg}"
            load_config(ROOT / cfg)
    keys = set(all_keys())
    sections = {k.split(".")[0] for k in keys if "." in k}
    code = "\n".join(re.findall(r"```(?:bash)?\n(.*?)```", text, re.S))
    named = set(re.findall(r"(?<![\w./-])([a-z_]+(?:\.[a-z_]+)+)=", code))
    named |= {k for k in re.findall(r"`([a-z_]+\.[a-z_.]+)`", text) if k.split(".")[0] in sections}
    modules = {k for k in named if (ROOT / "eapo_ray" / k.split(".")[0] / (k.split(".")[1] + ".py")).exists()}
    unknown = sorted(k for k in named - modules if k.split(".")[0] in sections and k not in keys)
    assert not unknown, f"README.md names config keys that do not exist: {unknown}"
