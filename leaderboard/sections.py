"""Leaderboard sections read from results files: which rows belong together, and their marks.

A section is one comparable set of rows: the same task, size, model, hardware (device name), dtype, torch
threads and task settings (``task_info`` less :data:`VOLATILE_SETTINGS`), so a 3-step and a 20-step run never
share a table. Within a section a row is one method, preset and options; when several results files hold the
same row, the one from the newer file (its ``datetime``) wins, and between files of the same date the one whose
path sorts last.

Marks (see :mod:`tokred.leaderboard.ranking` for the definitions):

* ranked columns: speedup (its ``speedup_ci``), GFLOPs and peak memory (exact counts), and the quality metrics
  (their ``quality_ci``); throughput and s/image are not ranked (they restate the speedup's timings without the
  pairing with the baseline);
* rows whose timing was contended (``contended: true``) never carry a mark, and their speedups do not compete;
  their quality, FLOPs and memory still do (contention does not change them), so a contended row can prevent
  another from being bold;
* a value at a cap constant (:data:`CAPS`: PSNR of identical images) is shown but not ranked;
* paired quality (results schema 4, ``quality_delta``): a metric that a case records as a difference from the
  baseline on the same images is ranked on that paired interval: the row's interval is the baseline's value plus
  the difference's interval, and the baseline's value is exact in that column, so a row is separated from the
  baseline exactly when its paired interval excludes zero (rows of older files keep their marginal intervals).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokred.bench.compiled import label_of
from tokred.bench.record import CaseRecord
from tokred.bench.results import ResultsError, load_results, tokred_records

from .ranking import ColumnMarks, Estimate, pareto_front, rank_column

# task_info fields that say when or how a run went, not what it measured: left out of the section identity
VOLATILE_SETTINGS = frozenset({"date", "datetime", "time", "timestamp", "progress", "setup_s", "duration_s"})
# task_info fields shown elsewhere in the section (title, Model line)
IDENTITY_FIELDS = frozenset({"task", "size", "device", "dtype", "model"})
CAPS = {"psnr": 100.0}  # tasks/quality.py PSNR_CAP_DB: identical images, not a measurement

# Speed columns: (CaseRecord field, header, direction or None when the column is not ranked).
SPEEDUP = ("speedup", "speedup ×", "higher")
FLOPS_IDEAL = ("flops_ideal_speedup", "FLOPs-ideal ×", None)
EFFICIENCY = ("efficiency", "efficiency", None)
THROUGHPUT = ("throughput_per_s", "throughput (img/s)", None)
S_PER_IMAGE = ("s_per_image", "s/image", None)
GFLOPS = ("gflops", "GFLOPs/image", "lower")
MEMORY = ("peak_mem_mb", "peak memory (MB)", "lower")
EXACT = ("gflops", "peak_mem_mb")
TIMED = ("speedup",)  # ranked columns that contention invalidates


def method_kind(method: str, recorded: str | None = None) -> str:
    """The kind column of a row: "—" for the baseline, the kind its results recorded (``method_kind``), else the
    registry's (older results files), else blank (a method this installation does not have)."""
    if method == "baseline":
        return "—"
    if recorded:
        return recorded
    from tokred.errors import TokredError
    from tokred.registry import get_method

    try:
        return get_method(method).kind
    except TokredError:
        return ""


@dataclass
class Row:
    method: str
    preset: str
    options: str
    values: dict[str, float]
    estimates: dict[str, Estimate]  # the ranked values
    datetime: str
    source: str
    record: CaseRecord  # the case as its results file holds it
    pareto: bool = False
    marks: dict[str, str] = field(default_factory=dict)  # column key -> "bold" | "tied"

    @property
    def is_baseline(self) -> bool:
        return self.method == "baseline"

    @property
    def kind(self) -> str:
        return method_kind(self.method, self.record.method_kind)

    @property
    def label(self) -> str:
        return "baseline" if self.is_baseline else f"{self.method} {self.preset}"

    @property
    def contended(self) -> bool:
        return bool(self.record.contended)

    @property
    def identity(self) -> tuple[str, str, str]:
        return self.method, self.preset, json.dumps(self.record.options, sort_keys=True)

    def capped(self, key: str) -> bool:
        return key in CAPS and self.values.get(key) is not None and self.values[key] >= CAPS[key]


@dataclass
class Section:
    task: str
    size: str
    model: str
    device: str
    device_name: str
    dtype: str
    threads: int | None
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    distinction: str = ""  # the settings that tell this section from others with the same title
    inseparable: list[str] = field(default_factory=list)  # ranked columns where every value ties with the best
    # a compiled run's label ("compiled (inductor)", tokred.bench.compiled), "" for eager: compiled rows are timed
    # against the compiled baseline and never share a section with eager ones
    compiled: str = ""

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.task, self.size, self.model, self.device_name, self.dtype, self.threads or 0,
                json.dumps(self.settings, sort_keys=True), self.compiled)

    @property
    def eager_key(self) -> tuple[Any, ...]:
        """The key of the eager section this (compiled) section's rows compare with."""
        return self.key[:-1] + ("",)

    @property
    def base_title(self) -> str:
        title = f"{self.task} · {self.size} · {self.device_name} · {self.dtype}"
        return f"{title} · {self.compiled}" if self.compiled else title

    @property
    def title(self) -> str:
        return f"{self.base_title} · {self.distinction}" if self.distinction else self.base_title

    @property
    def slug(self) -> str:
        text = (f"{self.task}-{self.size}-{self.device}-{self.device_name}-{self.dtype}-{self.compiled}-"
                f"{self.distinction}").lower()
        return re.sub(r"[^a-z0-9]+", "-", text).strip("-")

    def metric(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.metrics if m["name"] == name), None)

    def quality_metrics(self) -> list[dict[str, Any]]:
        """The task's quality metrics that at least one row reports, in the task's order."""
        return [
            m for m in self.metrics
            if m.get("kind", "quality") == "quality" and any(m["name"] in r.values for r in self.rows)
        ]  # fmt: skip

    def primary_metric(self) -> dict[str, Any] | None:
        """The first quality metric the task marks ``primary`` that a row reports; for results without such a
        mark, the first quality metric the baseline reports (or, without a baseline row, any row)."""
        flagged = [m for m in self.quality_metrics() if m.get("primary")]
        if flagged:
            return flagged[0]
        baseline = [r for r in self.rows if r.is_baseline]
        pool = baseline or self.rows
        return next((m for m in self.quality_metrics() if any(m["name"] in r.values for r in pool)), None)

    def speed_columns(self) -> list[tuple[str, str, str | None]]:
        timing = S_PER_IMAGE if self.metric("s_per_image") else THROUGHPUT
        return [SPEEDUP, FLOPS_IDEAL, EFFICIENCY, timing, GFLOPS, MEMORY]

    def ranked_columns(self) -> list[tuple[str, str]]:
        """(key, direction) of every column that carries marks."""
        speed = [(k, d) for k, _, d in self.speed_columns() if d is not None]
        return speed + [(m["name"], m["better"]) for m in self.quality_metrics()]

    @property
    def contended_rows(self) -> list[Row]:
        return [r for r in self.rows if r.contended]

    @property
    def has_intervals(self) -> bool:
        return all(r.record.speedup_ci is not None for r in self.rows)


# --- loading -------------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def section_settings(task_info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in task_info.items() if k not in IDENTITY_FIELDS | VOLATILE_SETTINGS and v is not None}


def _row(record: CaseRecord, when: str, source: str) -> Row:
    values: dict[str, float] = {}
    estimates: dict[str, Estimate] = {}
    quality_ci = record.quality_ci or {}
    deltas = record.quality_delta or {}
    for name, raw in record.quality.items():
        value = _number(raw)
        if value is None:
            continue
        values[name] = value
        ci = quality_ci.get(name)
        estimates[name] = Estimate(value, (float(ci[0]), float(ci[1])) if ci else None)
        if name in deltas:  # paired: the baseline's value (this value less the difference) plus the interval
            delta, low, high = (float(v) for v in deltas[name])
            estimates[name] = Estimate(value, (value - delta + low, value - delta + high))
    for key in ("speedup", "throughput_per_s", "s_per_image", "gflops", "peak_mem_mb", "flops_ideal_speedup",
                "efficiency", "baseline_gflops"):
        value = _number(getattr(record, key))
        if value is not None:
            values[key] = value
    ci = record.speedup_ci
    estimates["speedup"] = Estimate(values["speedup"], (float(ci[0]), float(ci[1])) if ci else None)
    for key in EXACT:
        if key in values:  # exact counts, but a schema-1 row is never ranked
            estimates[key] = Estimate.exact(values[key]) if record.tokred >= 2 else Estimate(values[key])
    options = record.options_repr
    if options is None:
        options = ", ".join(f"{k}={v!r}" for k, v in record.options.items())
    return Row(record.method, record.preset, options, values, estimates, when, source, record)


def _section_for(record: CaseRecord) -> Section:
    task_info = record.task_info or {}
    return Section(record.task, record.size, str(record.model or task_info.get("model") or "?"), record.device,
                   record.device_name or record.device, record.dtype, record.torch_threads,
                   section_settings(task_info), compiled=label_of(record.compile))


def load_sections(paths: Sequence[str], sources: Sequence[str] | None = None,
                  documents: Mapping[str, dict[str, Any]] | None = None) -> list[Section]:
    """Read results files into sections (marks set). ``sources``: how each path is named in the markdown
    (default: the path). Files are read in the order of their names, so the result does not depend on the
    order they were given in. ``documents``: the files already read by :func:`load_results`, by path (each file
    is read and checked once)."""
    named = sorted(zip(sources or paths, paths, strict=True))
    sections: dict[tuple[Any, ...], Section] = {}
    # section key -> row identity -> its index in the section's rows (a dict: a scan of the rows for every new
    # row made large files quadratic)
    positions: dict[tuple[Any, ...], dict[tuple[str, str, str], int]] = {}
    found = 0
    for source, path in named:
        data = documents[path] if documents is not None and path in documents else load_results(path)
        when = str(data.get("datetime", ""))
        for record in tokred_records(data, path, checked=True):  # load_results checked them
            found += 1
            sec = _section_for(record)
            key = sec.key
            sec = sections.setdefault(key, sec)
            index = positions.setdefault(key, {})
            known = {m["name"] for m in sec.metrics}
            for metric in record.metrics:
                if metric["name"] not in known:
                    sec.metrics.append(dict(metric))
                    known.add(metric["name"])
                elif metric.get("primary"):  # a newer file names the primary axis that an older one did not
                    sec.metric(metric["name"]).update(primary=True, **({"note": metric["note"]} if
                                                                      metric.get("note") else {}))
            row = _row(record, when, source)
            identity = row.identity
            previous = index.get(identity)
            if previous is None:
                index[identity] = len(sec.rows)
                sec.rows.append(row)
            elif row.datetime >= sec.rows[previous].datetime:
                sec.rows[previous] = row
    if paths and not found:
        raise ResultsError(
            f"{', '.join(paths)}: no tokred benchmarks (no benchmark has extra_info.tokred); write results with "
            "`tokred run` or `pytest benchmarks/test_methods.py --benchmark-json=...`"
        )
    out = sorted(sections.values(), key=lambda s: s.key)
    _distinguish(out)
    for sec in out:
        fill_derived(sec)
        pair_baseline(sec)
        sec.rows.sort(key=lambda r: (not r.is_baseline, -r.values.get("speedup", 0.0), r.method, r.preset,
                                     r.identity[2]))
        mark(sec)
    return out


def _distinguish(sections: list[Section]) -> None:
    """Sections sharing a title get the settings (and model, threads) that differ among them appended."""
    groups: dict[str, list[Section]] = {}
    for sec in sections:
        groups.setdefault(sec.base_title, []).append(sec)
    for group in groups.values():
        if len(group) < 2:
            continue
        described = [{"model": s.model, "threads": s.threads, **s.settings} for s in group]
        keys = sorted({k for d in described for k in d})
        differing = [k for k in keys if len({json.dumps(d.get(k), sort_keys=True) for d in described}) > 1]
        for sec, desc in zip(group, described, strict=True):
            sec.distinction = ", ".join(f"{k}={_short(desc.get(k))}" for k in differing)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def fill_derived(section: Section) -> None:
    """FLOPs-ideal speedup and efficiency where older files lack them: the baseline's GFLOPs (the row's own
    ``baseline_gflops``, else the section's baseline row) over the row's, and speedup over that."""
    baseline = next((r for r in section.rows if r.is_baseline), None)
    for row in section.rows:
        if "flops_ideal_speedup" not in row.values and row.values.get("gflops"):
            base = row.values.get("baseline_gflops")
            if base is None and baseline is not None:
                base = baseline.values.get("gflops")
            if base:
                row.values["flops_ideal_speedup"] = base / row.values["gflops"]
        if "efficiency" not in row.values and row.values.get("flops_ideal_speedup"):
            row.values["efficiency"] = row.values["speedup"] / row.values["flops_ideal_speedup"]


def paired_metrics(section: Section) -> set[str]:
    """The quality metrics that some row of the section records as a paired difference from the baseline."""
    return {name for r in section.rows for name in (r.record.quality_delta or {})}


def pair_baseline(section: Section) -> None:
    """In a column ranked on paired intervals, the baseline's value is the reference the intervals are taken
    against: exact (its own interval, over the images, stays in the table)."""
    paired = paired_metrics(section)
    for row in section.rows:
        if row.is_baseline:
            for name in paired & set(row.values):
                row.estimates[name] = Estimate.exact(row.values[name])


# --- marks -----------------------------------------------------------------------------------------------------


def column_marks(section: Section, key: str, direction: str) -> ColumnMarks:
    competitors = {
        i: r.estimates[key]
        for i, r in enumerate(section.rows)
        if key in r.estimates and not r.capped(key) and not (key in TIMED and r.contended)
    }
    eligible = [i for i in competitors if not section.rows[i].contended]
    return rank_column(competitors, direction, eligible)


def mark(section: Section) -> None:
    """Set every row's column marks (bold / tied) and Pareto flag."""
    for row in section.rows:
        row.marks = {}
        row.pareto = False
    section.inseparable = []
    for key, direction in section.ranked_columns():
        marks = column_marks(section, key, direction)
        for i in marks.bold:
            section.rows[i].marks[key] = "bold"
        if marks.all_tied:  # a mark on every row would say nothing: the section text names the column
            section.inseparable.append(key)
            continue
        for i in marks.tied:
            section.rows[i].marks[key] = "tied"
    metric = section.primary_metric()
    if metric is None:
        return
    name = metric["name"]
    points = {
        i: (r.estimates["speedup"], r.estimates[name])
        for i, r in enumerate(section.rows)
        if name in r.estimates and not r.contended and not r.capped(name)
    }
    for i in pareto_front(points, ("higher", metric["better"])):
        section.rows[i].pareto = True



def compiled_pairs(sections: Sequence[Section]) -> list[tuple[Section, Section]]:
    """(compiled section, the eager section of the same workload) for every compiled section that has one: the
    rows to compare a method's compiled speedup (over the compiled baseline) with its eager one."""
    eager = {s.key: s for s in sections if not s.compiled}
    return [(s, eager[s.eager_key]) for s in sections if s.compiled and s.eager_key in eager]
