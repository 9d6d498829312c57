"""The run loop of ``tokred run`` / ``tokred bench``: cases run one after another on a set-up task, results
written after every finished case.

The measurement itself (set-up, timing, quality) is :mod:`tokred.bench.harness`; this module decides what to run
and where its results go.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import results as results_mod
from .harness import TEST_NAME, Case, CaseSkipped, TaskRun


@dataclass
class RunReport:
    path: str
    results: dict[str, Any]
    finished: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False


def run_task(
    run: TaskRun,
    cases: Sequence[Case],
    out: str | os.PathLike,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> RunReport:
    """Run ``cases`` on ``run`` and write results to ``out`` after every finished case (atomically).

    ``KeyboardInterrupt`` stops the run after removing the current patch; the file keeps every finished
    benchmark and the report says it was interrupted. Other errors in a case are reported and the run goes on.
    With ``resume``, cases already in ``out`` (same benchmark name) are kept and not run again.
    """
    out = os.fspath(out)
    doc = results_mod.new_results()
    if resume and os.path.exists(out):
        previous = results_mod.load_results(out)
        doc["benchmarks"] = list(previous["benchmarks"])
    done = {b["name"] for b in doc["benchmarks"]}
    report = RunReport(out, doc)
    todo = [c for c in cases if f"{TEST_NAME}[{c.id}]" not in done]
    if len(todo) < len(cases):
        log(f"{run.task_name}: {len(cases) - len(todo)} benchmarks already in {out}, kept")
    if not todo:
        return report
    try:
        log(f"{run.task_name}: setting up ({run.size}, {run.device}), reference and baseline ...")
        run.setup()
        log(f"{run.task_name}: ready in {run.setup_s:.0f} s; {len(todo)} benchmarks x {run.rounds} rounds")
        for i, case in enumerate(todo, 1):
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
            doc["benchmarks"].append(result.benchmark_entry())
            results_mod.write_results(out, doc)
            report.finished.append(case.id)
            log(f"{label}: {summary_line(result.extra_info)} ({time.perf_counter() - start:.0f} s)")
    except KeyboardInterrupt:
        report.interrupted = True
    return report


def summary_line(info: dict[str, Any]) -> str:
    """``speedup 1.31x, 812.4 img/s, top1 97.2`` for progress output."""
    parts = [f"speedup {info['speedup']:.2f}x", f"{info['throughput_per_s']:.4g} img/s"]
    for metric in info.get("metrics", []):
        if metric.get("kind") == "quality" and metric["name"] in info.get("quality", {}):
            parts.append(f"{metric['name']} {info['quality'][metric['name']]:.4g}")
            break
    return ", ".join(parts)
