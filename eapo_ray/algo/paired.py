"""Paired comparison of two rows evaluated on the same held-out problems (pure; no Ray).

`per_problem[seed]` is a list of correct-sample counts per problem (the same problems, in
the same order, for both rows of a seed: paper_table's eval.json "correct_per_problem").
The difference of means per seed is exact; the 95% interval is a percentile bootstrap that
resamples problems within every seed (the same indices for both rows: paired) and averages
the per-seed differences, i.e. it covers problem sampling, not seed-to-seed variation beyond
the seeds run."""
from __future__ import annotations

import random
import statistics


def paired_difference(a: dict[int, list[int]], b: dict[int, list[int]], samples: int = 1, n_boot: int = 2000,
                      seed: int = 0) -> dict:
    """Mean accuracy of a minus b per seed (shared seeds only) and over seeds, with a bootstrap 95% CI."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed evaluated for both rows")
    for s in seeds:
        if len(a[s]) != len(b[s]) or not a[s]:
            raise ValueError(f"seed {s}: the rows were evaluated on different problem sets ({len(a[s])} vs {len(b[s])})")
    diffs = {s: [(x - y) / samples for x, y in zip(a[s], b[s])] for s in seeds}
    per_seed = {s: statistics.fmean(d) for s, d in diffs.items()}
    rng = random.Random(seed)
    boots = []
    for _ in range(n_boot):
        tot = 0.0
        for s in seeds:
            d = diffs[s]
            tot += sum(d[rng.randrange(len(d))] for _ in range(len(d))) / len(d)
        boots.append(tot / len(seeds))
    boots.sort()
    return {"seeds": seeds, "per_seed": per_seed, "mean": statistics.fmean(per_seed.values()),
            "ci95": (boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]),
            "wins": sum(v > 0 for v in per_seed.values()), "losses": sum(v < 0 for v in per_seed.values())}
