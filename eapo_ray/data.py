"""Datasets: the bundled task, JSONL / Parquet files, or Hugging Face datasets, all as
rows of {"problem", "answer"} shown to the policy through one prompt template."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from eapo_ray import task


@dataclass(frozen=True)
class Example:
    problem: str
    answer: str
    level: int = 0
    # the whole row as read (a file's or dataset's other fields too); reward.fn gets it as `row`
    fields: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def row(self) -> dict:
        """The problem row handed to a reward.fn: every field of the file's row, or (the bundled
        task) problem, answer and level."""
        return dict(self.fields) or {"problem": self.problem, "answer": self.answer, "level": self.level}


class DataError(ValueError):
    pass


REPO_ROOT = Path(__file__).resolve().parent.parent


def render_prompt(template: str, problem: str) -> str:
    return template.replace("{problem}", problem)


def encode_prompt(tokenizer, data_cfg, problem: str) -> list[int]:
    """The prompt's token ids: the template filled in, and with `data.chat_template` wrapped as
    one user message in the tokenizer's chat template (with the assistant turn opened)."""
    text = render_prompt(data_cfg.template, problem)
    if getattr(data_cfg, "chat_template", False):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"data.chat_template is true but the tokenizer ({tokenizer.name_or_path}) has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(text)["input_ids"]


def resolve_path(source: str, base_dirs=()) -> Path:
    """A data file path: as given (absolute, or relative to the current directory), else
    relative to each of `base_dirs` (load_config passes the config file's directory and its
    parent), else relative to the repository root, so `../shared/data/...` in a config works
    from any directory. The first that exists wins; nothing found: the path as given."""
    path = Path(source).expanduser()
    if path.exists() or path.is_absolute():
        return path
    for base in [*base_dirs, REPO_ROOT]:
        alt = Path(base) / path
        if alt.exists():
            return alt
    return path


def resolve_data_paths(data_cfg, config_path=None) -> None:
    """Rewrite `data.train` / `data.heldout` (a config.DataConfig), when they are relative file
    paths found by `resolve_path` (current directory, the config file's directory and its
    parent, the repository root), into absolute paths, so every actor reads the same file
    whatever its working directory. Bundled (tiny:) and hub (hf:) sources, and paths found
    nowhere (an error when loaded, naming the path), stay as they are."""
    bases = []
    if config_path is not None:
        cdir = Path(config_path).expanduser().resolve().parent
        bases = [cdir, cdir.parent]
    for key in ("train", "heldout"):
        source = getattr(data_cfg, key)
        if source.startswith(("tiny:", "hf:")) or Path(source).expanduser().is_absolute():
            continue
        path = resolve_path(source, bases)
        if path.exists():
            setattr(data_cfg, key, str(path.resolve()))


MAX_LINE_BYTES = 16 << 20  # a JSONL row longer than this is an error, not a memory blow-up


def _rows_from_file(path: Path):
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            lineno = 0
            while raw := f.readline(MAX_LINE_BYTES + 1):
                lineno += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES >> 20} MiB")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                yield f"{path}:{lineno}", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}: row {i}", row
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected .jsonl or .parquet)")


def _rows_from_hub(spec: str):
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{spec}: install the 'datasets' package (pip install 'eapo_ray[hf]')") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise DataError(f"hf:{spec}: could not load from the Hugging Face hub ({type(e).__name__}: {e})") from None
    for i, row in enumerate(ds):
        yield f"hf:{spec}: row {i}", row


def load_rows(source: str, problem_key: str = "problem", answer_key: str = "answer",
              limit: int | None = None) -> list[Example]:
    """Rows of a JSONL/Parquet file or an "hf:name[:split]" dataset. A row without the
    keys, or with an empty answer, is an error naming the file and line."""
    rows = _rows_from_hub(source[3:]) if source.startswith("hf:") else None
    if rows is None:
        path = resolve_path(source)
        if not path.exists():
            raise DataError(f"data file not found: {path} (relative paths are tried from the current directory "
                            f"and from {REPO_ROOT})")
        rows = _rows_from_file(path)
    out = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with '{problem_key}' and '{answer_key}', got {type(row).__name__}")
        missing = [k for k in (problem_key, answer_key) if k not in row or row[k] is None]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing} (have {sorted(row)})")
        problem, answer = str(row[problem_key]).strip(), str(row[answer_key]).strip()
        if not problem or not answer:
            raise DataError(f"{where}: empty '{problem_key}' or '{answer_key}'")
        level = row.get("level")
        out.append(Example(problem, answer, level if isinstance(level, int) else 0, fields=row))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{source}: no rows (an empty file, or only blank lines)")
    return out


def load_split(source: str, split: str, levels: list[int], n: int, seed: int,
               problem_key: str = "problem", answer_key: str = "answer") -> list[Example]:
    """`source` "tiny:arith" / "tiny:arith-mul" draws that bundled task's `split`; anything else is loaded as rows."""
    if source in task.FAMILIES:
        return [Example(p.problem, p.answer, p.level)
                for p in task.sample_problems(n, levels, split, seed, task.FAMILIES[source])]
    if source.startswith("tiny:"):
        raise DataError(f"unknown bundled task {source!r} (available: {', '.join(task.FAMILIES)})")
    return load_rows(source, problem_key, answer_key, limit=n or None)


def train_examples(cfg) -> list[Example]:
    """The training problems of a run config (config.RunConfig), drawn with `seed`."""
    d = cfg.data
    return load_split(d.train, "train", d.train_levels, d.num_train, cfg.seed, d.problem_key, d.answer_key)


def heldout_examples(cfg, n: int | None = None, source: str | None = None) -> list[Example]:
    """The held-out problems every evaluation of a run uses (drawn with `seed + 1`): `n`
    (default data.num_heldout; 0 = every row) from `source` (default data.heldout)."""
    d = cfg.data
    return load_split(source or d.heldout, "heldout", d.heldout_levels, d.num_heldout if n is None else n,
                      cfg.seed + 1, d.problem_key, d.answer_key)


def check_data(cfg) -> str:
    """Read and validate the run's (config.RunConfig) training and held-out data as the actors
    will, before anything starts: a bad row is a DataError naming its file:line, and a file is
    read to its end even where the run uses only its first data.num_train rows. Returns one
    line with the row counts."""
    d = cfg.data
    parts = []
    for what, source, n, examples in (("train", d.train, d.num_train, train_examples),
                                      ("held-out", d.heldout, d.num_heldout, heldout_examples)):
        used = len(examples(cfg))
        if source in task.FAMILIES:
            parts.append(f"{what} {used} problems drawn from the bundled {source}")
            continue
        total = used if source.startswith("hf:") else len(load_rows(source, d.problem_key, d.answer_key))
        parts.append(f"{what} {used} of {total} rows of {source}" + (f" (data.num_{'train' if what == 'train' else 'heldout'}"
                                                                    f"={n})" if n and n < total else ""))
    return "data: " + "; ".join(parts)


def zero_reward_causes(cfg, *, tokenizer_has_chat_template: bool, overlong_frac: float, formatted_frac: float) -> list[str]:
    """The likely causes of a rollout batch in which no sample earned any reward (config.RunConfig
    `cfg`; what the batch measured): the template, the answer tag, the length budget, the chat
    template, the reward function. Printed once by the driver (`warn_zero_reward`)."""
    d, p, r, rw = cfg.data, cfg.protocol, cfg.rollout, cfg.reward
    out = []
    if rw.fn:
        out.append(f"reward.fn {rw.fn} returned 0 for every sample: check it on a few responses")
    if rw.require_answer_tags and p.answer_open not in d.template:
        out.append(f"data.template never mentions the answer tag {p.answer_open}...{p.answer_close}: the reward reads "
                   f"only an answer inside it (reward.require_answer_tags). Tell the model, e.g. 'put the final answer "
                   f"as {p.answer_open}\\boxed{{...}}{p.answer_close}' (docs/your_model.md)")
    elif not rw.require_answer_tags and "boxed" not in d.template:
        out.append("data.template never asks for \\boxed{...}: with reward.require_answer_tags=false the reward reads the "
                   "last \\boxed{} of the response")
    if overlong_frac >= 0.25:
        out.append(f"{overlong_frac:.0%} of the responses were cut by the length budget before they answered "
                   f"(rollout.max_response_tokens={r.max_response_tokens}, rollout.max_new_tokens_per_turn="
                   f"{r.max_new_tokens_per_turn}): raise them for a model that reasons at length")
    if tokenizer_has_chat_template and not d.chat_template and "<|" not in d.template:
        out.append("the policy's tokenizer has a chat template but data.chat_template is false: an instruction-tuned "
                   "model shown a bare prompt often rambles; set data.chat_template=true")
    if formatted_frac == 0 and not rw.fn:
        out.append("no response held a well-formed answer (reward.format_reward was never earned either)")
    out.append(f"the gold answers ({d.answer_key!r} of {d.train}) may not be in the form the model writes; look at "
               "a few responses: python -m eapo_ray.evaluate --config <run dir>/config.json --checkpoint "
               f"{cfg.model.policy} --data {d.train} --limit 4")
    return out


_WARNED_ZERO_REWARD: list = []
OVERLONG_WARN_FRAC = 0.1  # a batch with at least this share of responses cut by the length budget is warned about


def overlong_warning(cfg, overlong_frac: float) -> str | None:
    """The warning for a rollout batch in which `overlong_frac` of the responses were cut by the
    length budget (config.RunConfig `cfg`), or None below OVERLONG_WARN_FRAC. A cut response scores
    0 and (algo.overlong_filter) is masked out, so a budget that cuts right answers teaches the
    policy to answer short: on tiny:arith-chain, 6 operations need 59-72 tokens, a 64-token turn cut
    most of them and RL learned short, formatted, wrong chains. Printed once by the driver (`warn_overlong`)."""
    if overlong_frac < OVERLONG_WARN_FRAC:
        return None
    r = cfg.rollout
    return (f"{overlong_frac:.0%} of a rollout batch's responses were cut by the length budget before they answered "
            f"(every training turn but the last gets rollout.max_new_tokens_per_turn={r.max_new_tokens_per_turn} "
            f"tokens, the whole response rollout.max_response_tokens={r.max_response_tokens}); a cut response scores "
            f"0, so a budget shorter than a right answer teaches the policy to answer short: raise them "
            f"(rollout_overlong_frac in metrics.jsonl, per batch)")


_WARNED_OVERLONG: list = []


def warn_overlong(stats: dict) -> bool:
    """Print a batch's `overlong_warning` (rollout.actor adds it to the stats) the first time one
    comes; once per process. Takes the text out of `stats` (the metrics rows stay numeric).
    Returns whether it printed."""
    text = stats.pop("overlong_warning", None)
    if not text or _WARNED_OVERLONG:
        return False
    _WARNED_OVERLONG.append(True)
    print(f"[eapo] warning: {text}", flush=True)
    return True


def warn_zero_reward(stats: dict) -> bool:
    """Print the likely causes the first time a rollout batch's stats carry them (the batch had
    zero reward on every sample: rollout.actor adds `zero_reward_causes`); once per process.
    Returns whether it printed."""
    causes = stats.get("zero_reward_causes")
    if not causes or _WARNED_ZERO_REWARD:
        return False
    _WARNED_ZERO_REWARD.append(True)
    lines = "\n".join(f"[eapo]   - {c}" for c in causes)
    print(f"[eapo] warning: a rollout batch with zero reward on all {stats.get('samples', '?')} samples; "
          f"likely causes:\n{lines}", flush=True)
    return True
