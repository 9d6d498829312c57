"""Build the leaderboard (markdown + speed-versus-quality plots) from benchmark results files.

Input: any number of results files in pytest-benchmark's JSON layout, written by ``tokred run`` or by
``pytest benchmarks/ --benchmark-json=...`` (see :mod:`tokred.bench.results`); benchmarks without tokred's
``extra_info`` (other benchmark files) are ignored.

Output: one section per task and hardware (task, size, device name, dtype), each with

* a header: device, dtype, model, package versions, date, and the ``tokred run`` command that reproduces it;
* a table in tabulate's ``pipe`` format: the baseline row at 1.00×, then every method preset, with speedup,
  throughput (or seconds per image), GFLOPs, peak memory and the task's quality metrics (↑ higher is better,
  ↓ lower is better); the best value of each column in bold; ★ marks the rows on the Pareto front of speedup
  against the task's primary quality metric (the first of its quality metrics that the baseline reports);
* a PNG plot of speedup against the primary quality metric (matplotlib, Agg backend), linked from the section.

Published numbers from the papers (``published.json``) go in a separate table labelled "published (not
measured by us)", never mixed with measured rows.

Run: ``tokred leaderboard results/*.json -o leaderboard/README.md`` or
``python -m tokred.leaderboard.generate results/*.json -o leaderboard/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokred.bench.results import ResultsError, load_results, tokred_benchmarks

PUBLISHED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published.json")
PARETO_MARK = "★"
ARROWS = {"higher": "↑", "lower": "↓"}

# Speed columns: (key in extra_info, header, direction). The throughput column is replaced by seconds per image
# for tasks that define an ``s_per_image`` metric (diffusion).
SPEEDUP = ("speedup", "speedup ×", "higher")
THROUGHPUT = ("throughput_per_s", "throughput (img/s)", "higher")
S_PER_IMAGE = ("s_per_image", "s/image", "lower")
GFLOPS = ("gflops", "GFLOPs/image", "lower")
MEMORY = ("peak_mem_mb", "peak memory (MB)", "lower")


@dataclass
class Row:
    method: str
    preset: str
    options: str
    values: dict[str, float]
    datetime: str
    source: str
    info: dict[str, Any]
    pareto: bool = False

    @property
    def is_baseline(self) -> bool:
        return self.method == "baseline"

    @property
    def label(self) -> str:
        return "baseline" if self.is_baseline else f"{self.method} {self.preset}"


@dataclass
class Section:
    task: str
    size: str
    device: str
    device_name: str
    dtype: str
    rows: list[Row] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.task, self.size, self.device_name, self.dtype)

    @property
    def title(self) -> str:
        return f"{self.task} · {self.size} · {self.device_name} · {self.dtype}"

    @property
    def slug(self) -> str:
        text = f"{self.task}-{self.size}-{self.device}-{self.device_name}-{self.dtype}".lower()
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
        """The first quality metric the baseline reports (or, without a baseline row, any row)."""
        baseline = [r for r in self.rows if r.is_baseline]
        pool = baseline or self.rows
        return next((m for m in self.quality_metrics() if any(m["name"] in r.values for r in pool)), None)

    def speed_columns(self) -> list[tuple[str, str, str]]:
        timing = S_PER_IMAGE if self.metric("s_per_image") else THROUGHPUT
        return [SPEEDUP, timing, GFLOPS, MEMORY]


# --- loading -------------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def load_sections(paths: Sequence[str]) -> list[Section]:
    """Read results files into sections; a later run of the same preset replaces an earlier one."""
    sections: dict[tuple[str, str, str, str], Section] = {}
    found = 0
    for path in paths:
        data = load_results(path)
        when = str(data.get("datetime", ""))
        for bench in tokred_benchmarks(data):
            found += 1
            info = bench["extra_info"]
            sec = Section(info["task"], info["size"], info["device"], info.get("device_name") or info["device"],
                          info["dtype"])
            sec = sections.setdefault(sec.key, sec)
            for metric in info.get("metrics", []):
                if sec.metric(metric["name"]) is None:
                    sec.metrics.append(dict(metric))
            values = {k: v for k, v in ((k, _number(v)) for k, v in info["quality"].items()) if v is not None}
            for key, *_ in (SPEEDUP, THROUGHPUT, S_PER_IMAGE, GFLOPS, MEMORY):
                value = _number(info.get(key))
                if value is not None:
                    values[key] = value
            options = info.get("options_repr")
            if options is None:
                options = ", ".join(f"{k}={v!r}" for k, v in info["options"].items())
            row = Row(info["method"], info["preset"], options, values, when, path, info)
            previous = next(
                (i for i, r in enumerate(sec.rows) if (r.method, r.preset) == (row.method, row.preset)), None
            )
            if previous is None:
                sec.rows.append(row)
            elif row.datetime >= sec.rows[previous].datetime:
                sec.rows[previous] = row
    if paths and not found:
        raise ResultsError(
            f"{', '.join(paths)}: no tokred benchmarks (no benchmark has extra_info.tokred); write results with "
            "`tokred run` or `pytest benchmarks/test_methods.py --benchmark-json=...`"
        )
    out = sorted(sections.values(), key=lambda s: s.key)
    for sec in out:
        sec.rows.sort(key=lambda r: (not r.is_baseline, -r.values.get("speedup", 0.0), r.method, r.preset))
        mark_pareto(sec)
    return out


# --- Pareto front and best values --------------------------------------------------------------------------


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "higher" else a < b


def mark_pareto(section: Section) -> None:
    """Set ``row.pareto`` for the rows no other row beats in both speedup and the primary quality metric."""
    metric = section.primary_metric()
    for row in section.rows:
        row.pareto = False
    if metric is None:
        return
    name, direction = metric["name"], metric["better"]
    points = [r for r in section.rows if "speedup" in r.values and name in r.values]
    for row in points:
        s, q = row.values["speedup"], row.values[name]
        dominated = any(
            (o.values["speedup"] >= s and not _better(q, o.values[name], direction))
            and (o.values["speedup"] > s or _better(o.values[name], q, direction))
            for o in points
            if o is not row
        )
        row.pareto = not dominated


def fmt(value: float | None, key: str) -> str:
    if value is None:
        return "—"
    if key == "speedup":
        return f"{value:.2f}×"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|") or "—"


def table(section: Section) -> str:
    """The section's pipe table (tabulate), best values in bold, the Pareto front marked."""
    from tabulate import tabulate

    columns = list(section.speed_columns())
    for m in section.quality_metrics():
        unit = f" ({m['unit']})" if m.get("unit") else ""
        columns.append((m["name"], f"{m['name']}{unit}", m["better"]))
    columns = [c for c in columns if c[0] == "speedup" or any(c[0] in r.values for r in section.rows)]
    best: dict[str, str] = {}
    for key, _, direction in columns:
        values = [r.values[key] for r in section.rows if key in r.values]
        if values:
            best[key] = fmt(max(values) if direction == "higher" else min(values), key)
    headers = ["method", "preset", "options", "Pareto"] + [f"{title} {ARROWS[d]}" for _, title, d in columns]
    body = []
    for row in section.rows:
        cells = [_escape(row.method), "—" if row.is_baseline else _escape(row.preset), _escape(row.options),
                 PARETO_MARK if row.pareto else ""]
        for key, _, _ in columns:
            text = fmt(row.values.get(key), key)
            cells.append(f"**{text}**" if key in row.values and text == best.get(key) else text)
        body.append(cells)
    return tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True)


# --- plot ------------------------------------------------------------------------------------------------------


def plot(section: Section, path: str) -> bool:
    """Speedup (x) against the primary quality metric (y), the Pareto front joined; False if nothing to plot."""
    metric = section.primary_metric()
    if metric is None:
        return False
    name = metric["name"]
    rows = [r for r in section.rows if "speedup" in r.values and name in r.values]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    methods = sorted({r.method for r in rows if not r.is_baseline})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    ax.axvline(1.0, color="black", linewidth=0.6, alpha=0.4)
    for i, row in enumerate(sorted(rows, key=lambda r: (r.values["speedup"], r.values[name]))):
        x, y = row.values["speedup"], row.values[name]
        if row.is_baseline:
            ax.scatter([x], [y], marker="s", s=60, color="black", zorder=3, label="baseline")
        else:
            ax.scatter([x], [y], s=36, color=colors[row.method], zorder=3,
                       edgecolors="black" if row.pareto else "none")
        # presets only (the colour gives the method), offsets alternating so neighbours stay readable
        text = "baseline" if row.is_baseline else row.preset
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 5 if i % 2 == 0 else -10), fontsize=7)
    for method in methods:
        ax.scatter([], [], color=colors[method], label=method)
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.values["speedup"])
    if len(front) > 1:
        ax.plot([r.values["speedup"] for r in front], [r.values[name] for r in front], "--", color="grey",
                linewidth=1, zorder=2, label="Pareto front")
    unit = f" ({metric['unit']})" if metric.get("unit") else ""
    ax.set_xlabel("speedup × (vs. baseline, same run)")
    ax.set_ylabel(f"{name}{unit} {ARROWS[metric['better']]}")
    ax.set_title(section.title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


# --- markdown --------------------------------------------------------------------------------------------------


def _unique(values: list[Any]) -> list[Any]:
    out = []
    for v in values:
        if v not in out and v not in (None, ""):
            out.append(v)
    return out


def header(section: Section) -> str:
    infos = [r.info for r in section.rows]
    first = infos[0]
    threads = _unique([i.get("num_threads") for i in infos])
    device = f"`{section.device}` — {section.device_name}"
    if threads and section.device.startswith("cpu"):
        device += f" ({', '.join(map(str, threads))} threads)"
    versions = first.get("versions", {})
    version_text = ", ".join(f"{k} {versions[k]}" for k in ("torch", "diffusers", "timm", "tokred") if versions.get(k))
    dates = sorted(_unique([r.datetime[:10] for r in section.rows]))
    task_info = first.get("task_info", {})
    settings = {k: v for k, v in task_info.items() if k not in ("task", "size", "device", "dtype", "model")}
    lines = [
        f"- **Device**: {device}",
        f"- **dtype**: {section.dtype}",
        f"- **Model**: {first.get('model', '?')} ({section.size})",
        f"- **Versions**: {version_text or 'unknown'}",
        f"- **Date**: {', '.join(dates) or 'unknown'}",
    ]
    if settings:
        lines.append("- **Settings**: " + ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None))
    for command in _unique([i.get("command") for i in infos]):
        lines.append(f"- **Reproduce**: `{command}`")
    return "\n".join(lines)


def published_table(path: str = PUBLISHED_FILE) -> str:
    from tabulate import tabulate

    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    rows = [[r["method"], r["setting"], r["result"], r["source"]] for r in data["rows"]]
    return (
        "## Published results (not measured by us)\n\n"
        f"{data['note']}\n\n" + tabulate(rows, headers=["method", "setting", "published result", "source"],
                                         tablefmt="pipe", disable_numparse=True)
    )


def render(
    sections: list[Section],
    out_path: str,
    command: str | None = None,
    published: bool = True,
    plots: bool = True,
) -> str:
    """The leaderboard markdown; plots are written next to ``out_path`` and linked relatively."""
    out_dir = os.path.dirname(os.path.abspath(out_path))
    parts = [
        "# tokred leaderboard",
        "",
        "Measured by tokred's benchmark harness. **speedup ×**: the baseline's median time over this preset's, "
        "timed in the same rounds (one baseline call before every timed call), so slow drifts of the machine "
        "cancel. Throughput and s/image come from the same median; GFLOPs per image; peak memory of one call "
        "above the memory already allocated. ↑ higher is better, ↓ lower is better; **bold**: best in the "
        f"column; {PARETO_MARK}: on the Pareto front of speedup against the task's primary quality metric.",
    ]
    if command:
        parts += ["", f"Generated with `{command}`."]
    for sec in sections:
        parts += ["", f"## {sec.title}", "", header(sec), "", table(sec)]
        primary = sec.primary_metric()
        if primary is not None:
            parts += ["", f"Primary quality metric (Pareto front): `{primary['name']}` "
                          f"({primary['better']} is better)."]
        if not any(r.is_baseline for r in sec.rows):
            parts += ["", "_No baseline row in these results: speedups are still relative to the baseline timed "
                          "in the same rounds._"]
        image = f"{sec.slug}.png"
        if plots and plot(sec, os.path.join(out_dir, image)):
            parts += ["", f"![speed versus {primary['name']}: {sec.title}]({image})"]
    if published:
        parts += ["", published_table()]
    return "\n".join(parts) + "\n"


def build(
    paths: Sequence[str], out_path: str, command: str | None = None, published: bool = True, plots: bool = True
) -> list[Section]:
    """Read ``paths``, write the markdown to ``out_path`` (atomically) and the plots beside it."""
    sections = load_sections(paths)
    text = render(sections, out_path, command=command, published=published, plots=plots)
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{out_path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, out_path)
    return sections


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokred.leaderboard.generate", description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="results JSON files")
    parser.add_argument("-o", "--output", default="leaderboard/README.md")
    parser.add_argument("--no-published", action="store_true", help="leave out the published-results table")
    args = parser.parse_args(argv)
    try:
        build(args.results, args.output, published=not args.no_published)
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
