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
