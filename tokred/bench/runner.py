"""The run loop of ``tokred run`` / ``tokred bench``: cases run one after another on a set-up task, results
written after every finished case.

The measurement itself (set-up, timing, quality) is :mod:`tokred.bench.harness`; this module decides what to run
and where its results go.

Results files lose nothing (:class:`ResultsOutput`):

* An existing ``--out`` file is never overwritten by surprise. Without ``--resume`` or ``--force`` the run stops
  before anything is set up (exit 2). ``--resume`` keeps every benchmark in the file and runs only the cases not
  in it; ``--force`` replaces the file once the first benchmark finishes, keeping the old one as ``FILE.bak``.
* A run holds its results file locked (:class:`tokred.bench.files.OutputLock`) from before the set-up to the end;
  a second run on the same file stops at once (exit 2), naming the file and the process that holds it.
* ``--resume`` matches finished benchmarks on the whole case identity (:func:`case_key`: task, size, device,
  dtype, method, preset, options and task settings), stored in each benchmark's ``extra_info["case_key"]``. A
  benchmark with another identity (other ``--set`` values, other options) is kept and the case runs again, so the
  file then holds both (the leaderboard puts different settings in different sections). Benchmarks written
  before tokred stored the identity never match: they are kept and their cases rerun, with a notice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import results as results_mod
from .files import OutputError, OutputLock, atomic_write, check_writable_file
from .harness import TEST_NAME, Case, CaseSkipped, TaskRun

# Task arguments that change how a run reports, not what it measures: left out of the case identity.
NOT_SETTINGS = frozenset({"progress"})


@dataclass
class RunReport:
    path: str
    results: dict[str, Any]
    finished: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False


# --- case identity ---------------------------------------------------------------------------------------------


def case_key(run: TaskRun, case: Case) -> dict[str, Any]:
    """What must be equal for a finished benchmark to stand for ``case`` in ``run`` (JSON types only).

    Device and dtype are the task's resolved ones (``--dtype`` left out means the task's default), the settings
    are every task argument of the run: the user's ``--set`` values and the profile's (``TaskRun.task_kwargs``).
    """
    task = run.task or getattr(run, "_built", None) or run.build()
    settings = {k: v for k, v in sorted(run.task_kwargs.items()) if k not in NOT_SETTINGS}
    return results_mod.to_jsonable(
        {
            "task": run.task_name,
            "size": run.size,
            "device": str(task.device),
            "dtype": str(task.dtype),
            "method": case.method,
            "preset": case.preset,
            "options": dict(case.options),
            "settings": settings,
            # a compiled run's results never stand for an eager run's, nor the other way round
            **({"compile": run.compile.as_dict()} if getattr(run, "compile", None) is not None else {}),
        }
    )


def _canonical(key: Any) -> str:
    return json.dumps(key, sort_keys=True)


def _flat(key: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in key.items():
        if isinstance(v, dict):
            out.update({f"{k}.{sub}": sv for sub, sv in v.items()})
        else:
            out[k] = v
    return out


def key_difference(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str:
    """``settings.num_inference_steps 20 -> 3, options.r 8 -> 13`` (the first ``limit`` differences)."""
    a, b = _flat(old), _flat(new)
    missing = object()

    def show(flat: dict[str, Any], k: str) -> str:
        return json.dumps(flat[k]) if k in flat else "(unset)"

    diffs = [f"{k} {show(a, k)} -> {show(b, k)}" for k in sorted(set(a) | set(b))
             if a.get(k, missing) != b.get(k, missing)]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more


# --- the results file ------------------------------------------------------------------------------------------


def _backup_path(path: str) -> str:
    return path + ".bak"


class ResultsOutput:
    """One run's results file: locked while open; what it already holds is kept (``resume``), replaced once the
    first new benchmark is written (``force``, the old file kept as ``.bak``), or protected (neither: opening
    raises :class:`OutputError`). :meth:`open` checks everything before the run sets anything up."""

    def __init__(self, path: str | os.PathLike, resume: bool = False, force: bool = False,
                 purpose: str = "--out", task: str | None = None) -> None:
        """``task``: the task whose results go in the file; ``resume`` refuses a file holding another task's
        results (a results file is one task's). A symbolic link is locked and written as its target (written
        through: the link stays)."""
        if resume and force:
            raise OutputError("--resume and --force exclude each other: --resume keeps the file's benchmarks, "
                              "--force replaces the file")
        self.path = os.fspath(path)
        self.resume, self.force, self.purpose, self.task = resume, force, purpose, task
        self.kept: list[dict[str, Any]] = []
        self._lock = OutputLock(self.path, purpose)
        self._replace_pending = False
        self.notices: list[str] = []

    def open(self) -> ResultsOutput:
        check_writable_file(self.path, self.purpose)
        self._lock.acquire()
        try:
            self._inspect()
        except BaseException:
            self._lock.release()
            raise
        removed = self._lock.stale_removed
        if removed:
            names = ", ".join(os.path.basename(p) for p in removed)
            self.notices.append(f"removed {len(removed)} temporary file(s) left by an interrupted write: {names}")
        return self

    def _inspect(self) -> None:
        if not os.path.exists(self.path):
            return
        if self.force:
            self._replace_pending = True
            return
        backup = _backup_path(self.path)
        try:
            previous = results_mod.load_results(self.path)
        except results_mod.ResultsError as err:
            reason = str(err).removeprefix(f"{self.path}: ")
            if self.resume:
                raise OutputError(
                    f"--resume: {self.path} is not a results file ({reason}); --force replaces it (the old file "
                    f"is kept as {backup}), or choose another --out"
                ) from None
            raise OutputError(
                f"{self.purpose} {self.path} already exists and is not a results file ({reason}); --force "
                f"replaces it (the old file is kept as {backup}), or choose another --out (--resume needs a "
                "results file)"
            ) from None
        if not self.resume:
            count = len(previous["benchmarks"])
            raise OutputError(
                f"{self.purpose} {self.path} already holds {count} benchmark{'s' if count != 1 else ''}; "
                f"--resume keeps them and runs only the missing cases, --force replaces the file (the old one is "
                f"kept as {backup})"
            )
        if self.task is not None:
            others = sorted({str(b["extra_info"].get("task")) for b in results_mod.tokred_benchmarks(previous)}
                            - {self.task})
            if others:
                raise OutputError(
                    f"--resume: {self.path} holds results of task {', '.join(others)}, not {self.task}; one results "
                    f"file holds one task: choose another --out (or --force replaces the file, the old one kept "
                    f"as {backup})"
                )
        self.kept = list(previous["benchmarks"])

    def write(self, doc: dict[str, Any]) -> None:
        """Write ``doc`` atomically; with ``force``, the replaced file goes to ``.bak`` first."""
        try:
            if self._replace_pending:
                with open(self.path, "rb") as fh:
                    atomic_write(_backup_path(self.path), fh.read(), purpose="backup")
                self._replace_pending = False
            results_mod.write_results(self.path, doc)
            self.kept = list(doc["benchmarks"])  # a later run of the same sweep adds to what is written
        except OSError as err:
            raise OutputError(f"{self.purpose} {self.path}: cannot write results: {err}") from None

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> ResultsOutput:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --- the loop --------------------------------------------------------------------------------------------------


def run_task(
    run: TaskRun,
    cases: Sequence[Case],
    out: str | os.PathLike | ResultsOutput,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> RunReport:
    """Run ``cases`` on ``run`` and write results to ``out`` after every finished case (atomically).

    ``out``: a path (opened here as a :class:`ResultsOutput` with ``resume`` / ``force``) or an open
    :class:`ResultsOutput` (the CLI opens every output before it runs anything). ``KeyboardInterrupt`` stops the
    run after removing the current patch; the file keeps every finished benchmark and the report says it was
    interrupted. Other errors in a case are reported and the run goes on.
    """
    if isinstance(out, ResultsOutput):
        return _run(run, cases, out, log)
    with ResultsOutput(out, resume=resume, force=force, task=run.task_name) as output:
        return _run(run, cases, output, log)


def _run(run: TaskRun, cases: Sequence[Case], output: ResultsOutput, log: Callable[[str], None]) -> RunReport:
    out = output.path
    for notice in output.notices:
        log(f"{run.task_name}: {notice}")
    doc = results_mod.new_results()
    doc["benchmarks"] = list(output.kept)
    report = RunReport(out, doc)
    todo = _todo(run, cases, output.kept, out, log)
    if not todo:
        return report
    try:
        log(f"{run.task_name}: setting up ({run.size}, {run.device}), reference and baseline ...")
        run.setup()
        log(f"{run.task_name}: ready in {run.setup_s:.0f} s; {len(todo)} benchmarks x {run.rounds} rounds")
        for i, (case, key) in enumerate(todo, 1):
            label = f"[{i}/{len(todo)}] {case.id}"
            start = time.perf_counter()
            try:
                result = run.run_case(case)
            except CaseSkipped as err:
                report.skipped.append((case.id, str(err)))
                log(f"{label}: skipped: {err}")
                continue
            except Exception as err:  # one broken method must not lose the others' results
                report.failed.append((case.id, f"{type(err).__name__}: {err}"))
                log(f"{label}: FAILED: {type(err).__name__}: {err}")
                continue
            result.extra_info["case_key"] = key
            doc["benchmarks"].append(result.benchmark_entry())
            output.write(doc)
            report.finished.append(case.id)
            log(f"{label}: {summary_line(result.extra_info)} ({time.perf_counter() - start:.0f} s)")
    except KeyboardInterrupt:
        report.interrupted = True
    return report


def _todo(
    run: TaskRun, cases: Sequence[Case], kept: list[dict[str, Any]], out: str, log: Callable[[str], None]
) -> list[tuple[Case, dict[str, Any]]]:
    """The cases whose identity no kept benchmark has, each with its identity; notices for near misses."""
    done: set[str] = set()
    by_name: dict[str, list[dict[str, Any] | None]] = {}
    for bench in results_mod.tokred_benchmarks({"benchmarks": kept}):
        key = bench["extra_info"].get("case_key")
        by_name.setdefault(bench["name"], []).append(key)
        if key is not None:
            done.add(_canonical(key))
    todo, unkeyed, changed = [], 0, []
    for case in cases:
        key = case_key(run, case)
        if _canonical(key) in done:
            continue
        todo.append((case, key))
        previous = by_name.get(f"{TEST_NAME}[{case.id}]", [])
        if any(k is None for k in previous):
            unkeyed += 1
        elif previous:
            changed.append(key_difference(previous[-1], key))
    name = run.task_name
    if len(todo) < len(cases):
        log(f"{name}: {len(cases) - len(todo)} benchmarks already in {out} with the same settings, kept")
    if unkeyed:
        log(f"{name}: {unkeyed} benchmarks in {out} have no case identity (written by an older tokred): kept, "
            "and their cases run again")
    if changed:
        log(f"{name}: {len(changed)} benchmarks in {out} were run with other settings ({changed[0]}): kept, and "
            "their cases run again with these settings")
    return todo


def summary_line(info: results_mod.CaseRecord | dict[str, Any]) -> str:
    """``speedup 1.31x [1.25, 1.37], 812.4 img/s, top1 97.2`` for progress output (of a case's record, or of
    its ``extra_info``)."""
    record = info if isinstance(info, results_mod.CaseRecord) else results_mod.CaseRecord.from_values(info)
    speedup = f"speedup {record.speedup:.2f}x"
    ci = record.speedup_ci
    if ci and not record.is_baseline:
        speedup += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    if (record.processes or 1) > 1:
        speedup += f" ({record.processes} processes)"
    parts = [speedup] + ([] if record.throughput_per_s is None else [f"{record.throughput_per_s:.4g} img/s"])
    for metric in record.metrics:
        if metric.get("kind") == "quality" and metric["name"] in record.quality:
            parts.append(f"{metric['name']} {record.quality[metric['name']]:.4g}")
            break
    if record.contended:
        parts.append("CONTENDED: " + "; ".join(record.contention or ["machine busy"]))
    return ", ".join(parts)
