"""The "speedup against resolution" leaderboard section: how a method's speedup grows with the number of tokens.

Runs at ``--size arch`` write one case per (method, preset, resolution). :func:`scaling_groups` gathers the
tokred benchmarks that share a task, architecture, size, hardware (device name), dtype, threads and timed unit
and cover at least two resolutions; :func:`scaling_markdown` renders one group as a table (a row per method and
preset, a column per resolution) followed by the published scaling points for its architecture
(``published.json``, key ``"scaling"``), which are never mixed with the measured cells; :func:`scaling_plot`
draws the measured speedups and their FLOPs-ideal counterparts against resolution.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from tokred.bench.compiled import label_of

from .plot import save_figure
from .sections import method_kind

# the unit of a cache timed over its cycle: "cycle of 3 denoiser calls" (group: its per-call unit, "denoiser call")
CYCLE = re.compile(r"^cycle of \d+ (.+)s$")
PUBLISHED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published.json")
MISSING = "—"
# How the title names an architecture (the ``architecture`` setting of the arch tasks); others print bare.
ARCHITECTURES = {"sd15": "SD1.5 U-Net", "sdxl": "SDXL U-Net", "sd3": "SD3 MMDiT"}


@dataclass
class ScalingGroup:
    task: str
    size: str
    architecture: str | None
    device_name: str
    dtype: str
    threads: int | None
    unit: str | None
    # (method, preset) -> resolution -> that case's extra_info
    cells: dict[tuple[str, str], dict[int, dict[str, Any]]] = field(default_factory=dict)
    compiled: str = ""  # a compiled run's label (tokred.bench.compiled): never mixed with eager cells

    @property
    def resolutions(self) -> list[int]:
        return sorted({res for by_res in self.cells.values() for res in by_res})

    @property
    def rows(self) -> list[tuple[str, str]]:
        """The (method, preset) rows that have a speedup to show: every one but the baseline, sorted."""
        return sorted(key for key in self.cells if key[0] != "baseline")

    def kind(self, method: str, preset: str) -> str:
        """The row's method kind (its results' ``method_kind``, else the registry's)."""
        infos = list(self.cells.get((method, preset), {}).values())
        return method_kind(method, infos[-1].get("method_kind") if infos else None)

    def cycles(self) -> list[str]:
        """The cycle units of the group's cells (a cache timed over its cycle of calls), distinct, sorted."""
        return sorted({str(i["unit"]) for by_res in self.cells.values() for i in by_res.values()
                       if CYCLE.match(str(i.get("unit") or ""))})

    @property
    def title(self) -> str:
        arch = self.architecture or "unknown architecture"
        if self.architecture in ARCHITECTURES:
            arch += f" ({ARCHITECTURES[self.architecture]})"
        threads = "?" if self.threads is None else self.threads
        compiled = f", {self.compiled}" if self.compiled else ""
        return (f"Speedup against resolution: {arch} on {self.device_name}, {self.dtype}, {threads} threads"
                f"{compiled}, unit: {self.unit or 'not recorded'}")

    @property
    def slug(self) -> str:
        text = f"scaling-{self.task}-{self.size}-{self.architecture}-{self.device_name}-{self.dtype}-{self.threads}"
        text += f"-{self.compiled}" if self.compiled else ""
        return re.sub(r"[^a-z0-9]+", "-", f"{text}-{self.unit}".lower()).strip("-")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _setting(info: dict[str, Any], key: str) -> Any:
    """A top-level ``extra_info`` key, else the same key in ``task_info``."""
    value = info.get(key)
    return value if value is not None else (info.get("task_info") or {}).get(key)


def scaling_groups(benchmarks: list[dict[str, Any]]) -> list[ScalingGroup]:
    """Group tokred benchmark entries (pytest-benchmark's ``benchmarks`` list) by task, architecture, size,
    device name, dtype, threads and unit; only groups with at least two resolutions are returned. Entries
    without a resolution are left out; when one (method, preset, resolution) appears twice the later entry wins,
    so pass the entries of older files first."""
    groups: dict[tuple[Any, ...], ScalingGroup] = {}
    for bench in benchmarks:
        info = bench.get("extra_info")
        if not isinstance(info, dict) or "tokred" not in info:
            continue
        resolution = _setting(info, "resolution")
        if isinstance(resolution, bool) or not isinstance(resolution, int):
            continue
        threads = info.get("threads", info.get("num_threads"))
        # a cache timed over a cycle of n calls ("cycle of 3 denoiser calls") belongs with the per-call rows
        unit = info.get("unit")
        cycle = CYCLE.match(str(unit or ""))
        group = ScalingGroup(info["task"], info.get("size", "?"), _setting(info, "architecture"),
                             info.get("device_name") or info.get("device", "?"), info["dtype"],
                             threads if isinstance(threads, int) and not isinstance(threads, bool) else None,
                             cycle.group(1) if cycle else unit, compiled=label_of(info.get("compile")))
        key = (group.task, group.size, group.architecture or "", group.device_name, group.dtype,
               -1 if group.threads is None else group.threads, group.unit or "", group.compiled)
        group = groups.setdefault(key, group)
        group.cells.setdefault((info["method"], info["preset"]), {})[resolution] = info
    return [groups[k] for k in sorted(groups) if len(groups[k].resolutions) >= 2]


def cell_values(group: ScalingGroup, row: tuple[str, str], resolution: int) -> dict[str, Any] | None:
    """speedup, its interval, FLOPs-ideal speedup, efficiency and contention of one cell; None if not measured.
    FLOPs-ideal falls back to the baseline's GFLOPs at the same resolution over the row's, efficiency to
    speedup over FLOPs-ideal."""
    info = group.cells.get(row, {}).get(resolution)
    speedup = None if info is None else _number(info.get("speedup"))
    if speedup is None:
        return None
    ideal = _number(info.get("flops_ideal_speedup"))
    if ideal is None:
        baselines = [by_res[resolution] for (m, _), by_res in group.cells.items() if m == "baseline"
                     and resolution in by_res]
        base = _number(baselines[-1].get("gflops")) if baselines else None
        base = base if base is not None else _number(info.get("baseline_gflops"))
        own = _number(info.get("gflops"))
        ideal = base / own if base and own else None
    efficiency = _number(info.get("efficiency"))
    if efficiency is None and ideal:
        efficiency = speedup / ideal
    ci = info.get("speedup_ci")
    interval = (float(ci[0]), float(ci[1])) if isinstance(ci, list | tuple) and len(ci) == 2 else None
    return {"speedup": speedup, "ci": interval, "ideal": ideal, "efficiency": efficiency,
            "contended": bool(info.get("contended"))}


def format_cell(values: dict[str, Any] | None) -> str:
    """``1.39× [1.31, 1.45] · ideal 1.52× · 91%``, ``(contended)`` appended when it was; ``—`` when missing."""
    if values is None:
        return MISSING
    text = f"{values['speedup']:.2f}×"
    if values["ci"] is not None:
        text += f" [{values['ci'][0]:.2f}, {values['ci'][1]:.2f}]"
    if values["ideal"] is not None:
        text += f" · ideal {values['ideal']:.2f}×"
    if values["efficiency"] is not None:
        text += f" · {values['efficiency']:.0%}"
    return text + (" (contended)" if values["contended"] else "")


def published_scaling(architecture: str | None, path: str = PUBLISHED_FILE) -> list[dict[str, Any]]:
    """The published scaling points (``published.json``'s ``"scaling"``) for ``architecture``."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return [p for p in data.get("scaling", []) if architecture is not None and p["architecture"] == architecture]


def _resolution_text(resolution: int | list[int]) -> str:
    if isinstance(resolution, list):
        return "–".join(f"{r}²" for r in resolution)
    return f"{resolution}²"


def scaling_markdown(group: ScalingGroup, plot_path: str | None, published_path: str = PUBLISHED_FILE) -> str:
    """The group's markdown section: title, table, the plot's link (if ``plot_path``) and the published points
    for its architecture (if any)."""
    from tabulate import tabulate

    resolutions = group.resolutions
    table = [[method, group.kind(method, preset), preset]
             + [format_cell(cell_values(group, (method, preset), res)) for res in resolutions]
             for method, preset in group.rows]
    parts = [
        f"### {group.title}",
        "",
        "Per resolution (image side, px): speedup × [95% interval] · FLOPs-ideal speedup · efficiency (speedup "
        "over FLOPs-ideal). (contended): the machine was busy while that cell was timed.",
        "",
        tabulate(table, headers=["method", "kind", "preset"] + [f"{r}²" for r in resolutions], tablefmt="pipe",
                 disable_numparse=True),
    ]
    if group.cycles():
        parts += ["", f"Caches are timed over a whole cycle of their calls ({', '.join(group.cycles())}), the "
                      "baseline's calls alike; their FLOPs are the cycle's mean per call."]
    if plot_path:
        parts += ["", f"![{group.title}]({plot_path})"]
    points = published_scaling(group.architecture, published_path)
    if points:
        rows = [[p["method"], p.get("kind", ""), p.get("setting", ""), p["hardware"], _resolution_text(p["resolution"]),
                 p.get("speedup_text") or f"{p['speedup']:.2f}×", f"[{p['source']}]({p['url']})", p.get("note", "")]
                for p in points]
        parts += ["", "#### Published scaling points (not measured by us)", "",
                  "Reported by others on their own hardware and models; not comparable with the measured cells.", "",
                  tabulate(rows, headers=["method", "kind", "setting", "hardware", "resolution", "published speedup",
                                          "source", "note"], tablefmt="pipe", disable_numparse=True)]
    return "\n".join(parts)


def scaling_plot(group: ScalingGroup, path: str) -> None:
    """Speedup (with its 95% interval) against resolution per method and preset, solid; its FLOPs-ideal speedup
    dashed in the same colour; contended points hollow. Written atomically to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.8, 4.4), dpi=110)
    ax.axhline(1.0, color="black", linewidth=0.8, alpha=0.5, label="baseline (1.0×)")
    n = len(group.rows)
    for i, row in enumerate(group.rows):
        color = plt.cm.tab10(i % 10)
        points = [(res, v) for res in group.resolutions if (v := cell_values(group, row, res)) is not None]
        if not points:
            continue
        # each method a little to the side of the others (log x): the intervals at one resolution stay apart
        dodge = 2 ** (0.035 * (i - (n - 1) / 2))
        xs = [res * dodge for res, _ in points]
        ys = [v["speedup"] for _, v in points]
        low = [v["speedup"] - v["ci"][0] if v["ci"] else 0.0 for _, v in points]
        high = [v["ci"][1] - v["speedup"] if v["ci"] else 0.0 for _, v in points]
        ax.errorbar(xs, ys, yerr=[[max(0.0, e) for e in low], [max(0.0, e) for e in high]], fmt="-o",
                    color=color, capsize=3, markersize=5, label=f"{row[0]} {row[1]}")
        hollow = [(res * dodge, v["speedup"]) for res, v in points if v["contended"]]
        if hollow:
            ax.scatter(*zip(*hollow, strict=True), s=30, facecolors="white", edgecolors=color, zorder=3)
        ideal = [(res * dodge, v["ideal"]) for res, v in points if v["ideal"] is not None]
        if ideal:
            ax.plot(*zip(*ideal, strict=True), "--", color=color, linewidth=1)
    ax.plot([], [], "--", color="grey", linewidth=1, label="FLOPs-ideal (dashed, the method's colour)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(group.resolutions, [str(r) for r in group.resolutions])
    ax.minorticks_off()
    ax.set_xlabel("resolution (px, image side)")
    ax.set_ylabel("speedup × (bars: 95% intervals; hollow: contended)")
    ax.set_title(group.title.replace(" on ", "\non ", 1), fontsize=8)
    ax.grid(True, alpha=0.3)
    # beside the axes, not over the points
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    save_figure(fig, path)
