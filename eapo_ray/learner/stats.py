"""A train step's pieces outside the actor: the DeepSpeed config, fetching the batches from the
object store, and the loss statistics summed over micro-batches and ranks."""
from __future__ import annotations

import ray
import torch
from torch.distributed import ReduceOp

from eapo_ray.config import RunConfig


def fetch_batches(boxes: list) -> list:
    """ray.get each boxed batch ref; None for a batch whose producer died before the learner
    read it (its owner is gone): skipped and counted, not fatal."""
    batches = []
    for box in boxes:
        try:
            batches.append(ray.get(box[0]))
        except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError):
            batches.append(None)
    return batches


def ds_config(cfg: RunConfig) -> dict:
    lc = cfg.learner
    return {
        "train_micro_batch_size_per_gpu": 1,  # we call backward/step ourselves, one minibatch at a time
        "gradient_accumulation_steps": 1,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": {"stage": lc.zero_stage},
        "bf16": {"enabled": lc.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def luffy_mask(b: dict) -> torch.Tensor:
    """The LUFFY channel's tokens: the expert-answer tokens of samples the overlong filter kept
    (it zeroes a filtered sample's policy mask); its normaliser counts exactly these."""
    return b["expert_mask"] * (b["policy_mask"].sum(dim=1, keepdim=True) > 0).to(b["expert_mask"].dtype)


class StepStats:
    """Loss statistics of one train step, summed over micro-batches (weighted by their token
    counts), then over ranks: the same numbers on every rank."""
    SUMS = ("loss", "expert_sft_loss", "clip_frac", "kl_behav", "kept_tokens", "is_weight_mean", "dropped_frac",
            "policy_tokens", "luffy_loss", "luffy_shaped", "luffy_tokens", "replay_loss", "replay_tokens")

    def __init__(self, sft: bool, luffy: bool = False, replay: bool = False):
        self.sums, self.weight_max, self.sft, self.luffy = dict.fromkeys(self.SUMS, 0.0), float("-inf"), sft, luffy
        self.replay = replay

    @classmethod
    def of(cls, algo) -> "StepStats":
        """The statistics a run's channels (config.AlgoConfig) report."""
        return cls(sft=algo.expert_sft_coef > 0, luffy=algo.expert_token_channel == "luffy",
                   replay=algo.expert_token_channel in ("replay", "own_steps"))

    def add(self, st: dict, loss: float, sft: float | None):
        kept, policy = st["kept_tokens"], st["policy_tokens"]
        for k, v in {"loss": loss, "expert_sft_loss": sft or 0.0, "clip_frac": st["clip_frac"] * kept,
                     "kl_behav": st["kl_behav"] * kept, "kept_tokens": kept,
                     "is_weight_mean": st["is_weight_mean"] * policy, "dropped_frac": st["dropped_frac"] * policy,
                     "policy_tokens": policy, "luffy_loss": st.get("luffy_loss", 0.0),
                     "luffy_shaped": st.get("luffy_shaped_mean", 0.0) * st.get("luffy_tokens", 0.0),
                     "luffy_tokens": st.get("luffy_tokens", 0.0), "replay_loss": st.get("replay_loss", 0.0),
                     "replay_tokens": st.get("replay_tokens", 0.0)}.items():
            self.sums[k] += v
        if policy:
            self.weight_max = max(self.weight_max, st["is_weight_max"])

    def reduce(self, all_reduce, world_size: int, n_updates: int) -> dict:
        """Collective (all_reduce as Learner._all_reduce). Losses: per update (each rank's loss is
        world_size x its share); fractions: per token; kept_tokens: per update, all ranks."""
        t = dict(zip(self.SUMS, all_reduce(list(self.sums.values()))))
        (weight_max,) = all_reduce([self.weight_max], ReduceOp.MAX)
        kept, policy = max(t["kept_tokens"], 1.0), t["policy_tokens"]
        out = {"loss": t["loss"] / world_size / n_updates, "clip_frac": t["clip_frac"] / kept,
               "is_weight_mean": t["is_weight_mean"] / policy if policy else 1.0,
               "is_weight_max": weight_max if policy else 1.0, "dropped_frac": t["dropped_frac"] / max(policy, 1.0),
               "kl_behav": t["kl_behav"] / kept, "kept_tokens": t["kept_tokens"] / n_updates}
        if self.sft:
            out["expert_sft_loss"] = t["expert_sft_loss"] / world_size / n_updates
        if self.luffy:  # the off-policy expert-token term: its loss, mean f(r), expert tokens per update
            out["luffy_loss"] = t["luffy_loss"] / world_size / n_updates
            out["luffy_shaped_mean"] = t["luffy_shaped"] / max(t["luffy_tokens"], 1.0)
            out["luffy_tokens"] = t["luffy_tokens"] / n_updates
        if self.replay:  # the replay channel: its unweighted NLL per update, view answer tokens per update
            out["replay_loss"] = t["replay_loss"] / world_size / n_updates
            out["replay_tokens"] = t["replay_tokens"] / n_updates
        return out


def add_gap(acc: list, log_w: torch.Tensor, where: torch.Tensor) -> list:
    """acc = [sum, count, max] of |log_w| over the positions in `where`."""
    if not where.any():
        return acc
    g = log_w[where].abs()
    return [acc[0] + float(g.sum()), acc[1] + float(where.sum()), max(acc[2], float(g.max()))]
