"""The table's rows: each a config file in configs/paper/ (a delta on eapo.yaml), a label and a
kind (how it is produced), and the step scaling that keeps every row's schedules in proportion.
A config file whose first line is `# label: <text>` gives its row that label (configs/mul: its
rows are not the paper task's, e.g. its weak expert is a weaker model, not a hotter one);
`labelled` applies it."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from eapo_ray.config import RunConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "paper"


@dataclass(frozen=True)
class Row:
    name: str  # configs/paper/<name>.yaml
    label: str
    kind: str  # "base" | "workflow" | "distill" | "train"
    core: bool = True  # core rows are never dropped to fit the budget


# Table order; ablations are dropped from the end of this list first.
ROWS = (
    Row("base", "base policy", "base"),
    Row("workflow", "expert-assisted workflow (policy + expert at inference)", "workflow"),
    Row("distill", "distillation from the expert (SFT)", "distill"),
    Row("rl", "self-exploratory RL (GRPO/DAPO, no expert)", "train"),
    Row("eapo", "EAPO (linear 1 -> 0 over 75% of steps, K=3)", "train"),
    Row("eapo_weak_expert", "ablation: weak expert (T=2.0)", "train", core=False),
    Row("eapo_constant", "ablation: expert always answers (rho=1)", "train", core=False),
    Row("eapo_sequential", "ablation: sequential consult (K=1)", "train", core=False),
    Row("eapo_inverse", "ablation: rho = min(1, 10/s)", "train", core=False),
    Row("eapo_step", "ablation: rho = 1 until 50% of steps, then 0", "train", core=False),
)


# Rows only some config directories have (configs/mul): run when <config dir>/<row>.yaml exists.
EXTRA_ROWS = (
    Row("eapo_sft", "EAPO + NLL on accepted expert tokens (coef annealed with rho)", "train", core=False),
    Row("eapo_luffy", "EAPO + LUFFY-style off-policy expert tokens", "train", core=False),
    Row("eapo_replay", "EAPO + replay (accepted replies as the policy's own steps, NLL x rho)", "train", core=False),
    Row("control_own_steps", "control: no consult action + expert answers as NLL on own steps", "train", core=False),
    Row("eapo_replay_adv", "EAPO + replay (advantage-weighted)", "train", core=False),
    Row("rl_turn1", "RL, turn budget shrinking to 1 (rollout.min_train_turns=1)", "train", core=False),
    Row("eapo_turn1", "EAPO, turn budget shrinking to 1 (rollout.min_train_turns=1)", "train", core=False),
    Row("rl_cost", "RL with a per-consult cost (algo.consult_cost=0.05)", "train", core=False),
    Row("eapo_cost", "EAPO with a per-consult cost (algo.consult_cost=0.05)", "train", core=False),
    Row("eapo_replay_coef4", "EAPO + replay, coefficient 4 (NLL x 4 x rho)", "train", core=False),
    Row("rl_noconsult", "control: RL with no consult action (consult tag banned in training)", "train", core=False),
)
ROW_BY_NAME = {r.name: r for r in ROWS + EXTRA_ROWS}


def set_config_dir(path) -> None:
    """The rows' config directory: configs/paper (tiny:arith, default) or configs/mul (tiny:arith-mul)."""
    global CONFIG_DIR
    CONFIG_DIR = Path(path).resolve()


def config_path(row: Row) -> Path:
    return CONFIG_DIR / f"{row.name}.yaml"


LABEL_PREFIX = "# label:"


def row_label(row: Row) -> str:
    """The label the row's config file declares on its first line (`# label: <text>`), else
    the row's default (the paper task's)."""
    path = config_path(row)
    if path.exists():
        with path.open() as f:
            first = f.readline().strip()
        if first.startswith(LABEL_PREFIX) and first[len(LABEL_PREFIX):].strip():
            return first[len(LABEL_PREFIX):].strip()
    return row.label


def labelled(row: Row) -> Row:
    return replace(row, label=row_label(row))


def step_overrides(cfg: RunConfig, steps: int) -> list[str]:
    """Overrides that run `cfg` for `steps` learner steps instead of cfg.steps, with the
    step-based schedules (acceptance, turn budget, evaluation interval) scaled in proportion."""
    if steps == cfg.steps:
        return []
    f = steps / cfg.steps
    out = [f"steps={steps}", f"acceptance.total_steps={max(1, round(cfg.acceptance.total_steps * f))}"]
    if cfg.acceptance.kind == "inverse":
        out.append(f"acceptance.scale={cfg.acceptance.scale * f:g}")
    if cfg.eval.every:
        out.append(f"eval.every={max(1, round(cfg.eval.every * f))}")
    if cfg.rollout.turn_budget_steps > 0:
        out.append(f"rollout.turn_budget_steps={max(1, round(cfg.rollout.turn_budget_steps * f))}")
    return out


def distill_steps(cfg: RunConfig, steps: int, batch_size: int) -> int:
    """SFT steps that show the policy as many samples as an RL run of `steps` steps trains on."""
    return max(1, round(steps * cfg.rollout.prompts_per_batch * cfg.rollout.group_size / batch_size))
