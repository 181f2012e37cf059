import math

import pytest

from eapo_ray.algo.schedules import AcceptanceConfig, acceptance_prob, turn_budget


def test_inverse_is_one_over_step():
    cfg = AcceptanceConfig()
    assert acceptance_prob(0, cfg) == 1.0
    assert acceptance_prob(1, cfg) == 1.0
    assert acceptance_prob(2, cfg) == 0.5
    assert acceptance_prob(10, cfg) == pytest.approx(0.1)
    scaled = AcceptanceConfig(scale=20.0)
    assert acceptance_prob(10, scaled) == 1.0 and acceptance_prob(40, scaled) == 0.5


def test_linear_boundaries():
    cfg = AcceptanceConfig(kind="linear", start=0.9, end=0.1, total_steps=8)
    assert acceptance_prob(0, cfg) == pytest.approx(0.9)
    assert acceptance_prob(1, cfg) == pytest.approx(0.8)
    assert acceptance_prob(4, cfg) == pytest.approx(0.5)
    assert acceptance_prob(8, cfg) == pytest.approx(0.1)
    assert acceptance_prob(100, cfg) == pytest.approx(0.1)


def test_cosine_boundaries():
    cfg = AcceptanceConfig(kind="cosine", start=1.0, end=0.2, total_steps=10)
    assert acceptance_prob(0, cfg) == pytest.approx(1.0)
    assert acceptance_prob(1, cfg) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 10)))
    assert acceptance_prob(5, cfg) == pytest.approx(0.6)
    assert acceptance_prob(10, cfg) == pytest.approx(0.2)
    assert acceptance_prob(50, cfg) == pytest.approx(0.2)


def test_exponential_constant_step():
    cfg = AcceptanceConfig(kind="exponential", start=1.0, end=0.3, decay=0.5)
    assert [acceptance_prob(s, cfg) for s in (0, 1, 2)] == pytest.approx([1.0, 0.5, 0.3])
    assert acceptance_prob(7, AcceptanceConfig(kind="constant", start=0.4)) == 0.4
    st = AcceptanceConfig(kind="step", start=1.0, end=0.0, total_steps=5)
    assert acceptance_prob(4, st) == 1.0 and acceptance_prob(5, st) == 0.0


def test_invalid_configs_name_the_field():
    with pytest.raises(ValueError, match="kind"):
        AcceptanceConfig(kind="sigmoid")
    with pytest.raises(ValueError, match="start"):
        AcceptanceConfig(start=1.5)
    with pytest.raises(ValueError):
        acceptance_prob(-1, AcceptanceConfig())


def test_turn_budget_shrinks_to_eval_budget():
    assert turn_budget(0, 10, 2, 100) == 10
    assert turn_budget(50, 10, 2, 100) == 6
    assert turn_budget(51, 10, 2, 100) == 5  # 10 - 8 * 0.51 = 5.92, floored
    assert turn_budget(100, 10, 2, 100) == 2
    assert turn_budget(1000, 10, 2, 100) == 2
    assert all(turn_budget(s, 4, 1, 30) >= 1 for s in range(60))


def test_training_turns_has_its_own_horizon_and_one_floor_for_every_row():
    from eapo_ray.algo.schedules import training_turns

    # its own horizon: shrinking over 100 steps, whatever the acceptance schedule's length
    assert [training_turns(s, 4, 1, 100, 1) for s in (0, 50, 100, 500)] == [4, 2, 1, 1]
    assert training_turns(50, 4, 1, 100, 1) == turn_budget(50, 4, 1, 100)
    # horizon <= 0: no shrinking
    assert all(training_turns(s, 4, 1, 0) == 4 for s in range(0, 1000, 37))
    # the default floor (2): a consult can be answered and then answered upon ...
    assert [training_turns(s, 4, 1, 100) for s in (0, 50, 100, 500)] == [4, 2, 2, 2]
    # ... never more than train_turns allows, and the floor does not lift a larger budget
    assert training_turns(500, 1, 1, 100) == 1
    assert training_turns(0, 4, 1, 100, 3) == 4
    assert training_turns(500, 4, 1, 100, 3) == 3


def test_turn_budget_steps_config():
    from eapo_ray.config import ConfigError, load_config

    assert load_config(None, []).rollout.turn_budget_steps == -1  # default: acceptance.total_steps, as before
    assert load_config(None, ["rollout.turn_budget_steps=120"]).rollout.turn_budget_steps == 120
    with pytest.raises(ConfigError, match="turn_budget_steps"):
        load_config(None, ["rollout.turn_budget_steps=-2"])
    assert load_config(None, []).rollout.min_train_turns == 2
    with pytest.raises(ConfigError, match="min_train_turns"):
        load_config(None, ["rollout.min_train_turns=0"])


def test_rl_and_eapo_rows_get_the_same_turn_budget_at_every_step():
    """The turn floor is one for every row: it used to apply only while rho > 0, so on
    configs/mul EAPO had 2 turns and RL 1 at steps 27-29 (and the default run's EAPO rows 2
    where RL had 1 at steps 21-29)."""
    from pathlib import Path

    from eapo_ray.config import load_config
    from eapo_ray.rollout.episode import EpisodeSettings

    root = Path(__file__).resolve().parents[2]
    for eapo_path, rl_path in ((root / "configs/mul/eapo.yaml", root / "configs/mul/rl.yaml"), (None, None)):
        eapo = load_config(eapo_path and str(eapo_path))
        rl = load_config(rl_path and str(rl_path), [] if rl_path else ["acceptance.kind=constant", "acceptance.start=0"])
        turns = [(EpisodeSettings.for_training(eapo, s).max_turns,
                  EpisodeSettings.for_training(rl, s, with_expert=False).max_turns) for s in range(eapo.steps + 5)]
        assert all(e == r for e, r in turns), turns
        assert min(e for e, _ in turns) == 2


def test_expert_sft_weight_anneals_with_the_samples_behaviour_rho():
    """The SFT coefficient is annealed with the rho each sample was generated under (recorded
    per sample), not the learner's step: the old signature took the learner's step."""
    import torch

    from eapo_ray.algo.schedules import expert_sft_weight
    from eapo_ray.config import AlgoConfig

    fixed = AlgoConfig(expert_sft_coef=0.5)
    annealed = AlgoConfig(expert_sft_coef=0.5, expert_sft_anneal=True)
    assert [expert_sft_weight(fixed, r) for r in (1.0, 0.5, 0.0)] == [0.5, 0.5, 0.5]
    assert [expert_sft_weight(annealed, r) for r in (1.0, 0.5, 0.0)] == pytest.approx([0.5, 0.25, 0.0])
    assert expert_sft_weight(AlgoConfig(), 1.0) == 0.0
    rho = torch.tensor([1.0, 0.25, 0.0])  # a batch mixing samples from three policy versions
    assert expert_sft_weight(annealed, rho).tolist() == pytest.approx([0.5, 0.125, 0.0])
