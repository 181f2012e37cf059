"""Paired comparison of two rows evaluated on the same held-out problems (pure; no Ray).

`a[seed]` / `b[seed]` are lists of correct-sample counts per problem (the same problems, in the
same order, for both rows of a seed: paper_table's eval.json "correct_per_problem"), out of
`ka` / `kb` samples per problem (each row's own k: an int, or one per seed).

The difference of mean accuracies per seed is exact. The 95% interval is a percentile
*hierarchical* bootstrap: each replicate draws the seeds with replacement, then, within every
drawn seed, the problems with replacement (the same indices for both rows: paired), and
averages the per-seed differences; so it covers seed-to-seed variation (training noise) as
well as problem sampling. With one seed it is the problem bootstrap; with few seeds it is
wide, as it should be (3 seeds give at most 10 distinct seed draws). `ci95_problems` is the
old within-seed interval (seeds fixed), kept for comparison: it ignores seed variation."""
from __future__ import annotations

import random
import statistics


def _per_seed_k(k, seeds, name: str) -> dict[int, int]:
    ks = {s: (k[s] if isinstance(k, dict) else k) for s in seeds}
    for s, v in ks.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"row {name}, seed {s}: samples per problem must be an int >= 1, got {v!r}")
    return ks


def paired_difference(a: dict[int, list[int]], b: dict[int, list[int]], ka=1, kb=None, n_boot: int = 2000,
                      seed: int = 0, allow_unequal_k: bool = False) -> dict:
    """Mean accuracy of a minus b per seed (shared seeds only) and over seeds, with a
    hierarchical (seeds, then problems) bootstrap 95% CI. `ka`, `kb`: samples per problem of
    each row (kb None: ka). Rows with different k on a seed are refused unless
    `allow_unequal_k` (their per-problem accuracies are then compared at different k)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed evaluated for both rows")
    ka = _per_seed_k(ka, seeds, "a")
    kb = _per_seed_k(ka if kb is None else kb, seeds, "b")
    for s in seeds:
        if len(a[s]) != len(b[s]) or not a[s]:
            raise ValueError(f"seed {s}: the rows were evaluated on different problem sets ({len(a[s])} vs {len(b[s])})")
        if ka[s] != kb[s] and not allow_unequal_k:
            raise ValueError(f"seed {s}: the rows drew different samples per problem ({ka[s]} vs {kb[s]}); "
                             "pass allow_unequal_k to compare their accuracies anyway")
        for row, counts, k in (("a", a[s], ka[s]), ("b", b[s], kb[s])):
            if any(not 0 <= c <= k for c in counts):
                raise ValueError(f"row {row}, seed {s}: a correct count outside 0..{k} (wrong samples per problem?)")
    diffs = {s: [x / ka[s] - y / kb[s] for x, y in zip(a[s], b[s])] for s in seeds}
    per_seed = {s: statistics.fmean(d) for s, d in diffs.items()}
    rng = random.Random(seed)

    def boot_seed(s):
        d = diffs[s]
        return sum(rng.choices(d, k=len(d))) / len(d)

    hier, within = [], []
    for _ in range(n_boot):
        hier.append(statistics.fmean(boot_seed(s) for s in rng.choices(seeds, k=len(seeds))))
        within.append(statistics.fmean(boot_seed(s) for s in seeds))
    hier.sort()
    within.sort()
    lo, hi = int(0.025 * n_boot), int(0.975 * n_boot) - 1
    return {"seeds": seeds, "per_seed": per_seed, "mean": statistics.fmean(per_seed.values()),
            "ci95": (hier[lo], hier[hi]), "ci95_problems": (within[lo], within[hi]),
            "samples_per_problem": {"a": ka, "b": kb},
            "wins": sum(v > 0 for v in per_seed.values()), "losses": sum(v < 0 for v in per_seed.values())}
