"""Statistics of the results table: mean and spread over seeds, and paired differences with a
bootstrap confidence interval over examples and seeds.

The paired difference of a defense against its baseline uses, for every seed both rows have, the
per-example correctness of both on the same test examples: D[s, i] = correct_def[s, i] -
correct_base[s, i]. Its estimate is the mean of D. The 95 % interval resamples seeds (with replacement)
and examples (with replacement, the same examples for every seed: they are the same test images),
and takes the 2.5th and 97.5th percentiles of the resampled means. With one seed it is an interval over
examples only; seed-to-seed variation is then unknown, and the table says how many seeds it rests on.
The generator is seeded, so the rendered table is reproducible byte for byte.
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP = 2000
CHUNK = 250  # replicates per matrix product (memory: CHUNK x examples)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def paired_bootstrap(diff: np.ndarray, *, n_boot: int = BOOTSTRAP, seed: int = 0, level: float = 0.95
                     ) -> tuple[float, float, float]:  # fmt: skip
    """(mean, low, high) of a paired difference in percentage points.

    Args:
        diff: (seeds, examples) array of per-example differences (each -1, 0 or 1).
    """
    diff = np.asarray(diff, dtype=np.float64)
    if diff.ndim != 2 or diff.size == 0:
        raise ValueError(f"diff must be a non-empty (seeds, examples) array, got shape {diff.shape}")
    s, n = diff.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, CHUNK):
        b = min(CHUNK, n_boot - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=b) / n  # (b, n): example resampling
        per_seed = weights @ diff.T  # (b, s): each resampled example mean, per seed
        pick = rng.integers(0, s, size=(b, s))  # seed resampling
        means[start : start + b] = np.take_along_axis(per_seed, pick, axis=1).mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return 100 * float(diff.mean()), 100 * float(low), 100 * float(high)


def missed_by_first(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per example, 1 where the model survives the `first` attack but not the `second` (else 0).

    With first = PGD-20 and second = AutoAttack on the same examples this is the gradient-masking
    indicator of the results page: the share of examples that a plain gradient attack misses and a
    stronger, partly gradient-free one finds. A defense that hides its gradient (rather than being
    robust) raises it against its baseline. Both arrays hold per-example correctness (0/1) under attack.
    """
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"need two equal 1-D correctness arrays, got {first.shape} and {second.shape}")
    return ((first == 1) & (second == 0)).astype(np.int64)
