"""The benchmark's statistics (tokred.bench.stats) and its one timing loop (tokred.bench.timing), on synthetic
timings with a known spread: no clock is read, so the tests are exact and fast."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tokred.bench import stats
from tokred.bench.contention import Monitor
from tokred.bench.timing import FIXED, TimingSettings, time_paired

# --- bootstrap intervals of the paired speedup -------------------------------------------------------------------


def lognormal_rounds(rng: np.random.Generator, n: int, speedup: float, sigma: float) -> list[float]:
    """Per-round ratios of a baseline and a method call whose times are lognormal with spread ``sigma`` and whose
    median ratio is ``speedup``."""
    baseline = rng.lognormal(mean=0.0, sigma=sigma, size=n)
    method = rng.lognormal(mean=-math.log(speedup), sigma=sigma, size=n)
    return stats.paired_ratios(list(baseline), list(method))


def test_bootstrap_interval_covers_the_true_median_speedup():
    rng = np.random.default_rng(1)
    true = 1.3
    covered = 0
    trials = 200
    for _ in range(trials):
        estimate = stats.speedup(lognormal_rounds(rng, 20, true, sigma=0.1))
        covered += estimate.ci[0] <= true <= estimate.ci[1]
        assert estimate.ci[0] <= estimate.value <= estimate.ci[1]
    assert covered / trials >= 0.90, covered


def test_bootstrap_interval_narrows_with_more_rounds_and_less_spread():
    rng = np.random.default_rng(2)

    def mean_width(n: int, sigma: float) -> float:
        widths = []
        for _ in range(50):
            ci = stats.speedup(lognormal_rounds(rng, n, 1.5, sigma)).ci
            widths.append(ci[1] - ci[0])
        return float(np.mean(widths))

    assert mean_width(40, 0.1) < 0.7 * mean_width(10, 0.1)
    assert mean_width(20, 0.02) < 0.3 * mean_width(20, 0.1)


def test_bootstrap_is_deterministic_and_degenerate_cases():
    ratios = [1.1, 1.3, 1.2, 1.25, 1.15, 1.4]
    assert stats.speedup(ratios) == stats.speedup(list(ratios))  # fixed seed
    assert stats.speedup(ratios).value == pytest.approx(1.225)  # median of an even count
    assert stats.median_ci([2.0]) == (2.0, 2.0)
    assert stats.median_ci([1.0] * 7) == (1.0, 1.0)
    # with 5 rounds the percentile interval of the median spans the extreme values (P(median = min) ~ 5.8% > 2.5%)
    assert stats.median_ci([1.0, 2.0, 3.0, 4.0, 5.0]) == (1.0, 5.0)
    with pytest.raises(ValueError, match="unpaired timings: 2 baseline rounds, 1 method rounds"):
        stats.paired_ratios([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        stats.paired_ratios([1.0], [0.0])
    with pytest.raises(ValueError, match="no timed rounds"):
        stats.speedup([])


def test_mean_interval_and_bias_corrected_interval():
    rng = np.random.default_rng(3)
    values = rng.normal(30.0, 2.0, size=400)
    lo, hi = stats.mean_ci(values)
    half = 1.96 * 2.0 / math.sqrt(400)  # the normal theory interval, which the bootstrap approximates
    assert lo < values.mean() < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    # a statistic whose replicates sit above the estimate (as FID's do) gets its interval shifted back onto it
    replicates = np.linspace(11.0, 13.0, 101)  # mean 12, the estimate 10: bias 2
    assert stats.bias_corrected_interval(10.0, replicates) == pytest.approx((9.05, 10.95))
    assert stats.bias_corrected_interval(0.5, replicates)[0] == 0.0  # clipped at 0


# --- Wilson score intervals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, n, low, high",
    [
        (0, 10, 0.0, 0.2775),  # the textbook values (e.g. Wilson 1927; Newcombe 1998, method 3)
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),  # Newcombe 1998, table I
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_known_values(k, n, low, high):
    lo, hi = stats.wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)
    assert stats.wilson_percent(k, n) == pytest.approx((100 * lo, 100 * hi))


def test_wilson_interval_bad_input():
    with pytest.raises(ValueError, match="n >= 1"):
        stats.wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r"successes must be in \[0, 10\]"):
        stats.wilson_interval(11, 10)


# --- the adaptive stopping rule ----------------------------------------------------------------------------------


def test_stop_rule_stops_at_the_minimum_when_tight():
    rule = stats.StopRule(min_rounds=5, max_rounds=50, budget_s=100.0)
    tight = [1.30, 1.31, 1.29, 1.30, 1.32]
    assert stats.stop_reason(tight[:4], 0.0, rule) is None  # never before min_rounds
    assert stats.stop_reason(tight, 0.0, rule) == stats.CONVERGED


def test_stop_rule_goes_on_when_wide_until_budget_or_max_rounds():
    rule = stats.StopRule(min_rounds=5, max_rounds=12, budget_s=10.0)
    wide = [1.0, 1.6, 1.1, 1.5, 1.3, 0.9, 1.7, 1.2, 1.4, 1.0, 1.6, 1.3]
    assert stats.stop_reason(wide[:5], 1.0, rule) is None
    assert stats.stop_reason(wide[:8], 9.9, rule) is None
    assert stats.stop_reason(wide[:8], 10.0, rule) == stats.BUDGET
    assert stats.stop_reason(wide, 1.0, rule) == stats.MAX_ROUNDS
    # the budget never cuts below the minimum
    assert stats.stop_reason(wide[:3], 1e9, rule) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_rounds=0), "min_rounds must be an int >= 1"),
        (dict(min_rounds=5, max_rounds=4), r"max_rounds must be an int >= min_rounds \(5\)"),
        (dict(budget_s=0), "budget_s must be > 0 seconds"),
        (dict(target_rel_half_width=0), "target_rel_half_width must be > 0"),
    ],
)
def test_stop_rule_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stats.StopRule(**kwargs)


# --- the timing loop: paired, alternating, warm-up dropped, adaptive ---------------------------------------------


class ScriptedCalls:
    """Stands in for a model: records which variant each call ran under; ``call_time`` scripts its duration."""

    def __init__(self, baseline_s: float, method_s):
        self.state = "method"
        self.log: list[str] = []
        self.baseline_s = baseline_s
        self.method_s = method_s if callable(method_s) else itertools.repeat(method_s).__next__

    def call(self) -> None:
        self.log.append(self.state)

    def call_time(self, fn) -> float:
        fn()
        return self.baseline_s if self.state == "baseline" else self.method_s()


class FakeClock:
    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def run_scripted(calls: ScriptedCalls, settings: TimingSettings, clock=None):
    def use_baseline():
        assert calls.state == "method"
        calls.state = "baseline"

    def use_method():
        assert calls.state == "baseline"
        calls.state = "method"

    return time_paired(calls.call, settings, Monitor(threads=1), baseline=calls.call, use_baseline=use_baseline,
                       use_method=use_method, clock=clock or FakeClock(0.0), call_timer=calls.call_time)


def test_paired_rounds_alternate_order_and_drop_warmup():
    calls = ScriptedCalls(baseline_s=2.0, method_s=1.0)
    timings = run_scripted(calls, TimingSettings(warmup_rounds=1, rounds=3))
    assert timings.stop == FIXED and timings.rounds == 3 and timings.warmup_rounds == 1
    # warm-up round (baseline first), then rounds 0 (baseline first), 1 (method first), 2 (baseline first)
    assert calls.log == ["baseline", "method"] * 2 + ["method", "baseline"] + ["baseline", "method"]
    assert calls.state == "method"  # left patched
    assert timings.baseline_times == [2.0] * 3 and timings.method_times == [1.0] * 3
    assert timings.speedup().value == 2.0 and timings.speedup().ci == (2.0, 2.0)


def test_adaptive_rounds_stop_at_five_when_tight():
    calls = ScriptedCalls(baseline_s=1.5, method_s=1.0)
    timings = run_scripted(calls, TimingSettings(min_rounds=5, max_rounds=50, budget_s=100.0))
    assert timings.stop == stats.CONVERGED and timings.rounds == 5
    assert timings.speedup().value == pytest.approx(1.5)


def test_adaptive_rounds_go_on_while_wide_then_stop_on_budget():
    noisy = itertools.cycle([0.7, 1.3, 0.9, 1.2, 0.8, 1.1]).__next__
    calls = ScriptedCalls(baseline_s=1.0, method_s=noisy)
    # the clock advances 1 s per reading: two readings a round (start excluded) -> the budget of 12 s ends round 12
    timings = run_scripted(calls, TimingSettings(min_rounds=5, max_rounds=100, budget_s=12.0), clock=FakeClock(1.0))
    assert timings.stop == stats.BUDGET and 5 < timings.rounds <= 12
    calls = ScriptedCalls(baseline_s=1.0, method_s=noisy)
    timings = run_scripted(calls, TimingSettings(min_rounds=5, max_rounds=9, budget_s=1e9))
    assert timings.stop == stats.MAX_ROUNDS and timings.rounds == 9


def test_unpaired_baseline_row():
    calls = ScriptedCalls(baseline_s=0.0, method_s=1.0)
    timings = time_paired(calls.call, TimingSettings(rounds=4, warmup_rounds=2), Monitor(threads=1),
                          call_timer=calls.call_time)
    assert calls.log == ["method"] * 6 and timings.rounds == 4 and not timings.paired
    assert timings.speedup() == stats.Speedup(1.0, (1.0, 1.0), (1.0, 1.0, 1.0, 1.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(warmup_rounds=-1), "warmup_rounds must be an int >= 0"),
        (dict(rounds=0), "rounds must be an int >= 1"),
        (dict(min_rounds=3, max_rounds=2), "max_rounds must be an int >= min_rounds"),
    ],
)
def test_timing_settings_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TimingSettings(**kwargs)
