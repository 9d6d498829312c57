"""The speed-versus-quality plot of a leaderboard section (matplotlib, Agg backend, PNG).

Speedup (x) against the section's primary quality metric (y). Each method is one curve through its presets in
ladder order (:func:`curves`: mild to strong, the ``preset_order`` the results record), each point with its 95%
intervals as error bars (the paired interval against the baseline where the results have one); the baseline is
a reference: a vertical line at speedup 1 and, where it reports the metric, a horizontal line at its value. No
text sits on the plot: each method has its own colour and marker, the points of a curve grow along the ladder,
and the legend names each curve's presets in order, so labels cannot overlap. Contended rows are drawn hollow;
the Pareto front is a dashed line. A section of more than :data:`BULK_ROWS` rows is drawn in bulk (points and
error bars per colour, no curves). The output is deterministic for the same results: fixed figure size, sorted
drawing order, no timestamps in the PNG.
"""

from __future__ import annotations

import io
from typing import Any

from tokred.bench.files import atomic_write

from .sections import Row, Section

ARROWS = {"higher": "↑", "lower": "↓"}
BULK_ROWS = 100  # a section with more rows is drawn in bulk (see _draw_in_bulk)
MARKERS = ("o", "^", "D", "v", "P", "X", "<", ">", "p", "h")


def plotted_rows(section: Section) -> list[Row]:
    """The rows that have a point in the plot (speedup and the primary quality metric); [] if no plot."""
    metric = section.primary_metric()
    if metric is None:
        return []
    name = metric["name"]
    return [r for r in section.rows if "speedup" in r.values and name in r.values and not r.capped(name)]


def ladder_key(row: Row) -> tuple[Any, ...]:
    """Where a row sits on its method's ladder: its ``preset_order`` (mild to strong), then, for rows without
    one (older files), the FLOPs-ideal speedup and the preset's name."""
    order = row.record.preset_order
    ideal = row.values.get("flops_ideal_speedup", row.values.get("speedup", 0.0))
    return (order is None, order if order is not None else 0, ideal, row.preset, row.identity[2])


def curves(section: Section) -> list[tuple[str, list[Row]]]:
    """The plot's curves: ``[(method, its plotted rows in ladder order)]``, methods by name; the baseline is not
    a curve (it is the reference lines)."""
    by_method: dict[str, list[Row]] = {}
    for row in plotted_rows(section):
        if not row.is_baseline:
            by_method.setdefault(row.method, []).append(row)
    return [(m, sorted(rows, key=ladder_key)) for m, rows in sorted(by_method.items())]


def plot_data(section: Section) -> dict[str, Any]:
    """What the plot draws, as numbers: ``metric``; ``baseline`` (its value of the metric or None); ``curves``:
    ``[{"method", "points": [{"preset", "x", "x_interval", "y", "y_interval", "contended", "pareto"}]}]`` in
    ladder order."""
    metric = section.primary_metric()
    if metric is None:
        return {"metric": None, "baseline": None, "curves": []}
    name = metric["name"]
    base = next((r for r in section.rows if r.is_baseline and name in r.values), None)

    def point(row: Row) -> dict[str, Any]:
        x, y = row.estimates["speedup"], row.estimates.get(name)
        return {"preset": row.preset, "x": row.values["speedup"], "x_interval": x.interval,
                "y": row.values[name], "y_interval": None if y is None else y.interval,
                "contended": row.contended, "pareto": row.pareto}

    return {"metric": name, "baseline": None if base is None else base.values[name],
            "curves": [{"method": m, "points": [point(r) for r in rows]} for m, rows in curves(section)]}


def _errors(row: Row, key: str) -> tuple[list[float], list[float]] | None:
    estimate = row.estimates.get(key)
    if estimate is None or estimate.interval is None:
        return None
    low, high = estimate.interval
    return [max(0.0, estimate.value - low)], [max(0.0, high - estimate.value)]


def _style(row: Row, colors: dict[str, Any]) -> tuple[Any, str, int, Any, Any]:
    """(colour, marker, size, face colour, edge colour) of a row's point."""
    color = "black" if row.is_baseline else colors[row.method]
    face = "none" if row.contended else color
    edge = color if row.contended else ("black" if row.pareto else "none")
    return color, "s" if row.is_baseline else "o", 60 if row.is_baseline else 36, face, edge


def _label(ax: Any, row: Row, i: int, name: str) -> None:
    # presets only (the colour gives the method), offsets alternating so neighbours stay readable
    text = "baseline" if row.is_baseline else row.preset
    if row.contended:
        text += " (contended)"
    ax.annotate(text, (row.values["speedup"], row.values[name]), textcoords="offset points",
                xytext=(4, 5 if i % 2 == 0 else -10), fontsize=7)


def _draw_curves(ax: Any, section: Section, colors: dict[str, Any], name: str) -> None:
    """One curve per method through its presets in ladder order, each point with its error bars; the points
    grow along the ladder; the legend entry (colour and marker) names the presets in order."""
    for j, (method, rows) in enumerate(curves(section)):
        color, marker = colors[method], MARKERS[j % len(MARKERS)]
        xs, ys = [r.values["speedup"] for r in rows], [r.values[name] for r in rows]
        presets = " → ".join(r.preset + (" (contended)" if r.contended else "") for r in rows)
        ax.plot(xs, ys, "-", color=color, linewidth=1.2, alpha=0.8, zorder=2)
        ax.plot([], [], "-", color=color, marker=marker, markersize=6, label=f"{method}: {presets}")
        for k, row in enumerate(rows):
            xerr, yerr = _errors(row, "speedup"), _errors(row, name)
            if xerr or yerr:
                ax.errorbar([xs[k]], [ys[k]], xerr=None if xerr is None else [xerr[0], xerr[1]],
                            yerr=None if yerr is None else [yerr[0], yerr[1]], fmt="none", ecolor=color,
                            elinewidth=0.8, capsize=2, alpha=0.6, zorder=2)
            face = "none" if row.contended else color
            edge = color if row.contended else ("black" if row.pareto else color)
            ax.scatter([xs[k]], [ys[k]], marker=marker, s=24 + 22 * k, facecolors=face, edgecolors=edge,
                       linewidths=1.0, zorder=3)


def _bulk_errors(rows: list[Row], key: str) -> list[list[float]] | None:
    """[[below...], [above...]] of ``rows`` (NaN where a row has no interval: no bar); None if none has one."""
    nan = float("nan")
    errors = [_errors(r, key) for r in rows]
    if all(e is None for e in errors):
        return None
    return [[nan if e is None else e[0][0] for e in errors], [nan if e is None else e[1][0] for e in errors]]


def _draw_in_bulk(ax: Any, ordered: list[Row], colors: dict[str, Any], name: str) -> None:
    """Many rows (more than :data:`BULK_ROWS`): one set of error bars per colour and one scatter per point style
    (a call per row made 2,000 rows take most of a minute), and labels on the baseline and the Pareto front only
    (a label on every point would be unreadable)."""
    by_color: dict[Any, list[Row]] = {}
    by_style: dict[tuple[Any, ...], list[Row]] = {}
    for row in ordered:
        color, marker, size, face, edge = _style(row, colors)
        by_color.setdefault(color, []).append(row)
        by_style.setdefault((row.is_baseline, color, marker, size, face, edge), []).append(row)
    for color, group in by_color.items():
        xerr, yerr = _bulk_errors(group, "speedup"), _bulk_errors(group, name)
        if xerr or yerr:
            ax.errorbar([r.values["speedup"] for r in group], [r.values[name] for r in group], xerr=xerr, yerr=yerr,
                        fmt="none", ecolor=color, elinewidth=0.8, capsize=2, alpha=0.7, zorder=2)
    for (baseline, _, marker, size, face, edge), group in by_style.items():
        ax.scatter([r.values["speedup"] for r in group], [r.values[name] for r in group], marker=marker, s=size,
                   facecolors=face, edgecolors=edge, zorder=3, label="baseline" if baseline else None)
    for i, row in enumerate(ordered):
        if row.is_baseline or row.pareto:
            _label(ax, row, i, name)


def plot(section: Section, path: str) -> bool:
    """Write the section's plot to ``path`` (atomically); False if it has nothing to plot."""
    rows = plotted_rows(section)
    if not rows:
        return False
    metric = section.primary_metric()
    name = metric["name"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bulk = len(rows) > BULK_ROWS
    fig, ax = plt.subplots(figsize=(6.4, 4.4) if bulk else (7.6, 5.6), dpi=110)
    methods = sorted({r.method for r in rows if not r.is_baseline})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    ordered = sorted(rows, key=lambda r: (r.values["speedup"], r.values[name], r.method, r.preset))
    # Every errorbar/scatter call would autoscale the view over all the artists added so far (quadratic: most of
    # the time of a section of 2,000 rows); the view is autoscaled once, from the same data, after the points.
    ax.set_autoscale_on(False)
    if bulk:
        ax.axvline(1.0, color="black", linewidth=0.6, alpha=0.4)
        _draw_in_bulk(ax, ordered, colors, name)
    else:
        base = next((r for r in section.rows if r.is_baseline), None)
        if base is not None and name in base.values:
            ax.scatter([base.values["speedup"]], [base.values[name]], marker="s", s=60, color="black", zorder=3)
        _draw_curves(ax, section, colors, name)
    ax.set_autoscale_on(True)
    ax.autoscale_view()
    if not bulk:  # the baseline: reference lines (after autoscaling: they do not widen the view)
        base = next((r for r in section.rows if r.is_baseline), None)
        own = base is None or name in base.values  # PSNR is measured against the baseline's own images
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle=":",
                   label="baseline (speedup 1)" if own else f"baseline (speedup 1; {name} is measured against it)")
        if base is not None and name in base.values:
            ax.axhline(base.values[name], color="black", linewidth=0.8, linestyle="-.",
                       label=f"baseline {name} {fmt_value(base.values[name])}")
    else:
        for method in methods:
            ax.scatter([], [], color=colors[method], label=method)
    front = sorted((r for r in rows if r.pareto), key=lambda r: (r.values["speedup"], r.values[name]))
    if len(front) > 1:
        ax.plot([r.values["speedup"] for r in front], [r.values[name] for r in front], "--", color="grey",
                linewidth=1, zorder=1, label="Pareto front")
    unit = f" ({metric['unit']})" if metric.get("unit") else ""
    ax.set_xlabel("speedup × (vs. baseline, same rounds; bars: 95% intervals)")
    paired = any(name in (r.record.quality_delta or {}) for r in rows)
    ax.set_ylabel(f"{name}{unit} {ARROWS[metric['better']]}" + (" (bars: paired with the baseline)" if paired
                                                                  else ""))
    ax.set_title(section.title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if bulk:
        ax.legend(fontsize=7, loc="best")
    else:  # below the axes, one entry per curve: never over a point, never over another label
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    save_figure(fig, path)
    return True


def fmt_value(value: float) -> str:
    return f"{value:.4g}"


def save_figure(fig: Any, path: str) -> None:
    """Write ``fig`` as a PNG to ``path`` atomically (no software stamp: the same figure gives the same bytes)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic_write(path, buffer.getvalue(), purpose="plot")
