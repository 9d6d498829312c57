"""Benchmark results files: pytest-benchmark's JSON layout, with tokred's measurements in ``extra_info``.

``tokred run`` and ``pytest benchmarks/ --benchmark-json=...`` write the same layout, so the leaderboard and
``pytest-benchmark compare`` read both::

    {"machine_info": {...}, "commit_info": {...}, "datetime": "...", "version": "<pytest-benchmark version>",
     "benchmarks": [{"group", "name", "fullname", "params", "param", "options",
                     "stats": {"min", "max", "mean", "stddev", "rounds", "median", "iqr", "q1", "q3", ...,
                               "ops", "total", "data", "iterations"},
                     "extra_info": {"tokred": 1, "task", "method", "preset", "options", "speedup", ...}}]}

The ``extra_info`` keys written by :mod:`tokred.bench.harness` (schema version :data:`SCHEMA_VERSION`):

=====================  ===============================================================================
``task``, ``family``   the task's registry name and model family
``method``, ``preset``  method name and preset name (``"baseline"`` for the unreduced model)
``options``            the method options applied (JSON; tuples become lists); ``options_repr`` in Python
``model``, ``size``    model name and ``"embedded"`` / ``"full"``
``device``, ``device_name``, ``dtype``, ``num_threads``   where it ran
``versions``           python, torch, diffusers, timm, tokred, pytest-benchmark
``quality``            the task's ``evaluate()`` (``metrics`` gives each metric's direction)
``speed``              the task's ``measure_speed()`` (GFLOPs, memory, its own latency)
``latency_ms``         median time of one workload call in this benchmark's timed rounds
``throughput_per_s``, ``s_per_image``   items per second and seconds per item, from that median
``speedup``            baseline median / this median, from rounds interleaved with the baseline
``gflops``, ``peak_mem_mb``   per item, and the peak memory of one call (from ``speed``)
``metrics``            ``[{"name", "better", "unit", "kind"}]``, the task's metrics
``command``            a ``tokred run`` command that reproduces the run
=====================  ===============================================================================

Files are written atomically (a temporary file in the same folder, then ``os.replace``), so a reader never sees
half a file and an interrupted run leaves the last complete version.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

SCHEMA_VERSION = 1

STATS_FIELDS = (
    "min", "max", "mean", "stddev", "rounds", "median", "iqr", "q1", "q3",
    "iqr_outliers", "stddev_outliers", "outliers", "ld15iqr", "hd15iqr", "ops", "total",
)  # fmt: skip


class ResultsError(ValueError):
    """A results file that cannot be read: the message names the file and the offending field."""


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
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one, never a partial one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; results are ordinary files
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- reading and validation ------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, message: str) -> None:
        raise ResultsError(f"{self.source}: field {field!r}: {message}")

    def get(self, obj: dict[str, Any], key: str, where: str, kind: str, required: bool = True) -> Any:
        field = f"{where}.{key}" if where else key
        if key not in obj:
            if required:
                self.fail(field, "missing")
            return None
        value = obj[key]
        ok = {
            "dict": isinstance(value, dict),
            "list": isinstance(value, list),
            "str": isinstance(value, str),
            "number": _is_number(value),
            "number|null": value is None or _is_number(value),
        }[kind]
        if not ok:
            expected = {"dict": "an object", "list": "a list", "str": "a string"}.get(kind, "a number")
            self.fail(field, f"expected {expected}, got {_type_name(value)} {json.dumps(value)[:40]}")
        return value


def validate(data: Any, source: str = "<results>") -> dict[str, Any]:
    """Check ``data`` against the layout above; raise :class:`ResultsError` naming ``source`` and the field.

    Every benchmark needs ``name``, ``fullname`` and numeric ``stats`` (``median``, ``min``, ``mean``, ``rounds``);
    a tokred benchmark (``extra_info.tokred`` present) also needs the fields the leaderboard reads.
    """
    c = _Checker(source)
    if not isinstance(data, dict):
        raise ResultsError(f"{source}: expected a JSON object with a 'benchmarks' list, got {_type_name(data)}")
    benchmarks = c.get(data, "benchmarks", "", "list")
    c.get(data, "machine_info", "", "dict", required=False)
    c.get(data, "datetime", "", "str", required=False)
    for i, bench in enumerate(benchmarks):
        where = f"benchmarks[{i}]"
        if not isinstance(bench, dict):
            c.fail(where, f"expected an object, got {_type_name(bench)}")
        c.get(bench, "name", where, "str")
        c.get(bench, "fullname", where, "str", required=False)
        stats = c.get(bench, "stats", where, "dict")
        for key in ("median", "min", "mean", "rounds"):
            c.get(stats, key, f"{where}.stats", "number")
        extra = c.get(bench, "extra_info", where, "dict", required=False)
        if extra and "tokred" in extra:
            validate_extra_info(extra, f"{where}.extra_info", c)
    return data


def validate_extra_info(extra: dict[str, Any], where: str, checker: _Checker) -> None:
    c = checker
    version = c.get(extra, "tokred", where, "number")
    if version > SCHEMA_VERSION:
        c.fail(f"{where}.tokred", f"schema version {version} is newer than this tokred's {SCHEMA_VERSION}")
    for key in ("task", "method", "preset", "device", "dtype", "size"):
        c.get(extra, key, where, "str")
    c.get(extra, "options", where, "dict")
    c.get(extra, "speedup", where, "number")
    c.get(extra, "latency_ms", where, "number")
    for key in ("throughput_per_s", "s_per_image", "gflops", "peak_mem_mb"):
        c.get(extra, key, where, "number|null", required=False)
    quality = c.get(extra, "quality", where, "dict")
    for name, value in quality.items():
        if not _is_number(value):
            c.fail(f"{where}.quality.{name}", f"expected a number, got {_type_name(value)} {json.dumps(value)[:40]}")
    metrics = c.get(extra, "metrics", where, "list")
    for j, metric in enumerate(metrics):
        mwhere = f"{where}.metrics[{j}]"
        if not isinstance(metric, dict):
            c.fail(mwhere, f"expected an object, got {_type_name(metric)}")
        c.get(metric, "name", mwhere, "str")
        better = c.get(metric, "better", mwhere, "str")
        if better not in ("higher", "lower"):
            c.fail(f"{mwhere}.better", f"expected 'higher' or 'lower', got {better!r}")
    c.get(extra, "versions", where, "dict", required=False)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a results file; errors name the file and the field (:class:`ResultsError`)."""
    source = os.fspath(path)
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
    return validate(data, source)


def tokred_benchmarks(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmarks of a results document that tokred's harness wrote (``extra_info.tokred`` present)."""
    benchmarks = data.get("benchmarks", [])
    return [b for b in benchmarks if isinstance(b.get("extra_info"), dict) and "tokred" in b["extra_info"]]
