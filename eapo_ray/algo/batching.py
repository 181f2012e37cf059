"""Turning scored episodes into training batches: reward shaping (per-consult cost), group
advantages, dynamic sampling (drop all-equal groups), overlong filtering, the columnar batch
the object store carries, collation to padded tensors, and splits into minibatches.
Trajectories are any objects with the attributes used below (see rollout.episode)."""
from __future__ import annotations

from collections import defaultdict

import torch

from eapo_ray.algo.advantages import group_advantages


def shaped_reward(reward: float, consults: int, consult_cost: float) -> float:
    """The optional per-consult cost (lambda * number of queries); 0 by default."""
    return reward - consult_cost * consults


def groups_of(trajs) -> list[list]:
    by_group = defaultdict(list)
    for t in trajs:
        by_group[t.group].append(t)
    return list(by_group.values())


def assign_advantages(trajs, *, adv_scale: str = "std", consult_cost: float = 0.0,
                      dynamic_sampling: bool = True) -> tuple[list, int]:
    """Set `t.advantage` on every trajectory of every complete group. Returns the kept
    trajectories and the number of groups dropped by dynamic sampling."""
    groups = groups_of(trajs)
    sizes = {len(g) for g in groups}
    if len(sizes) > 1:
        raise ValueError(f"groups must all have the same size, got sizes {sorted(sizes)}")
    rewards = torch.tensor([[shaped_reward(t.reward, t.consults, consult_cost) for t in g] for g in groups])
    adv = group_advantages(rewards, scale=adv_scale)
    kept, dropped = [], 0
    for g, r, a in zip(groups, rewards, adv):
        if dynamic_sampling and bool((r == r[0]).all()):
            dropped += 1
            continue
        for t, v in zip(g, a.tolist()):
            t.advantage = v
            kept.append(t)
    return kept, dropped


def loss_mask(t, overlong_filter: bool) -> list[int]:
    """Policy-token mask; all zeros for a sample cut off by the length budget when
    overlong filtering is on (it still counted in its group's statistics)."""
    return [0] * len(t.policy_mask) if overlong_filter and t.overlong else list(t.policy_mask)


def to_batch(trajs, overlong_filter: bool = True, views=()) -> dict:
    """A columnar, picklable batch (lists of per-sample lists) for the object store. `views`:
    trajectories whose replay view (algo.replay: `replay_ids` / `replay_mask`, None for none)
    becomes an extra row after the samples: the same prompt, the view as its response, no policy
    or expert tokens, `replay_mask` on its expert-answer tokens, the sample's rho, advantage and
    version, and `view` = 1 (a sample row has 0 and an all-zero replay_mask)."""
    rows = [t for t in views if getattr(t, "replay_ids", None) and not (overlong_filter and t.overlong)]
    zeros = [[0] * len(t.replay_ids) for t in rows]
    return {
        "input_ids": [t.prompt_ids + t.response_ids for t in trajs] + [t.prompt_ids + t.replay_ids for t in rows],
        "prompt_len": [len(t.prompt_ids) for t in trajs + rows],
        "policy_mask": [loss_mask(t, overlong_filter) for t in trajs] + zeros,
        "expert_mask": [t.expert_mask for t in trajs] + zeros,
        "behav_logp": [t.behav_logp for t in trajs] + [[0.0] * len(z) for z in zeros],
        "expert_logp": [getattr(t, "expert_logp", None) or [0.0] * len(t.expert_mask) for t in trajs]
                       + [[0.0] * len(z) for z in zeros],
        "replay_mask": [[0] * len(t.response_ids) for t in trajs] + [list(t.replay_mask) for t in rows],
        # the rho each sample was generated under
        "accept_prob": [getattr(t, "accept_prob", 0.0) for t in trajs + rows],
        "advantage": [t.advantage for t in trajs + rows],
        "version": [t.version for t in trajs + rows],
        "view": [0] * len(trajs) + [1] * len(rows),
    }


def sample_rows(batch: dict) -> int:
    """The batch's samples (rows that are not replay views)."""
    return len(batch["input_ids"]) - sum(batch.get("view", ()))


def _loss_columns(batch: dict, starts: list[int], lengths: list[int], width: int) -> dict[str, torch.Tensor]:
    """The columns the loss reads, as tensors: the per-token ones ([B, width]; row i's lengths[i]
    response tokens at columns starts[i]..., zeros elsewhere) and the per-sample ones ([B])."""
    B = len(starts)
    pmask, emask, blogp, elogp, rmask = (torch.zeros((B, width)) for _ in range(5))
    for i, (a, r) in enumerate(zip(starts, lengths)):
        if r:
            pmask[i, a: a + r] = torch.tensor(batch["policy_mask"][i], dtype=torch.float)
            emask[i, a: a + r] = torch.tensor(batch["expert_mask"][i], dtype=torch.float)
            blogp[i, a: a + r] = torch.tensor(batch["behav_logp"][i], dtype=torch.float)
            if "expert_logp" in batch:
                elogp[i, a: a + r] = torch.tensor(batch["expert_logp"][i], dtype=torch.float)
            if "replay_mask" in batch:
                rmask[i, a: a + r] = torch.tensor(batch["replay_mask"][i], dtype=torch.float)
    return {"policy_mask": pmask, "expert_mask": emask, "behav_logp": blogp, "expert_logp": elogp,
            "replay_mask": rmask, "view": torch.tensor(batch.get("view", [0] * B), dtype=torch.long),
            "accept_prob": torch.tensor(batch.get("accept_prob", [0.0] * B), dtype=torch.float),
            "advantage": torch.tensor(batch["advantage"], dtype=torch.float),
            "version": torch.tensor(batch.get("version", [0] * B), dtype=torch.long)}


def collate(batch: dict, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a columnar batch into tensors aligned for next-token log-probs:
    position j of the [B, L-1] per-token tensors scores token j+1 of input_ids."""
    B, L = len(batch["input_ids"]), max(len(x) for x in batch["input_ids"])
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    for i, seq in enumerate(batch["input_ids"]):
        ids[i, :len(seq)], attn[i, :len(seq)] = torch.tensor(seq), 1
    # response tokens occupy positions p..n-1 -> per-token index p-1..n-2
    prompt_len = batch["prompt_len"]
    return {"input_ids": ids, "attention_mask": attn,
            **_loss_columns(batch, [p - 1 for p in prompt_len],
                            [len(x) - p for x, p in zip(batch["input_ids"], prompt_len)], L - 1)}


def merge_batches(batches: list[dict]) -> dict:
    return {k: [v for b in batches for v in b[k]] for k in batches[0]}


def split_batch(batch: dict, n: int) -> list[dict]:
    """Split into n near-equal contiguous shards (for data-parallel learners / minibatches)."""
    size = len(batch["input_ids"])
    bounds = [round(i * size / n) for i in range(n + 1)]
    return [{k: v[bounds[i]: bounds[i + 1]] for k, v in batch.items()} for i in range(n)]


def padded_tokens(batch: dict) -> int:
    """Tokens of a columnar batch once collated: rows x the longest row."""
    return len(batch["input_ids"]) * max((len(x) for x in batch["input_ids"]), default=0)


def split_by_tokens(batch: dict, max_tokens: int) -> list[dict]:
    """Contiguous micro-batches whose padded size (`padded_tokens`) is at most `max_tokens`; a
    sequence longer than that goes alone. [batch] when max_tokens <= 0; [] for an empty batch."""
    n = len(batch["input_ids"])
    if n == 0:
        return []
    if max_tokens <= 0:
        return [batch]
    bounds, start, longest = [0], 0, 0
    for i, seq in enumerate(batch["input_ids"]):
        longest = max(longest, len(seq))
        if i > start and longest * (i + 1 - start) > max_tokens:
            bounds.append(i)
            start, longest = i, len(seq)
    bounds.append(n)
    return [{k: v[a:b] for k, v in batch.items()} for a, b in zip(bounds, bounds[1:])]


def split_by_length(batch: dict, spread: float = 1.25, min_rows: int = 8) -> list[dict]:
    """Micro-batches of similar lengths, to cut padding: the rows sorted by length (stable),
    cut where a row is more than `spread` x as long as the shortest row of the current
    micro-batch (once it holds at least `min_rows` rows). Together they hold exactly the rows of
    `batch` (a permutation), so a loss summed over them with global denominators is the same
    loss as over `batch`. [] for an empty batch."""
    n = len(batch["input_ids"])
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: len(batch["input_ids"][i]))
    groups, cur = [], [order[0]]
    for i in order[1:]:
        if len(cur) >= min_rows and len(batch["input_ids"][i]) > spread * len(batch["input_ids"][cur[0]]):
            groups.append(cur)
            cur = []
        cur.append(i)
    groups.append(cur)
    return [{k: [v[i] for i in g] for k, v in batch.items()} for g in groups]


def split_shared(batch: dict, spread: float = 1.25, min_rows: int = 8) -> tuple[list[list[int]], list[dict]]:
    """learner.share_prompts: the batch's distinct prompts (a GRPO group's samples share one, so
    the learner computes it once instead of group_size times) and micro-batches of its rows by
    similar response length (`split_by_length`'s rule, on the responses). Each micro-batch has the
    batch's per-sample columns for its rows, with "response_ids" (the tokens after the prompt) and
    "prompt_index" (into the returned prompts) in place of "input_ids". Together they hold exactly
    the rows of `batch` (a permutation). ([], []) for an empty batch."""
    prompts, index, where = [], [], {}
    for seq, p in zip(batch["input_ids"], batch["prompt_len"]):
        key = tuple(seq[:p])
        if key not in where:
            where[key] = len(prompts)
            prompts.append(list(key))
        index.append(where[key])
    rows = {**batch, "input_ids": [seq[p:] for seq, p in zip(batch["input_ids"], batch["prompt_len"])],
            "prompt_index": index}
    buckets = split_by_length(rows, spread, min_rows)
    for b in buckets:
        b["response_ids"] = b.pop("input_ids")
    return prompts, buckets


def collate_prompts(prompts: list[list[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded [U, P] prompt ids and attention mask, and each prompt's length [U]."""
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], attn[i, :len(p)] = torch.tensor(p), 1
    return {"prompt_ids": ids, "prompt_mask": attn, "prompt_len": torch.tensor([len(p) for p in prompts])}


def collate_responses(bucket: dict, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A `split_shared` micro-batch as tensors: [B, R] right-padded response ids and mask, and the
    per-token columns aligned with them (position k is response token k, whose log-prob comes
    from the position before it: the prompt's last token for k = 0); [B] prompt_index and the
    per-sample columns. The same keys as `collate` for everything the loss reads."""
    resp = bucket["response_ids"]
    B, R = len(resp), max(1, max(map(len, resp)))
    ids = torch.full((B, R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, R), dtype=torch.long)
    for i, r in enumerate(resp):
        ids[i, :len(r)], attn[i, :len(r)] = torch.tensor(r, dtype=torch.long), 1
    return {"response_ids": ids, "response_mask": attn, "prompt_index": torch.tensor(bucket["prompt_index"]),
            **_loss_columns(bucket, [0] * B, [len(r) for r in resp], R)}
