"""One benchmark case of a results file: :class:`CaseRecord`, the single definition of its fields.

A tokred benchmark's ``extra_info`` (:mod:`tokred.bench.results`) is a :class:`CaseRecord` written as JSON: one
field per key, under the same name. Each field carries its rule in its metadata (:class:`Rule`: JSON type,
whether null is allowed, range, whether a file must have it, the schema version that introduced it, what it
means), so :func:`check_extra_info` checks a file by iterating the fields; what a type and a range cannot say
(a speedup interval contains the speedup, quality ranges by metric, per-block token counts...) are the
``_check_*`` methods of :class:`_Validator`, named by the rules.

Schema versions (``extra_info["tokred"]``): 1, the first files; 2 added intervals, rounds, threads, contention,
FLOPs-ideal speedup, notes (``since=2``); 3 added ``unit``, ``workload``, ``architecture``, ``resolution``; 4
added the paired quality comparisons: ``quality_per_image``, ``quality_delta`` and ``quality_delta_p`` (optional:
a task without per-image metrics has none; a file of schema 3 or older has none, and its rows are ranked on their
marginal intervals); 5 added process replication and the timing floor: ``processes`` (worker processes the rounds
were timed in), ``process_speedups`` / ``process_latency_ms`` / ``process_rounds`` (each process's median ratio,
median method call and rounds, with several processes), ``method_time_s`` (seconds of the method's timed calls)
and ``min_time_s`` (the floor they had to reach); 6 made ``quality_delta`` required for every case but the
baseline (``{}`` where nothing could be paired, with ``quality_delta_reason`` saying why: random weights, no
per-image values) and added ``others_cpu`` (the other processes' CPU during the timed rounds, what ``contended``
is judged on since, :mod:`tokred.bench.contention`). Older files load through :func:`migrate`, which fills what
schemas 3 and 5 added from what the file has (:func:`tokred.bench.paired_migration.fill_quality_delta` adds
``quality_delta`` to a whole file's cases, which one case alone cannot: it pairs them with the baseline); the keys of
schema 2 stay absent (None) in a schema-1 record, so its rows have no intervals. The record keeps the version
it was written with: readers use it to tell what an old file could not record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 6

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


class ResultsError(ValueError):
    """A results file that cannot be read: the message names the file and the offending field."""


# --- typed, ranged access with errors naming the file and the field ---------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _show(value: Any) -> str:
    try:
        return json.dumps(value)[:40]
    except (TypeError, ValueError):  # NaN read from a hand-written file
        return repr(value)[:40]


class Checker:
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


# --- the rules ---------------------------------------------------------------------------------------------------

# JSON kinds of a field: a scalar or container checked by Checker.get, "interval" ([low, high] in the range),
# "numbers" / "strings" (lists of them; numbers in the range), "extra" (the record's unknown keys, no JSON key).
KINDS = frozenset({"str", "int", "number", "bool", "dict", "list", "interval", "numbers", "strings", "extra"})


@dataclass(frozen=True)
class Rule:
    """How one field is checked. ``required``: a file of schema ``since`` or later must have it (older files
    get it from :func:`migrate`, or lack it); ``nullable``: JSON null is a valid value (otherwise a None field is
    an absent key); ``low``/``high``/``low_open``: range of numbers (of each item of "interval"/"numbers");
    ``check``: the :class:`_Validator` method (``_check_<name>``) for what the kind cannot say."""

    kind: str
    required: bool = False
    nullable: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    since: int = 1
    check: str | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown field kind {self.kind!r}")


def _field(kind: str, doc: str, *, required: bool = False, **rule: Any) -> Any:
    """A dataclass field with its rule; required fields have no default, the others default to None (absent)."""
    metadata = {"rule": Rule(kind, required=required, doc=doc, **rule)}
    return field(metadata=metadata) if required else field(default=None, metadata=metadata)


def rule_of(f: Any) -> Rule | None:
    """The rule of a dataclass field of :class:`CaseRecord` (None for a field without one)."""
    return f.metadata.get("rule")


POSITIVE = {"low": 0.0, "low_open": True}
NON_NEGATIVE = {"low": 0.0}


@dataclass(frozen=True, kw_only=True)
class CaseRecord:
    """One case's measurements: the fields of a tokred benchmark's ``extra_info`` (see the module docstring).
    Fields are checked in this order; a check may use the fields before it (quality uses metrics, the speedup
    interval the speedup)."""

    tokred: int = _field("int", "the results schema version the case was written with", required=True, low=1,
                         check="schema")
    task: str = _field("str", "the task's registry name", required=True)
    family: str | None = _field("str", "the task's model family")
    method: str = _field("str", "method name (\"baseline\" for the unreduced model)", required=True)
    preset: str = _field("str", "preset name (\"baseline\" for the unreduced model)", required=True)
    method_kind: str | None = _field("str", "the method's kind (Method.kind: merge, prune, downsample, cache, "
                                     "composite, other); absent for the baseline and in older files")
    options: dict[str, Any] = _field("dict", "the method options applied (JSON: tuples become lists)",
                                     required=True)
    options_repr: str | None = _field("str", "the method options applied, as Python")
    model: str | None = _field("str", "model name")
    size: str = _field("str", "the workload size: \"embedded\" / \"arch\" / \"full\"", required=True)
    workload: str = _field("str", "the workload kind (\"embedded\", \"arch\", \"full\"; older files: size)",
                           required=True, since=3)
    unit: str = _field("str", "what one timed call is (\"generation of 2 images\", \"denoiser call\", \"batch of "
                       "64 images\"; older files: \"\")", required=True, since=3)
    architecture: str | None = _field("str", "the model architecture (\"sd15\", \"sd3\"...); null when not "
                                      "applicable (older files: task_info's)", nullable=True, since=3)
    resolution: int | None = _field("int", "image side in pixels; null when not applicable (older files: "
                                    "task_info's)", nullable=True, low=1, since=3)
    device: str = _field("str", "where it ran", required=True)
    device_name: str | None = _field("str", "the device's name (CPU or GPU model)")
    dtype: str = _field("str", "the model's dtype", required=True)
    threads: int | None = _field("int", "torch threads during timing", low=1, since=2)
    num_threads: int | None = _field("int", "torch threads during timing (the schema-1 name)", low=1)
    cpu_count: int | None = _field("int", "cores available to the process", low=1, since=2)
    versions: dict[str, Any] | None = _field("dict", "package versions")
    command: str | None = _field("str", "a `tokred run` command that reproduces the run")
    task_info: dict[str, Any] | None = _field("dict", "the task's settings (Task.describe())")
    metrics: list[dict[str, Any]] = _field("list", "[{\"name\", \"better\", \"unit\", \"kind\"}], the task's "
                                           "metrics", required=True, check="metrics")
    quality: dict[str, float] = _field("dict", "the task's evaluate(): point estimates", required=True,
                                       check="quality")
    quality_ci: dict[str, list[float]] | None = _field("dict", "95% interval of each quality metric", since=2,
                                                       check="quality_ci")
    quality_n: dict[str, int] | None = _field("dict", "number of images behind each quality metric", since=2,
                                              check="quality_n")
    baseline_quality: dict[str, float] | None = _field("dict", "the baseline's quality (no self-fidelity)",
                                                       check="baseline_quality")
    quality_per_image: dict[str, list[float]] | None = _field(
        "dict", "per paired metric, its value on each image, in the task's image order (hits as 0/1): what "
        "quality_delta is computed from", since=4, check="quality_per_image")
    quality_delta: dict[str, list[float]] | None = _field(
        "dict", "per paired metric, [delta, low, high]: this case minus the baseline on the same images, with the "
        "95% paired interval (bootstrap over images; for hits Bonett-Price's adjusted Wald interval held to "
        "McNemar's exact test, in percentage points)",
        since=4, check="quality_delta")  # required of a non-baseline case from schema 6: _Validator.run
    quality_delta_reason: str | None = _field(
        "str", "why quality_delta is empty (quality not measured: random weights; no per-image values to pair)",
        since=6)
    quality_delta_p: dict[str, float] | None = _field(
        "dict", "per hit metric of quality_delta (accuracy, agreement), McNemar's exact two-sided p-value", since=4,
        check="quality_delta_p")
    preset_order: int | None = _field("int", "the preset's place in its method's ladder of presets (0: the "
                                      "mildest); the leaderboard's curves join a method's rows in this order",
                                      since=4, low=0)
    speed: dict[str, Any] | None = _field("dict", "the task's measure_speed() (GFLOPs, memory...)")
    latency_ms: float = _field("number", "median time of one workload call (this case)", required=True,
                               **POSITIVE)
    baseline_latency_ms: float | None = _field("number", "median time of one call of the paired baseline",
                                               **POSITIVE)
    throughput_per_s: float | None = _field("number", "items per second, from the median call", nullable=True,
                                            **POSITIVE)
    s_per_image: float | None = _field("number", "seconds per item, from the median call", nullable=True,
                                       **POSITIVE)
    items_per_call: float | None = _field("number", "items (images) in one workload call", **POSITIVE)
    speedup: float = _field("number", "median over the timed rounds of baseline time / method time",
                            required=True, **POSITIVE)
    speedup_ci: list[float] | None = _field("interval", "the speedup's 95% bootstrap interval [low, high]",
                                            since=2, check="speedup_ci", **POSITIVE)
    speedup_min: float | None = _field("number", "the lowest per-round speedup", **POSITIVE)
    round_ratios: list[float] | None = _field("numbers", "the per-round ratios behind speedup", since=2,
                                              **POSITIVE)
    rounds: int | None = _field("int", "timed rounds", low=1)
    processes: int = _field("int", "worker processes the rounds were timed in (1: the run's own process; older "
                            "files: 1)", required=True, low=1, since=5, check="processes")
    process_speedups: list[float] | None = _field("numbers", "with several processes: each process's median "
                                                  "per-round ratio (the interval covers their spread)", since=5,
                                                  **POSITIVE)
    process_latency_ms: list[float] | None = _field("numbers", "with several processes: each process's median "
                                                    "method call (ms)", since=5, **POSITIVE)
    process_rounds: list[float] | None = _field("numbers", "with several processes: the rounds each timed, in the "
                                                "order of round_ratios", since=5, check="process_rounds", low=1)
    method_time_s: float | None = _field("number", "seconds of the method's own timed calls (what the timing "
                                         "floor counts)", since=5, **NON_NEGATIVE)
    min_time_s: float | None = _field("number", "the timing floor: seconds of method calls a case had to reach",
                                      since=5, **NON_NEGATIVE)
    warmup_rounds: int | None = _field("int", "rounds run and dropped first", low=0, since=2)
    loadavg_before: list[float] | None = _field("numbers", "os.getloadavg() before the timed rounds", since=2,
                                                check="loadavg", **NON_NEGATIVE)
    loadavg_after: list[float] | None = _field("numbers", "os.getloadavg() after the timed rounds", since=2,
                                               check="loadavg", **NON_NEGATIVE)
    cpu_utilisation: float | None = _field("number", "process CPU seconds per wall second per thread (1.0: all "
                                           "threads)", nullable=True, since=2, **NON_NEGATIVE)
    others_cpu: dict[str, Any] | None = _field(
        "dict", "the other processes' CPU during the timed rounds, from /proc/stat (absent where not measurable): "
        "busy_s (all cores' non-idle seconds), own_s (this process's), others_s, window_s, others_cores (others_s "
        "per window second), limit_cores (above it: contended), resolution_s (tick slack), procs_running_max, "
        "source", since=6, check="others_cpu")
    contended: bool | None = _field("bool", "whether the machine was busy during the case", since=2)
    contention: list[str] | None = _field("strings", "why the machine was busy", since=2)
    gflops: float | None = _field("number", "GFLOPs per item", nullable=True, **NON_NEGATIVE)
    baseline_gflops: float | None = _field("number", "the baseline's GFLOPs per item", nullable=True, since=2,
                                           **NON_NEGATIVE)
    flops_ideal_speedup: float | None = _field("number", "baseline GFLOPs / this case's", nullable=True, since=2,
                                               **POSITIVE)
    efficiency: float | None = _field("number", "measured speedup / FLOPs-ideal speedup", nullable=True,
                                      since=2, **POSITIVE)
    peak_mem_mb: float | None = _field("number", "peak memory of one call (MB)", nullable=True, **NON_NEGATIVE)
    tokens: dict[str, dict[str, float]] | None = _field("dict", "per block: mean tokens entering it and through "
                                                        "attention (attn, kv) and the MLP", since=2,
                                                        check="tokens")
    notes: list[str] | None = _field("strings", "caveats the leaderboard prints under the section", since=2)
    compile: dict[str, Any] | None = _field(
        "dict", "a compiled run's (tokred run --compile): backend, mode, fullgraph, compile_s (seconds compiling, "
        "not in the timed rounds), warmup_s, compile_rounds, compilations, recompiles, graphs, graph_breaks, "
        "timed_compilations, steady, fx_graph_cache, process_compile_s (with worker processes); absent when eager")
    case_key: dict[str, Any] | None = _field("dict", "the case's identity (the runner's; --resume matches it)")
    extra: dict[str, Any] = field(default_factory=dict, metadata={"rule": Rule(
        "extra", doc="keys this tokred does not know, kept as they are (not a JSON key)")})

    # --- construction ----------------------------------------------------------------------------------------

    @classmethod
    def from_extra_info(cls, extra: dict[str, Any], where: str = "extra_info",
                        source: str = "<results>") -> CaseRecord:
        """Check a benchmark's ``extra_info`` (:class:`ResultsError` naming ``source`` and the field, e.g.
        ``benchmarks[2].extra_info.speedup``), migrate it to the current schema, and build the record."""
        check_extra_info(extra, where, Checker(source))
        return cls.from_values(migrate(extra))

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> CaseRecord:
        """The record of ``values`` (keys as in ``extra_info``), unchecked; unknown keys go to ``extra``."""
        known = {f.name for f in fields(cls) if f.name != "extra"}
        return cls(**{k: v for k, v in values.items() if k in known},
                   extra={k: v for k, v in values.items() if k not in known})

    def to_extra_info(self) -> dict[str, Any]:
        """The record as ``extra_info`` (JSON types, fresh containers): required and nullable fields always,
        the others when not None; then the unknown keys it was read with."""
        out: dict[str, Any] = {}
        for f in fields(self):
            rule, value = rule_of(f), getattr(self, f.name)
            if f.name == "extra" or (value is None and not rule.required and not rule.nullable):
                continue
            out[f.name] = _plain(value)
        out.update({k: _plain(v) for k, v in self.extra.items() if k not in out})
        return out

    # --- derived -----------------------------------------------------------------------------------------------

    @property
    def is_baseline(self) -> bool:
        return self.method == "baseline"

    @property
    def torch_threads(self) -> int | None:
        """Torch threads during timing, whichever name the file used."""
        return self.threads if self.threads is not None else self.num_threads

    def metric(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.metrics if m.get("name") == name), None)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --- migration ---------------------------------------------------------------------------------------------------


def migrate(extra: Mapping[str, Any]) -> dict[str, Any]:
    """A checked ``extra_info`` of any schema as the current schema's keys (a new dict; ``tokred`` unchanged).

    Schema 1 -> 2: the keys new in schema 2 (intervals, rounds, contention...) cannot be recovered: they stay
    absent, and the rows have no intervals. Schema 2 -> 3: ``unit`` "" (unknown), ``workload`` the ``size``,
    ``architecture`` and ``resolution`` from ``task_info`` where it has them with the right type. Schema 3 -> 4:
    the paired quality keys stay absent. Schema 4 -> 5: ``processes`` 1 (every earlier file timed in one
    process); the per-process lists, ``method_time_s`` and ``min_time_s`` stay absent (no floor was applied).
    """
    out = dict(extra)
    version = out.get("tokred", SCHEMA_VERSION)
    if version < 3:
        out.setdefault("unit", "")
        out.setdefault("workload", out.get("size"))
        for key, value in run_settings(out.get("task_info")).items():
            out.setdefault(key, value)
    if version < 5:
        out.setdefault("processes", 1)
    return out


def run_settings(task_info: Any) -> dict[str, Any]:
    """``architecture`` and ``resolution`` of a case, from its task's settings (``task_info``) where they are
    there with the right type, else None: what the harness records and what older files are migrated with."""
    info = task_info if isinstance(task_info, Mapping) else {}
    architecture, resolution = info.get("architecture"), info.get("resolution")
    ok = isinstance(resolution, int) and not isinstance(resolution, bool) and resolution >= 1
    return {"architecture": architecture if isinstance(architecture, str) else None,
            "resolution": resolution if ok else None}


# --- checking ----------------------------------------------------------------------------------------------------


def check_extra_info(extra: dict[str, Any], where: str, checker: Checker) -> None:
    """Check every field of :class:`CaseRecord` that ``extra`` has (unknown keys are left alone); raise
    :class:`ResultsError` naming ``checker.source`` and the field."""
    _Validator(extra, where, checker).run()


class _Validator:
    def __init__(self, extra: dict[str, Any], where: str, checker: Checker) -> None:
        self.extra, self.where, self.c = extra, where, checker
        self.version = 1
        self.metrics: dict[str, dict[str, Any]] = {}

    def run(self) -> None:
        for f in fields(CaseRecord):
            rule = rule_of(f)
            if rule.kind == "extra":
                continue
            value = self.field(f.name, rule)
            if value is not None and rule.check is not None:
                getattr(self, f"_check_{rule.check}")(value, f"{self.where}.{f.name}", rule)
        self._check_paired_complete()

    def _check_paired_complete(self) -> None:
        """Schema 6: every case but the baseline carries ``quality_delta``, and an empty one says why."""
        if self.version < 6 or self.extra.get("method") == "baseline":
            return
        if "quality_delta" not in self.extra:
            self.c.fail(f"{self.where}.quality_delta", "missing: every case but the baseline carries it from schema "
                        "6 ({} with quality_delta_reason where nothing could be paired)")
        if not self.extra["quality_delta"] and not self.extra.get("quality_delta_reason"):
            self.c.fail(f"{self.where}.quality_delta_reason", "missing: quality_delta is empty and no reason says why")

    def field(self, key: str, rule: Rule) -> Any:
        c, extra, where, name = self.c, self.extra, self.where, f"{self.where}.{key}"
        required = rule.required and self.version >= rule.since
        if rule.kind in ("int", "number"):
            return c.number(extra, key, where, required=required, nullable=rule.nullable, low=rule.low,
                            high=rule.high, low_open=rule.low_open, integer=rule.kind == "int")
        if rule.kind == "interval":
            if key not in extra:
                if required:
                    c.fail(name, "missing")
                return None
            value = extra[key]
            if value is not None or not rule.nullable:
                c.interval(value, name, rule.low, rule.high, rule.low_open)
            return value
        base = {"numbers": "list", "strings": "list"}.get(rule.kind, rule.kind)
        value = c.get(extra, key, where, base + ("|null" if rule.nullable else ""), required)
        for j, item in enumerate(value if rule.kind in ("numbers", "strings") and value else []):
            c.check_type(item, "str" if rule.kind == "strings" else "number", f"{name}[{j}]")
            if rule.kind == "numbers":
                c.in_range(item, f"{name}[{j}]", rule.low, rule.high, rule.low_open)
        return value

    # what the kinds cannot say

    def _check_schema(self, version: int, name: str, rule: Rule) -> None:
        if version > SCHEMA_VERSION:
            self.c.fail(name, f"schema version {version} is newer than this tokred's {SCHEMA_VERSION}")
        self.version = version

    def _check_metrics(self, metrics: list[Any], name: str, rule: Rule) -> None:
        c = self.c
        for j, metric in enumerate(metrics):
            mwhere = f"{name}[{j}]"
            if not isinstance(metric, dict):
                c.fail(mwhere, f"expected an object, got {_type_name(metric)}")
            metric_name = c.get(metric, "name", mwhere, "str")
            better = c.get(metric, "better", mwhere, "str")
            if better not in ("higher", "lower"):
                c.fail(f"{mwhere}.better", f"expected 'higher' or 'lower', got {better!r}")
            c.get(metric, "unit", mwhere, "str", required=False)
            c.get(metric, "kind", mwhere, "str", required=False)
            c.get(metric, "primary", mwhere, "bool", required=False)
            c.get(metric, "note", mwhere, "str", required=False)
            self.metrics[metric_name] = metric

    def _check_quality(self, quality: dict[str, Any], name: str, rule: Rule) -> None:
        for metric, value in quality.items():
            self.c.check_type(value, "number", f"{name}.{metric}")
            self.c.in_range(value, f"{name}.{metric}", *quality_range(metric, self.metrics))

    def _check_quality_ci(self, intervals: dict[str, Any], name: str, rule: Rule) -> None:
        quality = self.extra["quality"]
        for metric, value in intervals.items():
            field = f"{name}.{metric}"
            if metric not in quality:
                self.c.fail(field, f"an interval for {metric!r}, which is not in quality")
            low, high = quality_range(metric, self.metrics)
            self.c.interval(value, field, None if metric == "kid" else low, high)

    def _check_quality_n(self, counts: dict[str, Any], name: str, rule: Rule) -> None:
        for metric, value in counts.items():
            self.c.check_type(value, "int", f"{name}.{metric}")
            self.c.in_range(value, f"{name}.{metric}", 0)

    def _check_baseline_quality(self, quality: dict[str, Any], name: str, rule: Rule) -> None:
        for metric, value in quality.items():
            self.c.check_type(value, "number", f"{name}.{metric}")

    def _check_quality_per_image(self, per_image: dict[str, Any], name: str, rule: Rule) -> None:
        for metric, values in per_image.items():
            field = f"{name}.{metric}"
            self.c.check_type(values, "list", field)
            for j, value in enumerate(values):
                self.c.check_type(value, "number", f"{field}[{j}]")

    def _check_quality_delta(self, deltas: dict[str, Any], name: str, rule: Rule) -> None:
        for metric, value in deltas.items():
            field = f"{name}.{metric}"
            if not (isinstance(value, list) and len(value) == 3):
                self.c.fail(field, f"expected [delta, low, high], got {_type_name(value)} {_show(value)}")
            for j, item in enumerate(value):
                self.c.check_type(item, "number", f"{field}[{j}]")
            delta, low, high = value
            slack = _CI_TOLERANCE * max(1.0, abs(delta))
            if not low - slack <= delta <= high + slack:
                self.c.fail(field, f"[{low:g}, {high:g}] does not contain the difference {delta:g}")

    def _check_others_cpu(self, others: dict[str, Any], name: str, rule: Rule) -> None:
        c = self.c
        for key in ("busy_s", "own_s", "others_s", "window_s", "resolution_s", "limit_cores"):
            c.number(others, key, name, required=True, low=0.0)
        c.number(others, "others_cores", name, required=True, nullable=True, low=0.0)
        c.number(others, "procs_running_max", name, nullable=True, low=0, integer=True)
        c.get(others, "source", name, "str")

    def _check_quality_delta_p(self, pvalues: dict[str, Any], name: str, rule: Rule) -> None:
        for metric, value in pvalues.items():
            self.c.check_type(value, "number", f"{name}.{metric}")
            self.c.in_range(value, f"{name}.{metric}", 0.0, 1.0)

    def _check_speedup_ci(self, interval: list[float], name: str, rule: Rule) -> None:
        low, high = interval
        speedup = self.extra["speedup"]
        slack = _CI_TOLERANCE * speedup
        if not low - slack <= speedup <= high + slack:
            self.c.fail(name, f"[{low:g}, {high:g}] does not contain the speedup {speedup:g}")

    def _check_processes(self, processes: int, name: str, rule: Rule) -> None:
        for key in ("process_speedups", "process_latency_ms", "process_rounds"):
            value = self.extra.get(key)
            if isinstance(value, list) and len(value) != processes:
                self.c.fail(f"{self.where}.{key}", f"{len(value)} values for {processes} processes")

    def _check_process_rounds(self, counts: list[float], name: str, rule: Rule) -> None:
        for j, n in enumerate(counts):
            self.c.check_type(n, "int", f"{name}[{j}]")
        rounds = self.extra.get("rounds")
        if isinstance(rounds, int) and sum(counts) != rounds:
            self.c.fail(name, f"the processes' rounds add up to {sum(counts)}, not rounds {rounds}")

    def _check_loadavg(self, load: list[float], name: str, rule: Rule) -> None:
        if len(load) != 3:
            self.c.fail(name, f"expected [1 min, 5 min, 15 min], got {_show(load)}")

    def _check_tokens(self, tokens: dict[str, Any], name: str, rule: Rule) -> None:
        c = self.c
        for block, counts in tokens.items():
            bwhere = f"{name}.{block}"
            if not isinstance(counts, dict):
                c.fail(bwhere, f"expected an object, got {_type_name(counts)} {_show(counts)}")
            for key in ("tokens", "attn", "kv", "mlp"):
                c.number(counts, key, bwhere, required=True, low=0.0)
            c.number(counts, "calls", bwhere, integer=True, low=0)


def quality_range(name: str, metrics: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """The valid range of quality metric ``name`` (:data:`QUALITY_RANGES`, else [0, 100] for a "%" metric)."""
    if name in QUALITY_RANGES:
        return QUALITY_RANGES[name]
    if metrics.get(name, {}).get("unit") == "%":
        return 0.0, 100.0
    return None, None
