"""Contention: torch's thread count for a case, and whether the machine gave the case what it needed.

Threads. A benchmark's timings are only comparable at a known thread count, and small models lose nothing on one
thread while a second busy process makes OpenMP's spin-waiting threads ten times slower. So each task says its
thread count (:meth:`tokred.bench.task.Task.default_threads`: 1 for the embedded models), the user may override it
(``--set threads=N``), the harness sets it with :func:`torch_threads` for the case and restores it afterwards, and
the results record it.

Contended. A case is marked contended (:func:`assess`, a pure function so tests can feed it numbers) when

* the 1-minute load average sampled during the case exceeds the cores available to the process by more than
  :data:`LOAD_TOLERANCE` (more runnable threads than cores: somebody waited, us or them), or
* on CPU, the process's CPU seconds per wall second over the timed calls, divided by its threads, fell below
  :data:`MIN_CPU_UTILISATION`: its threads were runnable but did not run. (On CUDA the process waits for the GPU,
  so its CPU time says nothing and only the load average is used.)

The load average lags (an exponential average over a minute), so a competitor that starts during a short case
may show only in the CPU time; a competitor that ends just before one shows as load without harm, which errs on
the side of flagging.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

# A process that gets its threads uses close to 1.0 (OpenMP workers spin between parallel regions); two
# processes sharing a core give each about 0.5.
MIN_CPU_UTILISATION = 0.75
# Kernel threads and short-lived daemons keep a quiet machine's load a little above the threads that run: a case
# on both threads of a quiet 2-core VM read 2.08-2.12 with 99% CPU utilisation. A fifth of a core is not a
# competitor; a second busy process adds a whole one.
LOAD_TOLERANCE = 0.25
WARNING_ENV = "TOKRED_LOAD_WARNING"  # "0": no start-up warning (tests, whose output must not depend on the load)


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def loadavg() -> tuple[float, float, float] | None:
    """``os.getloadavg()``, or None where the platform has none."""
    try:
        return tuple(float(x) for x in os.getloadavg())  # type: ignore[return-value]
    except (AttributeError, OSError):
        return None


@dataclass(frozen=True)
class Assessment:
    contended: bool
    reasons: tuple[str, ...]
    cpu_utilisation: float | None


def assess(
    load_samples: Sequence[float],
    cpu_seconds: float | None,
    wall_seconds: float,
    threads: int,
    cores: int,
    check_cpu: bool = True,
) -> Assessment:
    """Was a case contended? ``load_samples``: 1-minute load averages taken during the case; ``cpu_seconds``:
    the process's CPU time over ``wall_seconds`` of timed calls run with ``threads`` torch threads on a machine
    with ``cores`` cores available; ``check_cpu=False`` (GPU runs) ignores the CPU time. See the module docstring."""
    reasons: list[str] = []
    peak = max(load_samples) if load_samples else None
    if peak is not None and peak > cores + LOAD_TOLERANCE:
        reasons.append(f"load average {peak:.2f} > {cores} cores")
    utilisation = None
    if cpu_seconds is not None and wall_seconds > 0 and threads > 0:
        utilisation = cpu_seconds / wall_seconds / threads
        if check_cpu and utilisation < MIN_CPU_UTILISATION:
            what = "thread" if threads == 1 else "threads"
            reasons.append(
                f"CPU time {utilisation:.0%} of {threads} {what} per wall second (< {MIN_CPU_UTILISATION:.0%}): "
                "the process did not get its threads"
            )
    return Assessment(bool(reasons), tuple(reasons), utilisation)


@dataclass
class Monitor:
    """Load average and CPU time around the timed calls of one case.

    ``start()`` before the first timed round, ``call()`` around each timed call (``with monitor.call(): fn()``),
    ``sample()`` between rounds, ``stop()`` at the end; then :meth:`assessment` and :meth:`info`.
    """

    threads: int
    check_cpu: bool = True
    cores: int = field(default_factory=cpu_count)
    loadavg_before: tuple[float, float, float] | None = None
    loadavg_after: tuple[float, float, float] | None = None
    load_samples: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    def start(self) -> None:
        self.loadavg_before = loadavg()
        if self.loadavg_before is not None:
            self.load_samples.append(self.loadavg_before[0])

    @contextmanager
    def call(self) -> Iterator[None]:
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self.cpu_seconds += time.process_time() - cpu
            self.wall_seconds += time.perf_counter() - wall

    def sample(self) -> None:
        now = loadavg()
        if now is not None:
            self.load_samples.append(now[0])

    def stop(self) -> None:
        self.loadavg_after = loadavg()
        if self.loadavg_after is not None:
            self.load_samples.append(self.loadavg_after[0])

    def assessment(self) -> Assessment:
        cpu = self.cpu_seconds if self.wall_seconds > 0 else None
        return assess(self.load_samples, cpu, self.wall_seconds, self.threads, self.cores, self.check_cpu)

    def info(self) -> dict[str, object]:
        """The results' contention keys (``cpu_count``, ``loadavg_before``/``after``, ``cpu_utilisation``,
        ``contended``, ``contention``)."""
        verdict = self.assessment()
        return {
            "cpu_count": self.cores,
            "loadavg_before": list(self.loadavg_before) if self.loadavg_before is not None else None,
            "loadavg_after": list(self.loadavg_after) if self.loadavg_after is not None else None,
            "cpu_utilisation": verdict.cpu_utilisation,
            "contended": verdict.contended,
            "contention": list(verdict.reasons),
        }


# --- threads -----------------------------------------------------------------------------------------------------


def check_threads(threads: object, what: str = "threads") -> int:
    """A valid torch thread count (int >= 1), or a ValueError naming the setting and the valid range."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{what} must be an int >= 1 (torch threads per process), got {threads!r}")
    return threads


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: as it is), restoring the previous count; yields
    the count in effect."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


# --- start-up check ----------------------------------------------------------------------------------------------


def loaded_warning(
    threads: int, load: tuple[float, float, float] | None = None, cores: int | None = None
) -> str | None:
    """A one-line warning when the machine is already loaded: the 1-minute load average (other processes; this
    one has not started timing) is at least one runnable thread more than the cores the run leaves idle
    (``cores - threads``). None otherwise, and when ``TOKRED_LOAD_WARNING=0`` (the test suite sets it)."""
    if os.environ.get(WARNING_ENV, "1") == "0":
        return None
    load = loadavg() if load is None else load
    cores = cpu_count() if cores is None else cores
    if load is None or load[0] < cores - threads + 1:
        return None
    what = "thread" if threads == 1 else "threads"
    return (
        f"tokred: warning: the machine is already loaded (1-minute load average {load[0]:.2f} on {cores} cores, "
        f"this run needs {threads} {what}): timings may be contended; such cases are marked contended in the results"
    )


def warn_if_loaded(threads: Sequence[int | None], stream: TextIO | None = None) -> str | None:
    """Print :func:`loaded_warning` (stderr) for the largest of the planned runs' thread counts (None: torch's
    current setting); returns the message."""
    import torch

    needed = max((t if t is not None else torch.get_num_threads()) for t in threads) if threads else 1
    message = loaded_warning(needed)
    if message is not None:
        print(message, file=stream if stream is not None else sys.stderr, flush=True)
    return message
