"""Paired quality comparisons: a case against the baseline on the same images.

Every case of a task generates (or classifies) the same images from the same seeds as the baseline, so the
quality difference is judged image by image: the difference of each image's score from the baseline's score on
the same image, averaged. Pairing removes the spread between images (easy and hard prompts, seeds) that a
comparison of two marginal intervals carries twice, which is what gives a few dozen images the power to
separate a method from the baseline.

* A per-image score (class probability, CLIP score, SSIM, feature distance): the mean difference with a 95%
  percentile bootstrap over images, one resample drawing the same images for both (:func:`paired_bootstrap`).
* A per-image hit (class correctness, top-1, agreement): the difference of the two proportions with McNemar's
  exact test (:func:`mcnemar_exact`, two-sided, on the discordant pairs) and Bonett and Price's adjusted Wald
  interval for a difference of paired proportions (:func:`paired_proportion`; Bonett & Price 2012, "Adjusted
  Wald confidence interval for a difference of binomial proportions based on paired data", J. Educ. Behav.
  Stat. 37(4)). The interval is unconditional (a new sample of images could have more or fewer discordant
  pairs), so it does not stop at the observed difference when every discordant pair goes one way, as the exact
  interval conditional on the discordant count does. Where McNemar's test does not reject at the interval's
  level, the interval is widened to hold 0 (the adjusted Wald interval is slightly liberal at the margin, e.g.
  2 against 9 discordant pairs, p = 0.065): a difference is called separated only when the exact test agrees.

:func:`quality_deltas` applies the right one to each metric: what the harness records as ``quality_delta``
(``{metric: [delta, low, high]}``) and ``quality_delta_p`` (McNemar's p-value of each hit metric).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

import numpy as np

from .stats import CONFIDENCE, RESAMPLES, SEED, bootstrap_indices, percentile_interval

__all__ = [
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


def paired_proportion(case: Sequence[bool], base: Sequence[bool], confidence: float = CONFIDENCE,
                      scale: float = 100.0) -> tuple[float, tuple[float, float], float]:
    """The difference of two paired proportions (``case`` minus ``base``, times ``scale``: percentage points by
    default), its adjusted Wald interval and McNemar's exact p-value.

    With ``b`` pairs where only the case is right, ``c`` where only the baseline is, and ``n`` pairs, the
    difference is ``(b - c) / n``. The interval (Bonett and Price) adds one pair to each discordant cell:
    ``p_b = (b + 1) / (n + 2)``, ``p_c = (c + 1) / (n + 2)``, ``d = p_b - p_c``, ``d +- z sqrt((p_b + p_c -
    d^2) / (n + 2))``, clipped to ``[-1, 1]`` and widened to hold the observed difference, and 0 where McNemar's
    exact p-value is at least ``1 - confidence``."""
    x, y = _pair([bool(v) for v in case], [bool(v) for v in base])
    b = int(np.sum((x == 1) & (y == 0)))
    c = int(np.sum((x == 0) & (y == 1)))
    n = x.size
    delta = (b - c) / n
    p_b, p_c = (b + 1) / (n + 2), (c + 1) / (n + 2)
    adjusted = p_b - p_c
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    half = z * math.sqrt(max(p_b + p_c - adjusted**2, 0.0) / (n + 2))
    low, high = max(-1.0, min(adjusted - half, delta)), min(1.0, max(adjusted + half, delta))
    p = mcnemar_exact(b, c)
    if p >= 1.0 - confidence:
        low, high = min(low, 0.0), max(high, 0.0)
    return scale * delta, (scale * low, scale * high), p


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
