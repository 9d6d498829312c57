"""Process replication: a case's timed rounds spread over several fresh worker processes (pyperf's model).

A process's memory layout, allocator state and thread placement shift every timing it takes: the rounds of one
process agree to within a few percent, while fresh processes disagree by up to 15% (DeiT-S r=13 at batch 8 on 2
threads: 1.51x to 1.78x in eight processes). An interval computed from one process's rounds covers that process,
not the next one. So with ``processes`` N > 1 (a workload profile's setting, ``--processes N``,
``--tokred-processes=N``) a :class:`WorkerPool` of N processes is *spawned* (never forked: a fork would share the
parent's heap layout and thread pool state), each builds the task's model itself (:meth:`TaskRun.setup_timing`:
the model and its inputs, no reference outputs, no quality), and for every case the parent asks each worker in
turn for a number of paired rounds of the baseline and the method (each worker applies the method's patch itself,
runs its warm-up rounds, times, removes the patch) and pools what they send back (:func:`time_replicated`). Only
one worker times at a time; the others wait on their pipe, idle. The parent computes the interval from the
per-process results (:func:`tokred.bench.stats.process_speedup`) and records the per-process medians.

Quality, FLOPs and memory are measured once, in the parent (its own set-up model), never per worker.

The pool lives as long as the task's run (:meth:`TaskRun.release` closes it): each worker builds its model once per
task, not once per case (a build is a few seconds; the embedded ViT's whole case is a few seconds too). The
workers are fresh with respect to the parent, and each case's interval spans N processes.

Rounds per worker and pass: the first pass gives each worker ``max(2, ceil(min_rounds / N))`` rounds (2: a
median of one round is the round itself); then, while the stopping rule says go on, further passes give each
worker enough rounds to reach the timing floor (``min_time_s`` of the method's calls, summed over processes), or
about half as many again as it has, bounded by what is left of ``max_rounds`` and of the budget. With ``--rounds
R`` the R rounds are shared out (R // N each, the remainder to the first workers). Every pass starts with the
case's warm-up rounds (untimed, dropped): a worker that waited while the others timed starts cold.

Compiled runs (:mod:`tokred.bench.compiled`): each worker compiles its own model in every pass (a process cannot
share dynamo's compiled code) and sends its compile record back; the parent records the first pass's with
``process_compile_s``, every pass's compile time. Inductor's on-disk cache (on by default) lets a later worker
reuse what an earlier one compiled, so its compile time may be smaller. With ``--rounds R`` each worker has one
pass per case, so one compile.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

from . import stats
from .contention import Monitor, OthersCpu
from .timing import FIXED, Timings, TimingSettings

# How long the parent waits for a worker's set-up or one pass before giving up on it (a hung worker must not hang
# the run): generous, a full-size model on a CPU builds in minutes and a pass may be several minutes of rounds.
SETUP_TIMEOUT_S = 1800.0
PASS_TIMEOUT_S = 3600.0


class WorkerError(RuntimeError):
    """A worker process failed (its set-up or a case's rounds) or died; the message says which and why."""


def check_processes(value: Any, what: str = "processes") -> int:
    """A valid process count (an int >= 1), or a ValueError naming the setting and what the values mean."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1 (1: time in this process; N > 1: spread each case's rounds "
                         f"over N spawned worker processes), got {value!r}")
    return value


# --- the worker process ----------------------------------------------------------------------------------------


def _worker_main(conn: Any, spec: dict[str, Any]) -> None:
    """A worker: build the task (timing only), say ready, then time the cases the parent asks for."""
    from .harness import Case, CaseSkipped, TaskRun

    try:
        start = time.perf_counter()
        run = TaskRun(**spec)
        run.setup_timing()
        conn.send(("ready", {"pid": os.getpid(), "setup_s": time.perf_counter() - start}))
    except BaseException as err:  # noqa: BLE001 - the parent reports it
        conn.send(("error", _describe(err)))
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if message[0] == "close":
            return
        _, case_fields, settings = message
        try:
            case = Case(**case_fields)
            timings, tokens = run.time_case(case, TimingSettings(**settings))
            monitor = timings.monitor
            conn.send(("ok", {
                "method_times": timings.method_times, "baseline_times": timings.baseline_times,
                "tokens": tokens, "load_samples": monitor.load_samples, "cpu_seconds": monitor.cpu_seconds,
                "wall_seconds": monitor.wall_seconds, "loadavg_before": monitor.loadavg_before,
                "loadavg_after": monitor.loadavg_after, "threads": monitor.threads,
                "compile": timings.extra.get("compile"),
                "others_cpu": monitor.others.to_json() if monitor.others is not None else None,
            }))
        except KeyboardInterrupt:
            return
        except CaseSkipped as err:  # e.g. a method that fails to compile: skipped in the parent, with the reason
            conn.send(("skip", str(err)))
        except BaseException as err:  # noqa: BLE001 - the case fails in the parent, the worker goes on
            conn.send(("error", _describe(err)))


def _describe(err: BaseException) -> dict[str, str]:
    return {"type": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()}


# --- the pool ------------------------------------------------------------------------------------------------


class WorkerPool:
    """N spawned worker processes, each with the task built from ``spec`` (:class:`TaskRun` arguments)."""

    def __init__(self, spec: dict[str, Any], processes: int) -> None:
        self.spec = dict(spec)
        self.size = check_processes(processes)
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self.setup_s: list[float] = []
        self.pids: list[int] = []
        self.started = False

    def start(self) -> WorkerPool:
        """Spawn the workers (they build their models in parallel; untimed)."""
        if self.started:
            return self
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        try:
            for _ in range(self.size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(child, self.spec), daemon=True,
                                   name="tokred-timing-worker")
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
            self.started = True
        except Exception:
            self.close()
            raise
        return self

    def wait_ready(self) -> list[float]:
        """Wait until every worker has built its model; their set-up times (s). A WorkerError if one failed."""
        self.start()
        if len(self.setup_s) == self.size:
            return self.setup_s
        for i in range(len(self.setup_s), self.size):
            kind, payload = self._receive(i, SETUP_TIMEOUT_S, "set-up")
            if kind != "ready":
                self.close()
                raise WorkerError(f"timing worker {i + 1}/{self.size} failed to set up: {payload['type']}: "
                                  f"{payload['message']}")
            self.setup_s.append(float(payload["setup_s"]))
            self.pids.append(int(payload["pid"]))
        return self.setup_s

    def _receive(self, i: int, timeout: float, what: str) -> tuple[str, Any]:
        conn, proc = self._conns[i], self._procs[i]
        deadline = time.monotonic() + timeout
        while not conn.poll(1.0):
            if not proc.is_alive():
                code = proc.exitcode
                self.close()
                raise WorkerError(f"timing worker {i + 1}/{self.size} died during its {what} (exit code {code})")
            if time.monotonic() > deadline:
                self.close()
                raise WorkerError(f"timing worker {i + 1}/{self.size}: no answer to its {what} in {timeout:.0f} s")
        try:
            return conn.recv()
        except EOFError:
            self.close()
            raise WorkerError(f"timing worker {i + 1}/{self.size} died during its {what}") from None

    def time(self, i: int, case: Any, settings: TimingSettings) -> dict[str, Any]:
        """Worker ``i`` times ``case`` with ``settings`` (a fixed number of rounds); its raw results."""
        self.wait_ready()
        fields = {"task": case.task, "method": case.method, "preset": case.preset, "options": dict(case.options),
                  "variant": case.variant}
        plain = {k: getattr(settings, k) for k in ("min_rounds", "max_rounds", "warmup_rounds", "budget_s",
                                                    "target_rel_half_width", "rounds", "min_time_s")}
        self._conns[i].send(("time", fields, plain))
        kind, payload = self._receive(i, PASS_TIMEOUT_S, f"rounds of {case.id}")
        if kind == "skip":
            from .harness import CaseSkipped

            raise CaseSkipped(payload)
        if kind != "ok":
            raise WorkerError(f"timing worker {i + 1}/{self.size}: {payload['type']}: {payload['message']}")
        return payload

    def close(self) -> None:
        """Ask the workers to exit; terminate any that has not within 2 seconds (an exiting worker has nothing
        left to lose, and the next task should not wait on its interpreter's teardown)."""
        for conn in self._conns:
            try:
                conn.send(("close",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 2.0
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        self.started = False
        self.setup_s, self.pids = [], []

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --- spreading a case's rounds over the workers ------------------------------------------------------------------


def fixed_shares(rounds: int, processes: int) -> list[int]:
    """``rounds`` shared out over ``processes`` (the remainder to the first ones; workers with none left out)."""
    base, extra = divmod(rounds, processes)
    return [n for n in (base + (1 if i < extra else 0) for i in range(processes)) if n > 0]


def next_pass(settings: TimingSettings, processes: int, rounds: int, method_time_s: float, elapsed_s: float) -> int:
    """Rounds per worker in the next pass, after ``rounds`` rounds (summed over the workers) with ``method_time_s``
    seconds of method calls in ``elapsed_s`` seconds (see the module docstring)."""
    per_round = method_time_s / rounds if rounds else 0.0
    if method_time_s < settings.min_time_s and per_round > 0:
        return max(1, math.ceil((settings.min_time_s - method_time_s) / per_round / processes))
    want = max(1, math.ceil(rounds / processes / 2))
    left = settings.max_rounds - rounds
    if left > 0:
        want = min(want, math.ceil(left / processes))
    if elapsed_s > 0 and rounds:
        fit = (settings.budget_s - elapsed_s) / (elapsed_s / rounds)
        want = min(want, max(1, math.ceil(fit / processes)))
    return max(1, want)


def time_replicated(
    pool: WorkerPool,
    case: Any,
    settings: TimingSettings,
    threads: int,
    check_cpu: bool,
    paired: bool,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[Timings, dict[str, Any] | None]:
    """Time ``case`` in the pool's workers, pass after pass, until the stopping rule (on the pooled rounds, with
    the process-aware interval and the timing floor) says stop; the pooled :class:`Timings` (``process_rounds``
    set) and the latest token counts."""
    n = pool.size
    method: list[list[float]] = [[] for _ in range(n)]
    base: list[list[float]] = [[] for _ in range(n)]
    raw: list[dict[str, Any]] = []
    tokens: dict[str, Any] | None = None
    start = clock()
    stop: str | None = None
    shares = (fixed_shares(settings.rounds, n) if settings.rounds is not None
              else [max(2, math.ceil(settings.min_rounds / n))] * n)
    while stop is None:
        for i, k in enumerate(shares):
            out = pool.time(i, case, TimingSettings(
                min_rounds=1, max_rounds=max(1, k), warmup_rounds=settings.warmup_rounds, budget_s=settings.budget_s,
                target_rel_half_width=settings.target_rel_half_width, rounds=k))
            method[i].extend(out["method_times"])
            base[i].extend(out["baseline_times"])
            raw.append(out)
            tokens = out["tokens"] if out["tokens"] is not None else tokens
        if settings.rounds is not None:
            stop = FIXED
            break
        groups = ([stats.paired_ratios(b, m) for b, m in zip(base, method, strict=True)] if paired
                  else [list(m) for m in method])
        pooled = [v for g in groups for v in g]
        method_time = sum(sum(m) for m in method)
        elapsed = clock() - start
        stop = stats.stop_reason(pooled, elapsed, settings.rule, method_time_s=method_time,
                                 per_process=[g for g in groups if g])
        if stop is None:
            k = next_pass(settings, n, len(pooled), method_time, elapsed)
            shares = [k] * n
    elapsed = clock() - start
    used = [i for i in range(n) if method[i]]
    timings = Timings(
        method_times=[t for i in used for t in method[i]],
        baseline_times=[t for i in used for t in base[i]],
        warmup_rounds=settings.warmup_rounds,
        stop=stop,
        elapsed_s=elapsed,
        monitor=_pooled_monitor(raw, threads, check_cpu),
        process_rounds=[len(method[i]) for i in used] if len(used) > 1 else [],
    )
    compiled = pooled_compile([out.get("compile") for out in raw])
    if compiled is not None:
        timings.extra["compile"] = compiled
    return timings, tokens


def pooled_compile(passes: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One ``compile`` record of every pass's (each worker compiles for itself, in every pass): the first pass's
    (the coldest inductor cache) with ``process_compile_s``, every pass's compile time in order; the counts are
    the largest of any pass (``timed_compilations`` summed; ``steady`` only if every pass was)."""
    done = [p for p in passes if p]
    if not done:
        return None
    out = dict(done[0])
    out["process_compile_s"] = [float(p["compile_s"]) for p in done]
    for key in ("compilations", "recompiles", "graphs", "graph_breaks", "compile_rounds"):
        out[key] = max(int(p.get(key, 0)) for p in done)
    out["timed_compilations"] = sum(int(p.get("timed_compilations", 0)) for p in done)
    out["steady"] = all(bool(p.get("steady", True)) for p in done)
    return out


def _pooled_monitor(raw: list[dict[str, Any]], threads: int, check_cpu: bool) -> Monitor:
    """One :class:`Monitor` of every pass: load samples of all, CPU and wall seconds summed, the other processes'
    CPU pooled over the passes' windows (None if any pass could not measure it)."""
    monitor = Monitor(threads=threads, check_cpu=check_cpu)
    others: list[OthersCpu | None] = []
    for out in raw:
        monitor.load_samples.extend(out["load_samples"])
        monitor.cpu_seconds += out["cpu_seconds"]
        monitor.wall_seconds += out["wall_seconds"]
        others.append(OthersCpu.from_json(out["others_cpu"]) if out.get("others_cpu") is not None else None)
    if others and all(o is not None for o in others):
        monitor.others = sum(others[1:], others[0])  # type: ignore[arg-type]
    before = next((o["loadavg_before"] for o in raw if o["loadavg_before"] is not None), None)
    after = next((o["loadavg_after"] for o in reversed(raw) if o["loadavg_after"] is not None), None)
    monitor.loadavg_before = tuple(before) if before is not None else None
    monitor.loadavg_after = tuple(after) if after is not None else None
    return monitor
