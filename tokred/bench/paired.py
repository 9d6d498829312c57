"""Paired quality comparisons: a case against the baseline on the same images.

Every case of a task generates (or classifies) the same images from the same seeds as the baseline, so the
quality difference is judged image by image: the difference of each image's score from the baseline's score on
the same image, averaged. Pairing removes the spread between images (easy and hard prompts, seeds) that a
comparison of two marginal intervals carries twice, which is what gives a few dozen images the power to
separate a method from the baseline.

* A per-image score (class probability, CLIP score, SSIM, feature distance): the mean difference with a 95%
  percentile bootstrap over images, one resample drawing the same images for both (:func:`paired_bootstrap`).
* A per-image hit (class correctness, top-1, agreement): the difference of the two proportions with McNemar's
  exact test (:func:`mcnemar_exact`, two-sided, on the discordant pairs) and the interval that inverts it: the
  Clopper-Pearson interval of the share of discordant pairs the case wins, scaled to a difference of proportions
  (:func:`paired_proportion`). The interval excludes 0 exactly when the test rejects at 5%; with no discordant
  pair it is ``[0, 0]``.

:func:`quality_deltas` applies the right one to each metric: what the harness records as ``quality_delta``
(``{metric: [delta, low, high]}``) and ``quality_delta_p`` (McNemar's p-value of each hit metric).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .stats import CONFIDENCE, RESAMPLES, SEED, bootstrap_indices, percentile_interval

__all__ = [
    "clopper_pearson",
    "mcnemar_exact",
    "paired_bootstrap",
    "paired_proportion",
    "quality_deltas",
]


def _pair(case: Sequence[float], base: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(case, dtype=float), np.asarray(base, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"paired values need two 1-d samples of one length, got {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("paired values: no images")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired values must be finite")
    return x, y


def paired_bootstrap(case: Sequence[float], base: Sequence[float], confidence: float = CONFIDENCE,
                     resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, tuple[float, float]]:
    """``mean(case - base)`` over images paired by position, and its percentile bootstrap interval (resampling
    images, each resample keeping an image's two values together)."""
    x, y = _pair(case, base)
    diff = x - y
    delta = float(diff.mean())
    if diff.size == 1 or np.all(diff == diff[0]):
        return delta, (delta, delta)
    replicates = diff[bootstrap_indices(diff.size, resamples, seed)].mean(axis=1)
    low, high = percentile_interval(replicates, confidence)
    return delta, (min(low, delta), max(high, delta))


def _log_binom_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
            + (n - k) * math.log1p(-p))


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, sum(math.exp(_log_binom_pmf(i, n, p)) for i in range(k + 1)))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of ``b`` and ``c`` discordant pairs (``b``: the case right where the
    baseline is wrong; ``c``: the reverse): ``min(1, 2 P(X <= min(b, c)))`` for X ~ Binomial(b + c, 1/2); 1 when
    there is no discordant pair."""
    for name, value in (("b", b), ("c", c)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a count (an int >= 0), got {value!r}")
    m = int(b) + int(c)
    if m == 0:
        return 1.0
    k = min(int(b), int(c))
    return min(1.0, 2.0 * sum(math.comb(m, i) for i in range(k + 1)) / 2.0**m)


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a proportion ``k / n``: the ``p`` not rejected by either one-sided
    binomial test at ``(1 - confidence) / 2`` (found by bisection; no scipy needed)."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    alpha = (1.0 - confidence) / 2.0

    def solve(f, target: float) -> float:  # f increasing in p; the p with f(p) = target
        lo, hi = 0.0, 1.0
        for _ in range(100):
            mid = (lo + hi) / 2.0
            if f(mid) < target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2.0

    # lower: P(X >= k; p) = alpha, i.e. 1 - cdf(k - 1) increasing in p
    low = 0.0 if k == 0 else solve(lambda p: 1.0 - _binom_cdf(k - 1, n, p), alpha)
    # upper: P(X <= k; p) = alpha, cdf(k) decreasing in p
    high = 1.0 if k == n else solve(lambda p: -_binom_cdf(k, n, p), -alpha)
    return low, high


def paired_proportion(case: Sequence[bool], base: Sequence[bool], confidence: float = CONFIDENCE,
                      scale: float = 100.0) -> tuple[float, tuple[float, float], float]:
    """The difference of two paired proportions (``case`` minus ``base``, times ``scale``: percentage points by
    default), its exact interval and McNemar's exact p-value.

    With ``b`` pairs where only the case is right, ``c`` where only the baseline is, ``m = b + c`` and ``n``
    pairs, the difference is ``(b - c) / n``; conditional on ``m``, ``b`` is Binomial(m, pi), and the difference
    is ``m (2 pi - 1) / n``: its interval is the Clopper-Pearson interval of ``pi`` mapped the same way."""
    x, y = _pair([bool(v) for v in case], [bool(v) for v in base])
    b = int(np.sum((x == 1) & (y == 0)))
    c = int(np.sum((x == 0) & (y == 1)))
    n, m = x.size, b + c
    delta = scale * (b - c) / n
    if m == 0:
        return delta, (delta, delta), 1.0
    lo, hi = clopper_pearson(b, m, confidence)
    return delta, (scale * m * (2 * lo - 1) / n, scale * m * (2 * hi - 1) / n), mcnemar_exact(b, c)


def quality_deltas(case: Mapping[str, Sequence[float]], base: Mapping[str, Sequence[float]],
                   binary: set[str] | frozenset[str] = frozenset(), hit_scale: float = 100.0,
                   ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per metric that both ``case`` and ``base`` give per image (equally many images):
    ``{metric: [delta, low, high]}`` and, for the metrics in ``binary`` (hits, compared with
    :func:`paired_proportion`, in percentage points with ``hit_scale`` 100), ``{metric: McNemar p}``; the others
    with :func:`paired_bootstrap`. A metric whose image counts differ is left out (not paired)."""
    deltas: dict[str, list[float]] = {}
    pvalues: dict[str, float] = {}
    for name, values in case.items():
        reference = base.get(name)
        if reference is None or len(reference) != len(values) or not len(values):
            continue
        if name in binary:
            delta, (low, high), p = paired_proportion(values, reference, scale=hit_scale)
            pvalues[name] = p
        else:
            delta, (low, high) = paired_bootstrap(values, reference)
        deltas[name] = [float(delta), float(low), float(high)]
    return deltas, pvalues
