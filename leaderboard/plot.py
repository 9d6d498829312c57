"""The speed-versus-quality plot of a leaderboard section (matplotlib, Agg backend, PNG).

Speedup (x) against the section's primary quality metric (y), each point with its 95% intervals as error bars,
the Pareto front joined, contended rows drawn hollow. The output is deterministic for the same results: fixed
figure size, sorted drawing order, no timestamps in the PNG.
"""

from __future__ import annotations

import io

from tokred.bench.files import atomic_write

from .sections import Row, Section

ARROWS = {"higher": "↑", "lower": "↓"}


def plotted_rows(section: Section) -> list[Row]:
    """The rows that have a point in the plot (speedup and the primary quality metric); [] if no plot."""
    metric = section.primary_metric()
    if metric is None:
        return []
    name = metric["name"]
    return [r for r in section.rows if "speedup" in r.values and name in r.values and not r.capped(name)]


def _errors(row: Row, key: str) -> tuple[list[float], list[float]] | None:
    estimate = row.estimates.get(key)
    if estimate is None or estimate.interval is None:
        return None
    low, high = estimate.interval
    return [max(0.0, estimate.value - low)], [max(0.0, high - estimate.value)]


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

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    methods = sorted({r.method for r in rows if not r.is_baseline})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    ax.axvline(1.0, color="black", linewidth=0.6, alpha=0.4)
    ordered = sorted(rows, key=lambda r: (r.values["speedup"], r.values[name], r.method, r.preset))
    for i, row in enumerate(ordered):
        x, y = row.values["speedup"], row.values[name]
        color = "black" if row.is_baseline else colors[row.method]
        xerr, yerr = _errors(row, "speedup"), _errors(row, name)
        if xerr or yerr:
            ax.errorbar([x], [y], xerr=None if xerr is None else [xerr[0], xerr[1]],
                        yerr=None if yerr is None else [yerr[0], yerr[1]], fmt="none", ecolor=color,
                        elinewidth=0.8, capsize=2, alpha=0.7, zorder=2)
        marker = "s" if row.is_baseline else "o"
        face = "none" if row.contended else color
        edge = color if row.contended else ("black" if row.pareto else "none")
        ax.scatter([x], [y], marker=marker, s=60 if row.is_baseline else 36, facecolors=face, edgecolors=edge,
                   zorder=3, label="baseline" if row.is_baseline else None)
        # presets only (the colour gives the method), offsets alternating so neighbours stay readable
        text = "baseline" if row.is_baseline else row.preset
        if row.contended:
            text += " (contended)"
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 5 if i % 2 == 0 else -10), fontsize=7)
    for method in methods:
        ax.scatter([], [], color=colors[method], label=method)
    front = sorted((r for r in rows if r.pareto), key=lambda r: (r.values["speedup"], r.values[name]))
    if len(front) > 1:
        ax.plot([r.values["speedup"] for r in front], [r.values[name] for r in front], "--", color="grey",
                linewidth=1, zorder=1, label="Pareto front")
    unit = f" ({metric['unit']})" if metric.get("unit") else ""
    ax.set_xlabel("speedup × (vs. baseline, same rounds; bars: 95% intervals)")
    ax.set_ylabel(f"{name}{unit} {ARROWS[metric['better']]}")
    ax.set_title(section.title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic_write(path, buffer.getvalue(), purpose="plot")
    return True
