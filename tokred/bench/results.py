"""Benchmark results files: pytest-benchmark's JSON layout, with tokred's measurements in ``extra_info``.

``tokred run`` and ``pytest benchmarks/ --benchmark-json=...`` write the same layout, so the leaderboard and
``pytest-benchmark compare`` read both::

    {"machine_info": {...}, "commit_info": {...}, "datetime": "...", "version": "<pytest-benchmark version>",
     "benchmarks": [{"group", "name", "fullname", "params", "param", "options",
                     "stats": {"min", "max", "mean", "stddev", "rounds", "median", "iqr", "q1", "q3", ...,
                               "ops", "total", "data", "iterations"},
                     "extra_info": {"tokred": 4, "task", "method", "preset", "options", "speedup", ...}}]}

The ``extra_info`` of a tokred benchmark is a :class:`tokred.bench.record.CaseRecord`, the one definition of a
case's fields: each field is one key (same name), with its type, range, whether a file must have it, the schema
version that introduced it and what it means (:attr:`dataclasses.Field.metadata`). The schema version is
:data:`SCHEMA_VERSION` (``extra_info["tokred"]``); files of older schemas still load
(:func:`tokred.bench.record.migrate`): schema-1 rows have no intervals.

:func:`validate` checks the types and ranges of every field of the record (unknown keys are left alone): errors
name the file and the field; :func:`tokred_records` gives the records of a document. Files are written
atomically (:func:`tokred.bench.files.atomic_write`), so a reader never sees half a file and an interrupted run
leaves the last complete version.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from .files import atomic_write
from .record import (
    QUALITY_RANGES,
    SCHEMA_VERSION,
    CaseRecord,
    Checker,
    ResultsError,
    _type_name,
    check_extra_info,
    migrate,
)

__all__ = [
    "QUALITY_RANGES", "SCHEMA_VERSION", "STATS_FIELDS", "CaseRecord", "ResultsError", "load_results", "new_results",
    "stats_dict", "to_jsonable", "tokred_benchmarks", "tokred_records", "validate", "validate_extra_info",
    "write_results",
]  # fmt: skip

STATS_FIELDS = (
    "min", "max", "mean", "stddev", "rounds", "median", "iqr", "q1", "q3",
    "iqr_outliers", "stddev_outliers", "outliers", "ld15iqr", "hd15iqr", "ops", "total",
)  # fmt: skip


# --- writing -------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """pytest-benchmark's machine description (the same function its plugin uses)."""
    from pytest_benchmark.plugin import pytest_benchmark_generate_machine_info

    return pytest_benchmark_generate_machine_info()


def commit_info() -> dict[str, Any]:
    """pytest-benchmark's description of the git commit of the working directory."""
    from pytest_benchmark.utils import get_commit_info

    try:
        return get_commit_info()
    except Exception as err:  # not a git checkout, git missing...  # pragma: no cover
        return {"error": f"{type(err).__name__}: {err}"}


def pytest_benchmark_version() -> str:
    from pytest_benchmark import __version__

    return __version__


def new_results(machine: dict[str, Any] | None = None, commit: dict[str, Any] | None = None) -> dict[str, Any]:
    """An empty results document in pytest-benchmark's layout."""
    return {
        "machine_info": machine if machine is not None else machine_info(),
        "commit_info": commit if commit is not None else commit_info(),
        "benchmarks": [],
        "datetime": datetime.now(UTC).isoformat(),
        "version": pytest_benchmark_version(),
    }


def stats_dict(times: Iterable[float]) -> dict[str, Any]:
    """pytest-benchmark's ``stats`` block for per-round durations in seconds (``iterations`` = 1)."""
    from pytest_benchmark.stats import Stats

    stats = Stats()
    for t in times:
        stats.update(float(t))
    if not stats:
        raise ValueError("no timings")
    out = stats.as_dict()
    out["data"] = list(stats.data)
    out["iterations"] = 1
    return out


def to_jsonable(value: Any) -> Any:
    """Options and metrics as JSON: tuples become lists, numpy/torch scalars numbers, anything else its str."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return to_jsonable(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def write_results(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one, never a partial one.
    Temporary files that killed writers of ``path`` left are removed first (:mod:`tokred.bench.files`)."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    atomic_write(path, text, purpose="results file")


# --- reading and validation ------------------------------------------------------------------------------------

_Checker = Checker  # its name before tokred.bench.record


def validate(data: Any, source: str = "<results>") -> dict[str, Any]:
    """Check ``data`` against the layout above; raise :class:`ResultsError` naming ``source`` and the field.

    Every benchmark needs ``name`` and numeric ``stats`` (``median``, ``min``, ``mean``, ``rounds``); a tokred
    benchmark (``extra_info.tokred`` present) also needs the fields the leaderboard reads, and every known key it
    has must have the right type and range (speedups and their intervals > 0, FLOPs and memory >= 0,
    accuracies in [0, 100], SSIM in [-1, 1], FID >= 0 ...).
    """
    c = Checker(source)
    if not isinstance(data, dict):
        raise ResultsError(f"{source}: expected a JSON object with a 'benchmarks' list, got {_type_name(data)}")
    benchmarks = c.get(data, "benchmarks", "", "list")
    c.get(data, "machine_info", "", "dict", required=False)
    c.get(data, "commit_info", "", "dict", required=False)
    c.get(data, "datetime", "", "str", required=False)
    for i, bench in enumerate(benchmarks):
        where = f"benchmarks[{i}]"
        if not isinstance(bench, dict):
            c.fail(where, f"expected an object, got {_type_name(bench)}")
        c.get(bench, "name", where, "str")
        c.get(bench, "fullname", where, "str", required=False)
        stats = c.get(bench, "stats", where, "dict")
        for key in ("median", "min", "mean"):
            c.number(stats, key, f"{where}.stats", required=True, low=0.0)
        c.number(stats, "rounds", f"{where}.stats", required=True, low=0.0)
        extra = c.get(bench, "extra_info", where, "dict", required=False)
        if extra and "tokred" in extra:
            check_extra_info(extra, f"{where}.extra_info", c)
    return data


def validate_extra_info(extra: dict[str, Any], where: str = "extra_info", checker: Checker | None = None,
                        source: str = "<results>") -> CaseRecord:
    """Check one benchmark's ``extra_info`` against :class:`CaseRecord`'s rules; its record, migrated."""
    return CaseRecord.from_extra_info(extra, where, checker.source if checker is not None else source)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a results file; errors name the file and the field (:class:`ResultsError`)."""
    source = os.fspath(path)
    if os.path.isdir(source):
        raise ResultsError(f"{source}: is a folder, not a results file")
    try:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ResultsError(f"{source}: no such results file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsError(f"{source}: cannot read: {err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ResultsError(f"{source}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg})") from None
    except RecursionError:
        raise ResultsError(f"{source}: not a results file (nested too deeply)") from None
    return validate(data, source)


def tokred_benchmarks(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmarks of a results document that tokred's harness wrote (``extra_info.tokred`` present)."""
    benchmarks = data.get("benchmarks", [])
    return [b for b in benchmarks if isinstance(b.get("extra_info"), dict) and "tokred" in b["extra_info"]]


def tokred_records(data: dict[str, Any], source: str = "<results>", checked: bool = False) -> list[CaseRecord]:
    """The records of the tokred benchmarks of a results document (checked: errors name ``source``).
    ``checked``: ``data`` comes from :func:`load_results`, which checked every record already (not again)."""
    benchmarks = data.get("benchmarks", [])
    if checked:
        return [CaseRecord.from_values(migrate(b["extra_info"])) for b in tokred_benchmarks(data)]
    return [
        CaseRecord.from_extra_info(b["extra_info"], f"benchmarks[{i}].extra_info", source)
        for i, b in enumerate(benchmarks) if isinstance(b.get("extra_info"), dict) and "tokred" in b["extra_info"]
    ]  # fmt: skip
