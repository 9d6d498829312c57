"""The one timing loop of the benchmark suite: paired, alternating rounds of the baseline and a method, warm-up
rounds dropped, adaptive round count (see :mod:`tokred.bench.stats`).

``tokred run``, ``tokred bench`` and the pytest plugin all time through :func:`time_paired` (via
:mod:`tokred.bench.harness`); tasks do not time anything themselves.

A round times one baseline call and one method call. Switching between them is the caller's business
(``use_baseline`` / ``use_method``: remove the patch, re-apply it); those switches are never timed. The order
within a round alternates (baseline first in even rounds, method first in odd ones), so a systematic advantage of
the second call of a pair (warm caches, a clock that has ramped up) falls on each variant equally. CUDA work is
synchronized by the workloads themselves.

The timing floor: rounds go on until both ``min_rounds`` and ``min_time_s`` seconds of the method's own timed calls
are reached (then the adaptive rule of :func:`stats.stop_reason`). Several worker processes
(:mod:`tokred.bench.workers`) each run :func:`time_paired` with a fixed number of rounds; the parent pools their
rounds into one :class:`Timings` with ``process_rounds`` set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import stats
from .contention import Monitor

FIXED = "fixed"  # stop reason when the number of rounds was given


@dataclass(frozen=True)
class TimingSettings:
    """How to time a case. ``rounds`` fixes the number of timed rounds (``--rounds``); otherwise
    :func:`stats.stop_reason` decides between ``min_rounds`` and ``max_rounds`` within ``budget_s`` seconds."""

    min_rounds: int = stats.MIN_ROUNDS
    max_rounds: int = 50
    warmup_rounds: int = 1
    budget_s: float = 60.0
    target_rel_half_width: float = stats.TARGET_REL_HALF_WIDTH
    rounds: int | None = None
    min_time_s: float = stats.MIN_TIME_S

    def __post_init__(self) -> None:
        if isinstance(self.warmup_rounds, bool) or not isinstance(self.warmup_rounds, int) or self.warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be an int >= 0, got {self.warmup_rounds!r}")
        if self.rounds is not None and (isinstance(self.rounds, bool) or not isinstance(self.rounds, int)
                                        or self.rounds < 1):
            raise ValueError(f"rounds must be an int >= 1, got {self.rounds!r}")
        _ = self.rule  # validates min_rounds, max_rounds, budget_s and the target

    @property
    def rule(self) -> stats.StopRule:
        return stats.StopRule(self.min_rounds, self.max_rounds, self.budget_s, self.target_rel_half_width,
                              self.min_time_s)


@dataclass
class Timings:
    """What :func:`time_paired` measured. ``baseline_times`` is empty for an unpaired (baseline-only) run.
    ``process_rounds``: with several worker processes, how many of the rounds (in order) each one timed; empty
    for one process."""

    method_times: list[float]
    baseline_times: list[float]
    warmup_rounds: int
    stop: str
    elapsed_s: float
    monitor: Monitor
    extra: dict[str, Any] = field(default_factory=dict)
    process_rounds: list[int] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.method_times)

    @property
    def processes(self) -> int:
        return max(1, len(self.process_rounds))

    @property
    def method_time_s(self) -> float:
        """Seconds of the method's own timed calls (what the timing floor counts)."""
        return float(sum(self.method_times))

    def split(self, values: list[float]) -> list[list[float]]:
        """``values`` (one per round) split by process (one list for one process)."""
        if not self.process_rounds:
            return [list(values)]
        out, start = [], 0
        for n in self.process_rounds:
            out.append(list(values[start:start + n]))
            start += n
        return out

    def per_process_values(self) -> list[list[float]]:
        """Each process's per-round ratios (paired) or method call times (unpaired)."""
        values = stats.paired_ratios(self.baseline_times, self.method_times) if self.paired else self.method_times
        return self.split(list(values))

    @property
    def paired(self) -> bool:
        return bool(self.baseline_times)

    def speedup(self) -> stats.Speedup:
        """The paired speedup (1.0, [1.0, 1.0] for an unpaired run: the baseline against itself)."""
        if not self.paired:
            ones = tuple(1.0 for _ in self.method_times)
            return stats.Speedup(1.0, (1.0, 1.0), ones, tuple(1.0 for _ in self.process_rounds))
        return stats.process_speedup(self.per_process_values())


def _call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_paired(
    method: Callable[[], Any],
    settings: TimingSettings,
    monitor: Monitor,
    baseline: Callable[[], Any] | None = None,
    use_baseline: Callable[[], None] | None = None,
    use_method: Callable[[], None] | None = None,
    after_method: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    call_timer: Callable[[Callable[[], Any]], float] | None = None,
) -> Timings:
    """Time ``method`` (and ``baseline``, paired) in rounds; see the module docstring.

    ``use_baseline()`` / ``use_method()`` switch the model between the two (called untimed before each call whose
    variant differs from the current one; the model starts and ends in the method's state). ``after_method()``
    runs untimed after every timed method call (e.g. to read the patch's token counts). Without ``baseline``
    the method's call times alone decide when to stop (the baseline row). ``clock`` is the budget's clock and
    ``call_timer(fn)`` calls ``fn`` once and returns its duration (tests script both). Adaptive rounds stop no
    earlier than ``settings.min_rounds`` rounds and ``settings.min_time_s`` seconds of the method's timed calls.
    """
    call_timer = call_timer or _call
    paired = baseline is not None
    state = {"variant": "method"}

    def switch(variant: str) -> None:
        if state["variant"] != variant:
            hook = use_baseline if variant == "baseline" else use_method
            if hook is not None:
                hook()
            state["variant"] = variant

    def one_round(index: int, timed: bool) -> tuple[float | None, float]:
        order = ("baseline", "method") if index % 2 == 0 else ("method", "baseline")
        times: dict[str, float] = {}
        for variant in order if paired else ("method",):
            switch(variant)
            fn = baseline if variant == "baseline" else method
            if timed:
                with monitor.call():
                    times[variant] = call_timer(fn)  # type: ignore[arg-type]
            else:
                fn()  # type: ignore[misc]
            if variant == "method" and after_method is not None:
                after_method()
        switch("method")
        return times.get("baseline"), times.get("method", 0.0)

    # (on an error the model may be left in either state: the caller removes the patch whatever happens)
    for i in range(settings.warmup_rounds):
        one_round(i, timed=False)
    method_times: list[float] = []
    baseline_times: list[float] = []
    monitor.start()
    start = clock()
    stop: str | None = None
    while stop is None:
        base_t, method_t = one_round(len(method_times), timed=True)
        method_times.append(method_t)
        if base_t is not None:
            baseline_times.append(base_t)
        monitor.sample()
        if settings.rounds is not None:
            stop = FIXED if len(method_times) >= settings.rounds else None
        else:
            values = stats.paired_ratios(baseline_times, method_times) if paired else method_times
            stop = stats.stop_reason(values, clock() - start, settings.rule, method_time_s=sum(method_times))
    elapsed = clock() - start
    monitor.stop()
    return Timings(method_times, baseline_times, settings.warmup_rounds, stop, elapsed, monitor)
