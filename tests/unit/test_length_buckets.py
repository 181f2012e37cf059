"""algo.batching.split_by_length: a permutation of the rows into micro-batches of similar lengths."""
from eapo_ray.algo.batching import padded_tokens, split_by_length


def test_split_by_length_is_a_permutation_with_less_padding():
    lens = [3, 40, 5, 7, 38, 12, 9, 4, 30, 6, 8, 11, 35, 5, 10, 13, 33, 4, 7, 36]
    batch = {"input_ids": [list(range(n)) for n in lens], "advantage": [float(i) for i in range(len(lens))]}
    parts = split_by_length(batch, spread=1.25, min_rows=4)
    assert len(parts) > 1
    rows = sorted((tuple(x), a) for p in parts for x, a in zip(p["input_ids"], p["advantage"]))
    assert rows == sorted((tuple(x), a) for x, a in zip(batch["input_ids"], batch["advantage"]))
    assert all(len(p["input_ids"]) >= 4 for p in parts[:-1])
    assert sum(map(padded_tokens, parts)) < 0.7 * padded_tokens(batch)
    assert split_by_length({"input_ids": []}) == []
    assert len(split_by_length(batch, min_rows=100)) == 1


def test_split_shared_computes_each_prompt_once_and_aligns_every_column_with_collate():
    """learner.share_prompts: distinct prompts once, rows a permutation, and every per-token column
    of a row at response position k equal to `collate`'s at position prompt_len - 1 + k."""
    import torch

    from eapo_ray.algo.batching import collate, collate_prompts, collate_responses, split_shared

    prompts = [[5, 6, 7], [8, 9], [5, 6, 7, 1]]  # the third starts like the first: a different prompt
    rows = [(0, 4), (1, 2), (0, 6), (2, 1), (1, 5), (0, 3), (2, 7), (1, 0)]  # (prompt, response length)
    batch = {"input_ids": [prompts[p] + [10 + i + k for k in range(n)] for i, (p, n) in enumerate(rows)],
             "prompt_len": [len(prompts[p]) for p, _ in rows], "advantage": [float(i) for i in range(len(rows))],
             "version": [i % 2 for i in range(len(rows))], "accept_prob": [0.1 * i for i in range(len(rows))]}
    for key, base in (("policy_mask", 1), ("expert_mask", 0)):
        batch[key] = [[(base + k) % 2 for k in range(n)] for _, n in rows]
    batch["behav_logp"] = [[-(i + k / 10) for k in range(n)] for i, (_, n) in enumerate(rows)]
    batch["expert_logp"] = [[-(i + k / 7) for k in range(n)] for i, (_, n) in enumerate(rows)]
    uniq, parts = split_shared(batch, min_rows=2)
    assert uniq == prompts
    assert len(parts) > 1
    assert sorted(a for b in parts for a in b["advantage"]) == batch["advantage"]
    full = collate(batch)
    cp = collate_prompts(uniq)
    assert cp["prompt_len"].tolist() == [3, 2, 4] and cp["prompt_mask"].sum().item() == 9
    for b in parts:
        c = collate_responses(b)
        for j, adv in enumerate(b["advantage"]):
            i = int(adv)  # the row's index in `batch`
            p, n = batch["prompt_len"][i], rows[i][1]
            assert uniq[int(c["prompt_index"][j])] == batch["input_ids"][i][:p]
            assert c["response_ids"][j, :n].tolist() == batch["input_ids"][i][p:]
            assert c["response_mask"][j].sum().item() == n
            for key in ("policy_mask", "expert_mask", "behav_logp", "expert_logp"):
                assert torch.equal(c[key][j, :n], full[key][i, p - 1: p - 1 + n]), key
                assert not c[key][j, n:].any(), key  # padding is masked out
            for key in ("advantage", "version", "accept_prob"):
                assert c[key][j] == full[key][i], key
    assert split_shared({"input_ids": [], "prompt_len": []}) == ([], [])
