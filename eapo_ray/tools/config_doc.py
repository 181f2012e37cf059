"""docs/configuration.md, generated from eapo_ray/config.py: every key of the run config with its
type, default, allowed values (a ``Literal``'s choices, the checks in ``config.validate`` and in the
sections' ``__post_init__``) and the comment written beside it in the source.

    python -m eapo_ray.tools.config_doc > docs/configuration.md    # regenerate the page
    python -m eapo_ray.tools.config_doc --check                    # exit 1 if the page is out of date

Comments are read from the source: a field's trailing comment, the comment lines directly above it,
and comment lines directly below it when no field follows them (a wrapped trailing comment).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import typing
from pathlib import Path

REGENERATE = "python -m eapo_ray.tools.config_doc > docs/configuration.md"
DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


@dataclasses.dataclass
class KeyDoc:
    key: str  # dotted, as an override names it: rollout.vllm.dtype
    type: str
    default: str
    allowed: list[str]
    comment: str


def _class_source(cls) -> tuple[ast.ClassDef, list[str]]:
    lines, _ = inspect.getsourcelines(cls)
    src = textwrap.dedent("".join(lines))
    node = ast.parse(src).body[0]
    assert isinstance(node, ast.ClassDef), cls
    return node, src.splitlines()


def _comment_tokens(src_lines: list[str]) -> dict[int, str]:
    """line number (1-based) -> the comment on it, without '#'."""
    out = {}
    toks = tokenize.generate_tokens(io.StringIO("\n".join(src_lines) + "\n").readline)
    for tok in toks:
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def field_comments(cls) -> dict[str, str]:
    """Field name -> the comment written beside it in `cls`'s source ('' when none)."""
    node, lines = _class_source(cls)
    comments = _comment_tokens(lines)

    def comment_only(n: int) -> bool:
        return 1 <= n <= len(lines) and lines[n - 1].strip().startswith("#")

    fields = [(f.target.id, f.lineno, f.end_lineno) for f in node.body
              if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name)]
    field_starts = {start for _, start, _ in fields}
    out = {}
    for name, start, end in fields:
        above, n = [], start - 1
        while comment_only(n):
            above.insert(0, comments[n])
            n -= 1
        own = [comments[i] for i in range(start, end + 1) if i in comments]
        below, n = [], end + 1
        while comment_only(n):
            below.append(comments[n])
            n += 1
        if n in field_starts:  # the lines below introduce the next field, not this one
            below = []
        out[name] = " ".join(above + own + below).strip()
    return out


def _render_fstring(node: ast.AST) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}" for v in node.values)
    return ""


def post_init_checks(cls, section: str) -> tuple[dict[str, list[str]], list[str]]:
    """The ValueError messages of `cls.__post_init__`: per key ('section.key must ...'), and the rest."""
    node, _ = _class_source(cls)
    per_key: dict[str, list[str]] = {}
    other: list[str] = []
    for fn in node.body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name == "__post_init__"):
            continue
        for r in ast.walk(fn):
            if isinstance(r, ast.Raise) and isinstance(r.exc, ast.Call) and r.exc.args:
                msg = _render_fstring(r.exc.args[0]).split(", got")[0].strip()
                if not msg or "{" in msg:  # a message that names its key through a variable: skipped
                    continue
                m = re.fullmatch(rf"{re.escape(section)}\.(\w+) (.+)", msg)
                if m:
                    per_key.setdefault(m.group(1), []).append(m.group(2))
                else:
                    other.append(msg)
    return per_key, other


def validate_checks() -> dict[str, list[str]]:
    """`config.validate`'s (condition, "key", "message") rows: dotted key -> messages."""
    from eapo_ray import config

    tree = ast.parse(inspect.getsource(config.validate))
    out: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple) and len(node.elts) == 3:
            key, msg = node.elts[1], node.elts[2]
            if all(isinstance(x, ast.Constant) and isinstance(x.value, str) for x in (key, msg)):
                out.setdefault(key.value, []).append(msg.value)
    return out


def _type_name(typ) -> tuple[str, list[str]]:
    """A readable type, and a Literal's choices."""
    origin = typing.get_origin(typ)
    if origin is typing.Literal:
        choices = typing.get_args(typ)
        return type(choices[0]).__name__, [json.dumps(c) for c in choices]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        name, choices = _type_name(args[0])
        return name + " or null", choices
    if typ is list or origin is list:
        return "list", []
    return getattr(typ, "__name__", str(typ)), []


def format_value(value) -> str:
    """A default as it would be written in YAML / an override."""
    from eapo_ray.config import PACKAGE_DIR

    if isinstance(value, str):
        if value.startswith(str(PACKAGE_DIR)):
            return "<eapo_ray>" + value[len(str(PACKAGE_DIR)):]
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return json.dumps(value) if isinstance(value, list) else repr(value)


def sections() -> list[tuple[str, type, dict, list[KeyDoc], list[str]]]:
    """(dotted section, its class, its defaults, its keys, its other checks), in config order;
    "" is the top level."""
    from eapo_ray.config import RunConfig, to_dict

    checks = validate_checks()
    out = []

    def walk(cls, defaults: dict, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        section = prefix.rstrip(".")
        per_key, other = post_init_checks(cls, section.split(".")[-1]) if section else ({}, [])
        keys, nested = [], []
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            if dataclasses.is_dataclass(typ):
                nested.append((typ, defaults[f.name], prefix + f.name + "."))
                continue
            name, choices = _type_name(typ)
            allowed = choices + per_key.get(f.name, []) + checks.get(prefix + f.name, [])
            keys.append(KeyDoc(prefix + f.name, name, format_value(defaults[f.name]), allowed, comments[f.name]))
        out.append((section, cls, defaults, keys, other))
        for typ, sub, sub_prefix in nested:
            walk(typ, sub, sub_prefix)

    walk(RunConfig, to_dict(RunConfig()), "")
    return out


def _md(text: str) -> str:
    """Plain text for a table cell: code spans kept; | < * escaped outside them (no HTML tag, no emphasis)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")
    return "`".join(parts) if len(parts) % 2 else text.replace("|", "\\|")


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


HEADER = f"""# Configuration reference

<!-- generated from eapo_ray/config.py by `{REGENERATE}`: do not edit by hand -->

Generated from `eapo_ray/config.py` (and the algorithm sections it imports from `eapo_ray/algo/`)
by `{REGENERATE}`; `tests/unit/test_config_doc.py` fails when this page is out of date.

How a run's configuration is made: the dataclass defaults below **are** the embedded default run
(what `python -m eapo_ray.launch` and `make demo` run: the bundled tiny models, a local Ray cluster,
CPU). A YAML file given with `--config FILE` is a delta on them: it names only the keys it changes,
and may start from another file with `base: other.yaml` (relative to the file; chains allowed).
Then every `section.key=value` on the command line overrides it:

```bash
python -m eapo_ray.launch --config configs/tiny_cpu_vllm.yaml rollout.num_actors=2 learner.lr=3e-5
python -m eapo_ray.launch --config configs/tiny_cpu_vllm.yaml --print-config   # the resolved result
```

An unknown key, a wrong type or a value outside "allowed" fails at once, naming the key.
Defaults are written as in YAML; `<eapo_ray>` is the installed package's directory (the bundled
models). "Allowed" lists a key's choices and the checks the loader makes.
"""


def render() -> str:
    out = [HEADER]
    secs = sections()
    out.append("Sections: " + ", ".join(f"[{s or 'top level'}](#{_anchor(s)})" for s, *_ in secs) + ".\n")
    for section, cls, _, keys, other in secs:
        out.append(f"## {section or 'top level'}\n")
        doc = inspect.getdoc(cls) if section and cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
        if doc:
            out.append(_md(" ".join(doc.split())) + "\n")
        if other:
            out.append("Checked: " + "; ".join(_md(o) for o in other) + ".\n")
        if not keys:
            out.append("(Only sub-sections.)\n")
            continue
        out.append("| key | type | default | allowed | what it does |")
        out.append("|---|---|---|---|---|")
        for k in keys:
            allowed = ", ".join(_md(a) if not a.startswith('"') else _code(a) for a in k.allowed)
            out.append(f"| `{k.key}` | {k.type} | {_code(k.default)} | {allowed} | {_md(k.comment)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _anchor(section: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", (section or "top level").lower()).replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m eapo_ray.tools.config_doc", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", nargs="?", const=str(DOC_PATH), metavar="PATH",
                    help=f"compare with PATH (default {DOC_PATH.relative_to(DOC_PATH.parents[1])}) instead of printing; "
                         "exit 1 if it differs")
    args = ap.parse_args(argv)
    text = render()
    if args.check is None:
        sys.stdout.write(text)
        return 0
    path = Path(args.check)
    current = path.read_text() if path.is_file() else ""
    if current == text:
        return 0
    print(f"{path} is out of date with eapo_ray/config.py; regenerate it from the repository root with:\n"
          f"    {REGENERATE}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
