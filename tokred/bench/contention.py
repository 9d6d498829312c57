"""Contention: torch's thread count for a case, and whether the machine gave the case what it needed.

Threads. A benchmark's timings are only comparable at a known thread count, and small models lose nothing on one
thread while a second busy process makes OpenMP's spin-waiting threads ten times slower. So each task says its
thread count (:meth:`tokred.bench.task.Task.default_threads`: 1 for the embedded models), the user may override it
(``--set threads=N``), the harness sets it with :func:`torch_threads` for the case and restores it afterwards, and
the results record it.

Contended. A case is marked contended (:func:`assess`, a pure function so tests can feed it numbers) when

* other processes used more CPU during its timed rounds than the cores the case leaves idle, plus
  :data:`OTHERS_TOLERANCE` of a core (:class:`OthersCpu`, Linux): the machine's non-idle CPU time over the rounds
  (``/proc/stat``: user, nice, system, irq, softirq and steal, so a hypervisor's other guests count too; of the
  cores this process may run on, its affinity mask) minus this process's own CPU time over the same window. The
  case's own demand is its torch threads on CPU, one launching thread on a GPU. The timing worker processes of a
  replicated case count as others, but only one of them runs at a time and the rest wait idle on a pipe, as the
  parent does; or
* on CPU, the process's CPU seconds per wall second over the timed calls, divided by its threads, fell below
  :data:`MIN_CPU_UTILISATION`: its threads were runnable but did not run. (On CUDA the process waits for the GPU,
  so its CPU time says nothing and only the others' CPU is judged.)

Why not the load average (the rule up to results schema 5, still the fallback where there is no ``/proc/stat``):
it counts the case's own threads and its worker processes (which build their models in parallel just before
the timing starts), and as an exponential average over a minute it still shows them, or a job that ended before
the case, while the case runs: a quiet 2-core machine read 2.1-2.5 during 2-thread cases and flagged them. The
CPU accounting sees only the others, over exactly the timed window. ``/proc/stat`` counts in clock ticks (10 ms
per core), so each reading may be a tick per core off: :attr:`OthersCpu.resolution_s` of slack is allowed. The
number of runnable tasks (``procs_running``, this process's reader included) is sampled between rounds and its
maximum recorded, for diagnosis only. Everything measured is recorded (``others_cpu``), the load average too.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

# A process that gets its threads uses close to 1.0 (OpenMP workers spin between parallel regions); two
# processes sharing a core give each about 0.5.
MIN_CPU_UTILISATION = 0.75
# Kernel threads and short-lived daemons keep a quiet machine's load a little above the threads that run: a case
# on both threads of a quiet 2-core VM read 2.08-2.12 with 99% CPU utilisation. A fifth of a core is not a
# competitor; a second busy process adds a whole one. (The load average is the fallback where /proc/stat is not.)
LOAD_TOLERANCE = 0.25
# Other processes may use the cores a case leaves idle, and a quarter of a core more (kernel threads, daemons,
# the idle parent and workers waking on their pipes): a second busy process adds a whole core.
OTHERS_TOLERANCE = 0.25
PROC_STAT = "/proc/stat"
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


def clock_ticks() -> int:
    """Clock ticks per second of ``/proc/stat`` (``USER_HZ``; 100 where sysconf does not say)."""
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100


@dataclass(frozen=True)
class CpuReading:
    """One reading of the machine's CPU time: ``busy_s``, the non-idle CPU seconds since boot of the cores read
    (:func:`parse_proc_stat`: user, nice, system, irq, softirq, steal; guest time is inside user and nice),
    ``own_s`` this process's CPU seconds, ``procs_running`` the runnable tasks at that moment, ``wall_s`` a
    monotonic clock."""

    busy_s: float
    own_s: float
    procs_running: int | None
    wall_s: float


def _busy_ticks(fields: list[str]) -> int | None:
    """user + nice + system + irq + softirq + steal of one ``cpu`` line's fields; None if malformed."""
    if len(fields) < 8:
        return None
    try:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    except ValueError:
        return None
    return user + nice + system + irq + softirq + steal


def parse_proc_stat(text: str, ticks: int, cpus: Iterable[int] | None = None) -> tuple[float, int | None] | None:
    """(non-idle CPU seconds, procs_running) from the text of ``/proc/stat``: of the cores ``cpus`` (their
    ``cpuN`` lines: a process confined to some cores of a larger machine is not contended by the others), or of
    the whole machine (the aggregate ``cpu`` line) when ``cpus`` is None or has no line of its own. None when the
    lines needed are missing or malformed (the 8 fields up to steal)."""
    wanted = None if cpus is None else {f"cpu{i}" for i in cpus}
    total, per_cpu, running = None, {}, None
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "cpu":
            total = _busy_ticks(parts[1:])
            if total is None:
                return None
        elif wanted is not None and parts[0] in wanted:
            busy = _busy_ticks(parts[1:])
            if busy is None:
                return None
            per_cpu[parts[0]] = busy
        elif parts[0] == "procs_running" and len(parts) == 2 and parts[1].isdigit():
            running = int(parts[1])
    if wanted and per_cpu.keys() == wanted:
        return sum(per_cpu.values()) / ticks, running
    return None if total is None else (total / ticks, running)


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None


def read_cpu(path: str = PROC_STAT, ticks: int | None = None, cpus: Iterable[int] | None = None) -> CpuReading | None:
    """A :class:`CpuReading` now, of the cores ``cpus`` (default: those this process may run on), or None where
    ``path`` cannot be read or parsed (not Linux)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    parsed = parse_proc_stat(text, ticks or clock_ticks(), _affinity() if cpus is None else cpus)
    if parsed is None:
        return None
    return CpuReading(parsed[0], time.process_time(), parsed[1], time.perf_counter())


@dataclass(frozen=True)
class OthersCpu:
    """The CPU that processes other than this one used over a window (one or several, pooled by ``+``):
    ``busy_s`` the machine's non-idle CPU seconds, ``own_s`` this process's, over ``window_s`` wall seconds;
    ``resolution_s`` the counting slack (a clock tick per core per ``/proc/stat`` reading);
    ``procs_running_max`` the most runnable tasks sampled (None: not sampled)."""

    busy_s: float
    own_s: float
    window_s: float
    resolution_s: float
    procs_running_max: int | None = None

    @classmethod
    def between(cls, first: CpuReading, last: CpuReading, cores: int, ticks: int | None = None,
                running: Sequence[int] = ()) -> OthersCpu:
        samples = [n for n in (first.procs_running, *running, last.procs_running) if n is not None]
        return cls(busy_s=max(0.0, last.busy_s - first.busy_s), own_s=max(0.0, last.own_s - first.own_s),
                   window_s=max(0.0, last.wall_s - first.wall_s),
                   resolution_s=2.0 * cores / (ticks or clock_ticks()),
                   procs_running_max=max(samples) if samples else None)

    def __add__(self, other: OthersCpu) -> OthersCpu:
        peaks = [p for p in (self.procs_running_max, other.procs_running_max) if p is not None]
        return OthersCpu(self.busy_s + other.busy_s, self.own_s + other.own_s, self.window_s + other.window_s,
                         self.resolution_s + other.resolution_s, max(peaks) if peaks else None)

    @property
    def others_s(self) -> float:
        """CPU seconds of the other processes (never below 0: the two counts tick differently)."""
        return max(0.0, self.busy_s - self.own_s)

    def exceeds(self, limit_cores: float) -> bool:
        """The others used more than ``limit_cores`` over the window, beyond the counting slack (the contention
        rule of :func:`assess` and the start-up warning)."""
        return self.window_s > 0 and self.others_s > limit_cores * self.window_s + self.resolution_s

    @property
    def others_cores(self) -> float | None:
        """The other processes' mean number of busy cores over the window; None for an empty window."""
        return self.others_s / self.window_s if self.window_s > 0 else None

    def to_json(self) -> dict[str, float | int | None]:
        return {"busy_s": self.busy_s, "own_s": self.own_s, "window_s": self.window_s,
                "resolution_s": self.resolution_s, "procs_running_max": self.procs_running_max}

    @classmethod
    def from_json(cls, values: dict[str, float | int | None]) -> OthersCpu:
        return cls(float(values["busy_s"]), float(values["own_s"]), float(values["window_s"]),
                   float(values["resolution_s"]), values.get("procs_running_max"))  # type: ignore[arg-type]


def others_limit(threads: int, cores: int, check_cpu: bool = True) -> float:
    """The cores other processes may use beside a case without contending with it: those the case leaves idle
    (its ``threads`` on CPU, one launching thread on a GPU) plus :data:`OTHERS_TOLERANCE`."""
    demand = threads if check_cpu else 1
    return max(cores - demand, 0) + OTHERS_TOLERANCE


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
    others: OthersCpu | None = None,
) -> Assessment:
    """Was a case contended? ``others``: the other processes' CPU over its timed rounds (:class:`OthersCpu`;
    None where it could not be measured: then the 1-minute load averages ``load_samples`` taken during the case
    decide instead); ``cpu_seconds``: the process's CPU time over ``wall_seconds`` of timed calls run with
    ``threads`` torch threads on a machine with ``cores`` cores available; ``check_cpu=False`` (GPU runs)
    ignores the CPU time. See the module docstring."""
    reasons: list[str] = []
    if others is not None:
        limit = others_limit(threads, cores, check_cpu)
        if others.exceeds(limit):
            reasons.append(
                f"other processes used {others.others_cores:.2f} cores (> {limit:.2f}: the {cores} cores less "
                f"this case's {threads if check_cpu else 1}, plus {OTHERS_TOLERANCE:g})"
            )
    else:
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
    """The other processes' CPU, the load average and this process's CPU time around the timed calls of one case.

    ``start()`` before the first timed round, ``call()`` around each timed call (``with monitor.call(): fn()``),
    ``sample()`` between rounds, ``stop()`` at the end; then :meth:`assessment` and :meth:`info`. ``read`` takes
    a :class:`CpuReading`, or None where it cannot (default :func:`read_cpu`; tests inject readings).
    """

    threads: int
    check_cpu: bool = True
    cores: int = field(default_factory=cpu_count)
    read: Callable[[], CpuReading | None] | None = field(default=None, repr=False)  # None: read_cpu
    loadavg_before: tuple[float, float, float] | None = None
    loadavg_after: tuple[float, float, float] | None = None
    load_samples: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    others: OthersCpu | None = None
    _first: CpuReading | None = field(default=None, repr=False)
    _running: list[int] = field(default_factory=list, repr=False)

    def start(self) -> None:
        self.loadavg_before = loadavg()
        if self.loadavg_before is not None:
            self.load_samples.append(self.loadavg_before[0])
        self._running = []
        self._first = self._read()

    def _read(self) -> CpuReading | None:
        return (self.read or read_cpu)()

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
        if self._first is not None:
            reading = self._read()
            if reading is not None and reading.procs_running is not None:
                self._running.append(reading.procs_running)

    def stop(self) -> None:
        self.loadavg_after = loadavg()
        if self.loadavg_after is not None:
            self.load_samples.append(self.loadavg_after[0])
        last = self._read() if self._first is not None else None
        if self._first is not None and last is not None:
            window = OthersCpu.between(self._first, last, self.cores, running=self._running)
            self.others = window if self.others is None else self.others + window
        self._first = None

    def assessment(self) -> Assessment:
        cpu = self.cpu_seconds if self.wall_seconds > 0 else None
        return assess(self.load_samples, cpu, self.wall_seconds, self.threads, self.cores, self.check_cpu,
                      self.others)

    def info(self) -> dict[str, object]:
        """The results' contention keys (``cpu_count``, ``loadavg_before``/``after``, ``cpu_utilisation``,
        ``others_cpu``, ``contended``, ``contention``)."""
        verdict = self.assessment()
        others = None
        if self.others is not None:
            others = dict(self.others.to_json(), source=PROC_STAT, others_s=self.others.others_s,
                          others_cores=self.others.others_cores,
                          limit_cores=others_limit(self.threads, self.cores, self.check_cpu))
        return {
            "cpu_count": self.cores,
            "loadavg_before": list(self.loadavg_before) if self.loadavg_before is not None else None,
            "loadavg_after": list(self.loadavg_after) if self.loadavg_after is not None else None,
            "cpu_utilisation": verdict.cpu_utilisation,
            "others_cpu": others,
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


START_UP_WINDOW_S = 1.0  # the start-up check's sample of the other processes' CPU


def sample_others(window_s: float = START_UP_WINDOW_S) -> OthersCpu | None:
    """The other processes' CPU over the next ``window_s`` seconds (this process sleeps meanwhile), or None where
    ``/proc/stat`` cannot be read (not Linux)."""
    first = read_cpu()
    if first is None:
        return None
    time.sleep(window_s)
    last = read_cpu()
    return None if last is None else OthersCpu.between(first, last, cpu_count())


def loaded_warning(
    threads: int, load: tuple[float, float, float] | None = None, cores: int | None = None,
    others: OthersCpu | None = None,
) -> str | None:
    """A one-line warning when the machine is already loaded before the run starts, None otherwise (and when
    ``TOKRED_LOAD_WARNING=0``: the test suite sets it).

    Loaded: the other processes' CPU (``others``, a :func:`sample_others` window; sampled here when neither it nor
    ``load`` is given) is more than the cores the run leaves idle plus :data:`OTHERS_TOLERANCE` and the counting
    slack, the rule the timed rounds are judged by. Where ``/proc/stat`` cannot be read (or ``load`` is given),
    the 1-minute load average: at least one runnable thread more than the idle cores. (The load average alone
    warned after a run that had just ended on a quiet machine: it remembers the last minute.)"""
    if os.environ.get(WARNING_ENV, "1") == "0":
        return None
    cores = cpu_count() if cores is None else cores
    what = "thread" if threads == 1 else "threads"
    if others is None and load is None:
        others = sample_others()
    if others is not None and others.others_cores is not None:
        if not others.exceeds(others_limit(threads, cores)):
            return None
        return (
            "tokred: warning: the machine is already loaded (other processes are using "
            f"{others.others_cores:.2f} of {cores} cores, this run needs {threads} {what}): timings may be contended; "
            "such cases are marked contended in the results"
        )
    load = loadavg() if load is None else load
    if load is None or load[0] < cores - threads + 1:
        return None
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
