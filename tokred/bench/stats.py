"""The benchmark's statistics: paired speedups with bootstrap intervals, the adaptive stopping rule, and the
intervals of quality metrics (bootstrap over images, Wilson score intervals for proportions).

Speedup. Each timed round runs the baseline and the method once, back to back; the round's ratio is
``baseline time / method time``. Machine drift (clock boost, other processes, thermal state) moves both calls of a
round together, so it cancels in the ratio and not in a ratio of two medians taken at different times. The
speedup is the **median of the per-round ratios**; its 95% interval is a percentile bootstrap of that median over
rounds (:data:`RESAMPLES` resamples, fixed seed, so the same timings always give the same interval).

Processes. A process's memory layout, allocator state and thread placement shift all its timings together: the
rounds of one process agree to within a few percent while fresh processes disagree by up to 15%. So a case's
rounds may be spread over several worker processes (:mod:`tokred.bench.workers`) and its interval computed from
per-process results (:func:`process_speedup`): the speedup is the geometric mean of the processes' median ratios,
and its interval the wider of (a) a Student-t interval of the mean of the processes' log median ratios, which
measures the process-to-process spread (each process's median carries its own rounds' noise too, so the spread
of the medians is the whole variance of one process's estimate), and (b) the percentile bootstrap of the median
of all rounds pooled (the rounds' own noise, so that a few processes agreeing by chance never give an interval
narrower than their rounds allow). With one process it is the single-process speedup above. Why not a
hierarchical bootstrap (resample processes, then rounds): with 3 processes it cannot reach beyond the outermost
of the 3 medians, which covers the next process's mean only about 75% of the time; the t quantile (4.30 for 3
processes) accounts for how little 3 processes say.

Stopping. At least :data:`MIN_ROUNDS` rounds and at least ``min_time_s`` seconds of the method's own timed calls
(the timing floor: sub-second cases would otherwise stop after a second of rounds that share one moment of the
machine); then more until the interval's half-width is at most :data:`TARGET_REL_HALF_WIDTH` of the speedup, or
the case's time budget is spent, or ``max_rounds`` is reached (:func:`stop_reason`, a pure function of the ratios,
the method's timed seconds and the elapsed time). The floor comes first: ``max_rounds`` and ``budget_s`` only
bound the rounds beyond it.

Quality. Metrics that average a per-image score (PSNR, SSIM, CLIP score) get a percentile bootstrap of the mean
over images. Distribution distances (FID, KID) get a bootstrap over the generated images whose percentile
interval is shifted by the bootstrap's bias (:func:`bias_corrected_interval`): resampling with replacement
duplicates images, which inflates a distance between distributions, so a plain percentile interval would sit above
the estimate. Proportions (accuracy, agreement) get Wilson score intervals (:func:`wilson_interval`), which stay
inside [0, 1] and are not degenerate at 0/n or n/n.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000  # speedup bootstrap: cheap (medians of a few dozen ratios)
QUALITY_RESAMPLES = 200  # FID/KID bootstrap: each resample recomputes a distance between feature sets
SEED = 0
MIN_ROUNDS = 5
TARGET_REL_HALF_WIDTH = 0.05
MIN_TIME_S = 0.0  # the timing floor's default (no floor); workload profiles set theirs

# stop_reason results
CONVERGED, BUDGET, MAX_ROUNDS = "converged", "budget", "max_rounds"


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _tails(confidence: float) -> tuple[float, float]:
    _z(confidence)  # validates
    alpha = 1.0 - confidence
    return alpha / 2.0, 1.0 - alpha / 2.0


def bootstrap_indices(n: int, resamples: int, seed: int = SEED) -> np.ndarray:
    """``[resamples, n]`` indices drawn with replacement from ``range(n)`` (numpy's PCG64, seeded)."""
    if n < 1:
        raise ValueError("bootstrap needs at least one value")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(
    replicates: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap replicates (linear interpolation between order statistics)."""
    lo, hi = _tails(confidence)
    values = np.asarray(replicates, dtype=float)
    return float(np.quantile(values, lo)), float(np.quantile(values, hi))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[..., np.ndarray] = np.median,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (a numpy reduction taking ``axis=``) of ``values``."""
    data = np.asarray(values, dtype=float)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"need a non-empty 1-d sample, got shape {data.shape}")
    if data.size == 1:
        return float(data[0]), float(data[0])
    replicates = statistic(data[bootstrap_indices(data.size, resamples, seed)], axis=1)
    return percentile_interval(replicates, confidence)


def median_ci(values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
              seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the median."""
    return bootstrap_ci(values, np.median, confidence, resamples, seed)


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
            seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (for per-image scores: PSNR, SSIM, CLIP score)."""
    return bootstrap_ci(values, np.mean, confidence, resamples, seed)


def bias_corrected_interval(
    estimate: float, replicates: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE, floor: float | None = 0.0
) -> tuple[float, float]:
    """The percentile interval of ``replicates`` shifted by the bootstrap's bias estimate
    (``mean(replicates) - estimate``), clipped below at ``floor``; for biased statistics such as FID and KID."""
    lo, hi = percentile_interval(replicates, confidence)
    bias = float(np.mean(np.asarray(replicates, dtype=float))) - float(estimate)
    lo, hi = lo - bias, hi - bias
    if floor is not None:
        lo, hi = max(lo, floor), max(hi, floor)
    return lo, hi


# --- proportions -----------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (as fractions in [0, 1])."""
    if n < 1:
        raise ValueError(f"need n >= 1 trials, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    z = _z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact at the ends (the formula gives them up to rounding)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def wilson_percent(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """:func:`wilson_interval` in percent."""
    lo, hi = wilson_interval(successes, n, confidence)
    return 100.0 * lo, 100.0 * hi


# --- speedup ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speedup:
    """A paired speedup: the median of per-round ratios and its bootstrap interval."""

    value: float
    ci: tuple[float, float]
    ratios: tuple[float, ...]
    process_medians: tuple[float, ...] = ()  # per worker process (several processes only)

    @property
    def processes(self) -> int:
        return max(1, len(self.process_medians))

    @property
    def rounds(self) -> int:
        return len(self.ratios)

    @property
    def rel_half_width(self) -> float:
        """Half the interval's width relative to the speedup (0.05 = +-5%)."""
        return (self.ci[1] - self.ci[0]) / 2.0 / self.value


def paired_ratios(baseline_times: Sequence[float], method_times: Sequence[float]) -> list[float]:
    """Per-round ``baseline / method`` of two equally long lists of round timings."""
    if len(baseline_times) != len(method_times):
        raise ValueError(f"unpaired timings: {len(baseline_times)} baseline rounds, {len(method_times)} method rounds")
    if any(t <= 0 for t in (*baseline_times, *method_times)):
        raise ValueError("timings must be positive")
    return [b / m for b, m in zip(baseline_times, method_times, strict=True)]


def speedup(ratios: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
            seed: int = SEED) -> Speedup:
    """The median of ``ratios`` with its percentile bootstrap interval."""
    if not ratios:
        raise ValueError("no timed rounds")
    values = [float(r) for r in ratios]
    return Speedup(float(np.median(values)), median_ci(values, confidence, resamples, seed), tuple(values))


def process_speedup(per_process: Sequence[Sequence[float]], confidence: float = CONFIDENCE,
                    resamples: int = RESAMPLES, seed: int = SEED) -> Speedup:
    """The speedup of rounds timed in several processes (``per_process``: each process's per-round ratios), with
    an interval that covers the process-to-process spread (see the module docstring). One process (or one
    process with rounds): exactly :func:`speedup` of its ratios."""
    groups = [[float(r) for r in g] for g in per_process if len(g)]
    if not groups:
        raise ValueError("no timed rounds")
    pooled = [r for g in groups for r in g]
    if len(groups) == 1:
        return speedup(pooled, confidence, resamples, seed)
    if any(r <= 0 or not math.isfinite(r) for r in pooled):
        raise ValueError("ratios must be positive and finite")
    medians = [float(np.median(g)) for g in groups]
    logs = np.log(medians)
    k = len(logs)
    centre = float(np.mean(logs))
    se = float(np.std(logs, ddof=1)) / math.sqrt(k)
    t = _t_quantile(0.5 + confidence / 2.0, k - 1)
    value = math.exp(centre)
    lo, hi = math.exp(centre - t * se), math.exp(centre + t * se)
    blo, bhi = median_ci(pooled, confidence, resamples, seed)
    return Speedup(value, (min(lo, blo, value), max(hi, bhi, value)), tuple(pooled), tuple(medians))


def _t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (scipy: a dependency of scikit-learn,
    which the bench extra installs)."""
    from scipy.stats import t as student_t

    if df < 1:
        raise ValueError(f"need df >= 1, got {df}")
    return float(student_t.ppf(p, df))


# --- adaptive rounds -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StopRule:
    """When to stop timing a case: see :func:`stop_reason`."""

    min_rounds: int = MIN_ROUNDS
    max_rounds: int = 50
    budget_s: float = 60.0
    target_rel_half_width: float = TARGET_REL_HALF_WIDTH
    min_time_s: float = MIN_TIME_S

    def __post_init__(self) -> None:
        ok = isinstance(self.min_time_s, int | float) and not isinstance(self.min_time_s, bool)
        if not ok or not math.isfinite(self.min_time_s) or self.min_time_s < 0:
            raise ValueError(f"min_time_s must be a finite number of seconds >= 0, got {self.min_time_s!r}")
        if not isinstance(self.min_rounds, int) or self.min_rounds < 1:
            raise ValueError(f"min_rounds must be an int >= 1, got {self.min_rounds!r}")
        if not isinstance(self.max_rounds, int) or self.max_rounds < self.min_rounds:
            raise ValueError(f"max_rounds must be an int >= min_rounds ({self.min_rounds}), got {self.max_rounds!r}")
        if not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0 seconds, got {self.budget_s!r}")
        if not self.target_rel_half_width > 0:
            raise ValueError(f"target_rel_half_width must be > 0, got {self.target_rel_half_width!r}")


def stop_reason(values: Sequence[float], elapsed_s: float, rule: StopRule, seed: int = SEED,
                method_time_s: float | None = None, per_process: Sequence[Sequence[float]] | None = None) -> str | None:
    """Why timing should stop after these rounds, or None to run another round.

    ``values``: the rounds' ratios (or, for the baseline row, its call times); ``per_process``: the same split by
    worker process (the interval is then :func:`process_speedup`'s). Never before ``rule.min_rounds``, nor before
    ``method_time_s`` (the method's timed calls so far, in seconds; None: not counted) reaches
    ``rule.min_time_s`` (the timing floor); :data:`CONVERGED` when the interval of their median has a
    half-width of at most ``rule.target_rel_half_width`` of the median; :data:`MAX_ROUNDS` at
    ``rule.max_rounds``; :data:`BUDGET` when ``elapsed_s`` (the case's timing so far) has reached
    ``rule.budget_s``.
    """
    n = len(values)
    if n < rule.min_rounds:
        return None
    if method_time_s is not None and method_time_s < rule.min_time_s:
        return None
    estimate = process_speedup(per_process, seed=seed) if per_process else speedup(values, seed=seed)
    if estimate.rel_half_width <= rule.target_rel_half_width:
        return CONVERGED
    if n >= rule.max_rounds:
        return MAX_ROUNDS
    if elapsed_s >= rule.budget_s:
        return BUDGET
    return None
