"""Benchmark results files: pytest-benchmark's JSON layout, with tokred's measurements in ``extra_info``.

``tokred run`` and ``pytest benchmarks/ --benchmark-json=...`` write the same layout, so the leaderboard and
``pytest-benchmark compare`` read both::

    {"machine_info": {...}, "commit_info": {...}, "datetime": "...", "version": "<pytest-benchmark version>",
     "benchmarks": [{"group", "name", "fullname", "params", "param", "options",
                     "stats": {"min", "max", "mean", "stddev", "rounds", "median", "iqr", "q1", "q3", ...,
                               "ops", "total", "data", "iterations"},
                     "extra_info": {"tokred": 2, "task", "method", "preset", "options", "speedup", ...}}]}

The ``extra_info`` keys written by :mod:`tokred.bench.harness` (schema version :data:`SCHEMA_VERSION`; the keys
marked 2 are new in schema 2 and absent from schema-1 files, which still load: their rows have no intervals):

========================================  ===============================================================
``task``, ``family``                      the task's registry name and model family
``method``, ``preset``                    method and preset name (``"baseline"`` for the unreduced model)
``options``, ``options_repr``             the method options applied (JSON: tuples become lists; Python)
``model``, ``size``                       model name and ``"embedded"`` / ``"arch"`` / ``"full"``
``device``, ``device_name``, ``dtype``    where it ran
``num_threads``, ``threads`` (2)          torch threads during timing; ``cpu_count`` (2) cores available
``versions``, ``command``                 package versions; a ``tokred run`` command that reproduces the run
``task_info``                             the task's settings (``Task.describe()``)
``metrics``                               ``[{"name", "better", "unit", "kind"}]``, the task's metrics
``quality``                               the task's ``evaluate()``: point estimates
``quality_ci``, ``quality_n`` (2)         95% interval and number of images behind each quality metric
``speed``                                 the task's ``measure_speed()`` (GFLOPs, memory, its own latency)
``latency_ms``, ``baseline_latency_ms``   median time of one workload call (this case; the paired baseline)
``throughput_per_s``, ``s_per_image``     items per second and seconds per item, from that median
``speedup``                               median over the timed rounds of baseline time / method time
``speedup_ci`` (2)                        its 95% bootstrap interval ``[low, high]``
``rounds``, ``warmup_rounds`` (2)         timed rounds, and rounds run and dropped first
``round_ratios`` (2)                      the per-round ratios behind ``speedup``
``loadavg_before``, ``loadavg_after`` (2)  ``os.getloadavg()`` around the timed rounds
``cpu_utilisation`` (2)                   process CPU seconds per wall second per thread (1.0: all threads)
``contended``, ``contention`` (2)         whether the machine was busy during the case, and why
``gflops``, ``peak_mem_mb``               GFLOPs per item and the peak memory of one call
``baseline_gflops``, ``flops_ideal_speedup``, ``efficiency`` (2)   the baseline's GFLOPs, their ratio to this
                                          case's, and measured speedup / that ratio
``tokens`` (2)                            per block: mean tokens entering it and through attention / MLP
``notes`` (2)                             caveats the leaderboard prints under the section
``case_key``                              the case's identity (written by the runner; ``--resume`` matches it)
========================================  ===============================================================

:func:`validate` checks types and ranges of every key it knows (unknown keys are left alone): errors name the
file and the field. Files are written atomically (:func:`tokred.bench.files.atomic_write`), so a reader never
sees half a file and an interrupted run leaves the last complete version.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from .files import atomic_write

SCHEMA_VERSION = 2

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
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one, never a partial one.
    Temporary files that killed writers of ``path`` left are removed first (:mod:`tokred.bench.files`)."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    atomic_write(path, text, purpose="results file")


# --- reading and validation ------------------------------------------------------------------------------------

# Valid ranges of quality metrics, by name: (low, high), None for unbounded. Metrics with the unit "%" are in
# [0, 100] whatever their name. KID is an unbiased estimate of a squared distance: it falls below 0 when the two
# image sets are close, by an amount that scales with the feature extractor's feature magnitudes (the embedded
# digits classifier's pre-logits are not Inception's), so it need only be finite, like unknown metrics.
QUALITY_RANGES: dict[str, tuple[float | None, float | None]] = {
    "top1": (0.0, 100.0), "top5": (0.0, 100.0), "agreement": (0.0, 100.0), "class_accuracy": (0.0, 100.0),
    "clip_score": (0.0, 100.0), "ssim": (-1.0, 1.0), "psnr": (None, None),
    "fid": (0.0, None), "fid_vs_reference": (0.0, None), "kid": (None, None),
    "num_images": (0.0, None),
}  # fmt: skip
_CI_TOLERANCE = 1e-9  # relative slack for "low <= speedup <= high" (floats written and read back)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _show(value: Any) -> str:
    try:
        return json.dumps(value)[:40]
    except (TypeError, ValueError):  # NaN read from a hand-written file
        return repr(value)[:40]


class _Checker:
    """Typed, ranged access to one file's fields; every failure is a ResultsError naming the file and field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, message: str) -> None:
        raise ResultsError(f"{self.source}: field {field!r}: {message}")

    def get(self, obj: dict[str, Any], key: str, where: str, kind: str, required: bool = True) -> Any:
        """``kind``: dict, list, str, bool, number, int (each may end in ``|null``)."""
        field = f"{where}.{key}" if where else key
        if key not in obj:
            if required:
                self.fail(field, "missing")
            return None
        value = obj[key]
        base, _, nullable = kind.partition("|")
        if value is None and nullable:
            return None
        self.check_type(value, base, field)
        return value

    def check_type(self, value: Any, kind: str, field: str) -> None:
        ok = {
            "dict": isinstance(value, dict),
            "list": isinstance(value, list),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "number": _is_number(value),
            "int": isinstance(value, int) and not isinstance(value, bool),
        }[kind]
        if not ok:
            expected = {"dict": "an object", "list": "a list", "str": "a string", "bool": "true or false",
                        "int": "an integer"}.get(kind, "a number")
            self.fail(field, f"expected {expected}, got {_type_name(value)} {_show(value)}")
        if kind == "number" and not math.isfinite(value):
            self.fail(field, f"expected a finite number, got {value}")

    def in_range(self, value: float, field: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
        if low is not None and (value <= low if low_open else value < low):
            self.fail(field, f"must be {'>' if low_open else '>='} {low:g}, got {value:g}")
        if high is not None and value > high:
            self.fail(field, f"must be <= {high:g}, got {value:g}")

    def number(self, obj: dict[str, Any], key: str, where: str, required: bool = False, nullable: bool = False,
               low: float | None = None, high: float | None = None, low_open: bool = False,
               integer: bool = False) -> float | None:
        kind = ("int" if integer else "number") + ("|null" if nullable else "")
        value = self.get(obj, key, where, kind, required)
        if value is not None:
            self.in_range(value, f"{where}.{key}", low, high, low_open)
        return value

    def interval(self, value: Any, field: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> tuple[float, float]:
        if not (isinstance(value, list) and len(value) == 2):
            self.fail(field, f"expected [low, high], got {_type_name(value)} {_show(value)}")
        for i, bound in enumerate(value):
            self.check_type(bound, "number", f"{field}[{i}]")
            self.in_range(bound, f"{field}[{i}]", low, high, low_open)
        if value[0] > value[1]:
            self.fail(field, f"low {value[0]:g} is above high {value[1]:g}")
        return value[0], value[1]

    def strings(self, obj: dict[str, Any], key: str, where: str) -> None:
        items = self.get(obj, key, where, "list", required=False)
        for j, item in enumerate(items or []):
            self.check_type(item, "str", f"{where}.{key}[{j}]")


def validate(data: Any, source: str = "<results>") -> dict[str, Any]:
    """Check ``data`` against the layout above; raise :class:`ResultsError` naming ``source`` and the field.

    Every benchmark needs ``name`` and numeric ``stats`` (``median``, ``min``, ``mean``, ``rounds``); a tokred
    benchmark (``extra_info.tokred`` present) also needs the fields the leaderboard reads, and every known key it
    has must have the right type and range (speedups and their intervals > 0, FLOPs and memory >= 0,
    accuracies in [0, 100], SSIM in [-1, 1], FID >= 0 ...).
    """
    c = _Checker(source)
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
            validate_extra_info(extra, f"{where}.extra_info", c)
    return data


def validate_extra_info(extra: dict[str, Any], where: str, checker: _Checker) -> None:
    c = checker
    version = c.number(extra, "tokred", where, required=True, integer=True, low=1)
    if version > SCHEMA_VERSION:
        c.fail(f"{where}.tokred", f"schema version {version} is newer than this tokred's {SCHEMA_VERSION}")
    for key in ("task", "method", "preset", "device", "dtype", "size"):
        c.get(extra, key, where, "str")
    for key in ("family", "model", "device_name", "command", "options_repr"):
        c.get(extra, key, where, "str", required=False)
    for key in ("task_info", "versions", "speed", "case_key"):
        c.get(extra, key, where, "dict", required=False)
    c.get(extra, "options", where, "dict")
    metrics = _validate_metrics(extra, where, c)

    # speed
    speedup = c.number(extra, "speedup", where, required=True, low=0.0, low_open=True)
    c.number(extra, "latency_ms", where, required=True, low=0.0, low_open=True)
    c.number(extra, "baseline_latency_ms", where, low=0.0, low_open=True)
    c.number(extra, "speedup_min", where, low=0.0, low_open=True)
    for key in ("throughput_per_s", "s_per_image", "flops_ideal_speedup", "efficiency"):
        c.number(extra, key, where, nullable=True, low=0.0, low_open=True)
    c.number(extra, "items_per_call", where, low=0.0, low_open=True)
    for key in ("gflops", "baseline_gflops", "peak_mem_mb"):
        c.number(extra, key, where, nullable=True, low=0.0)
    if "speedup_ci" in extra:
        low, high = c.interval(extra["speedup_ci"], f"{where}.speedup_ci", low=0.0, low_open=True)
        slack = _CI_TOLERANCE * speedup
        if not low - slack <= speedup <= high + slack:
            c.fail(f"{where}.speedup_ci", f"[{low:g}, {high:g}] does not contain the speedup {speedup:g}")
    ratios = c.get(extra, "round_ratios", where, "list", required=False)
    for j, ratio in enumerate(ratios or []):
        c.check_type(ratio, "number", f"{where}.round_ratios[{j}]")
        c.in_range(ratio, f"{where}.round_ratios[{j}]", 0.0, low_open=True)
    c.number(extra, "rounds", where, integer=True, low=1)
    c.number(extra, "warmup_rounds", where, integer=True, low=0)

    # machine and contention
    for key in ("num_threads", "threads", "cpu_count"):
        c.number(extra, key, where, integer=True, low=1)
    for key in ("loadavg_before", "loadavg_after"):
        load = c.get(extra, key, where, "list", required=False)
        if load is not None:
            if len(load) != 3:
                c.fail(f"{where}.{key}", f"expected [1 min, 5 min, 15 min], got {_show(load)}")
            for j, value in enumerate(load):
                c.check_type(value, "number", f"{where}.{key}[{j}]")
                c.in_range(value, f"{where}.{key}[{j}]", 0.0)
    c.number(extra, "cpu_utilisation", where, nullable=True, low=0.0)
    c.get(extra, "contended", where, "bool", required=False)
    c.strings(extra, "contention", where)
    c.strings(extra, "notes", where)

    # quality
    quality = c.get(extra, "quality", where, "dict")
    for name, value in quality.items():
        c.check_type(value, "number", f"{where}.quality.{name}")
        c.in_range(value, f"{where}.quality.{name}", *_quality_range(name, metrics))
    quality_ci = c.get(extra, "quality_ci", where, "dict", required=False) or {}
    for name, value in quality_ci.items():
        field = f"{where}.quality_ci.{name}"
        if name not in quality:
            c.fail(field, f"an interval for {name!r}, which is not in quality")
        low, high = _quality_range(name, metrics)
        c.interval(value, field, None if name == "kid" else low, high)
    quality_n = c.get(extra, "quality_n", where, "dict", required=False) or {}
    for name, value in quality_n.items():
        c.check_type(value, "int", f"{where}.quality_n.{name}")
        c.in_range(value, f"{where}.quality_n.{name}", 0)
    baseline_quality = c.get(extra, "baseline_quality", where, "dict", required=False) or {}
    for name, value in baseline_quality.items():
        c.check_type(value, "number", f"{where}.baseline_quality.{name}")

    tokens = c.get(extra, "tokens", where, "dict", required=False) or {}
    for block, counts in tokens.items():
        bwhere = f"{where}.tokens.{block}"
        if not isinstance(counts, dict):
            c.fail(bwhere, f"expected an object, got {_type_name(counts)} {_show(counts)}")
        for key in ("tokens", "attn", "kv", "mlp"):
            c.number(counts, key, bwhere, required=True, low=0.0)
        c.number(counts, "calls", bwhere, integer=True, low=0)


def _validate_metrics(extra: dict[str, Any], where: str, c: _Checker) -> dict[str, dict[str, Any]]:
    metrics = c.get(extra, "metrics", where, "list")
    out = {}
    for j, metric in enumerate(metrics):
        mwhere = f"{where}.metrics[{j}]"
        if not isinstance(metric, dict):
            c.fail(mwhere, f"expected an object, got {_type_name(metric)}")
        name = c.get(metric, "name", mwhere, "str")
        better = c.get(metric, "better", mwhere, "str")
        if better not in ("higher", "lower"):
            c.fail(f"{mwhere}.better", f"expected 'higher' or 'lower', got {better!r}")
        c.get(metric, "unit", mwhere, "str", required=False)
        c.get(metric, "kind", mwhere, "str", required=False)
        out[name] = metric
    return out


def _quality_range(name: str, metrics: dict[str, dict[str, Any]]) -> tuple[float | None, float | None]:
    if name in QUALITY_RANGES:
        return QUALITY_RANGES[name]
    if metrics.get(name, {}).get("unit") == "%":
        return 0.0, 100.0
    return None, None


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
