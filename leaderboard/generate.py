"""Build the leaderboard (markdown + speed-versus-quality plots) from benchmark results files.

Input: any number of results files in pytest-benchmark's JSON layout, written by ``tokred run`` or by
``pytest benchmarks/ --benchmark-json=...`` (see :mod:`tokred.bench.results`); benchmarks without tokred's
``extra_info`` (other benchmark files) are ignored.

Output, all beside the markdown file:

* the markdown: one section per comparable set of rows (:mod:`tokred.leaderboard.sections`: task, size, model,
  hardware, dtype, threads and task settings), each with a header (device, model, versions, date, settings, the
  ``tokred run`` command that reproduces it, the results file it comes from), a table in tabulate's ``pipe``
  format (the baseline, then every preset by speedup: measured speedup with its 95% interval, FLOPs-ideal
  speedup, efficiency, timing, GFLOPs, memory, tokens per block where recorded, and the quality metrics with
  their intervals), marks that respect the noise (:mod:`tokred.leaderboard.ranking`), the contended rows and
  the results' notes;
* a PNG plot per section (:mod:`tokred.leaderboard.plot`);
* ``results/``: a byte copy of every results file read, so that the markdown can be rebuilt from what is beside
  it (its last line says how); the markdown depends only on those files, never on the date or the command line.

Published numbers from the papers (``published.json``) go in a separate table labelled "published (not
measured by us)", never mixed with measured rows.

Run: ``tokred leaderboard results/*.json -o leaderboard/README.md`` or
``python -m tokred.leaderboard.generate results/*.json -o leaderboard/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from tokred.bench.files import OutputError, OutputLock, atomic_write, check_writable_file
from tokred.bench.results import ResultsError, load_results

from .plot import ARROWS, plot, plotted_rows
from .scaling import ScalingGroup, scaling_groups, scaling_markdown, scaling_plot
from .sections import Row, Section, compiled_pairs, load_sections

PUBLISHED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published.json")
RESULTS_FOLDER = "results"
PARETO_MARK, TIE_MARK, CONTENDED_MARK = "★", "≈", "⚠ contended"
SOURCES_COMMENT = "tokred-leaderboard"  # <!-- tokred-leaderboard {...} -->: what the markdown was built from

__all__ = ["build", "load_sections", "render", "main", "sources_of"]

INTRO = (
    "Measured by tokred's benchmark harness. **speedup ×**: the median over the timed rounds of the baseline's "
    "time over the method's in the same round (the two alternate; warm-up rounds dropped), with its 95% "
    "bootstrap interval in brackets. **FLOPs-ideal ×**: the baseline's GFLOPs over the method's, the speedup if "
    "time followed FLOPs; **efficiency**: measured speedup over FLOPs-ideal. s/image and throughput come from "
    "the median call; GFLOPs per image; peak memory of one call above the memory already allocated. Quality "
    "metrics carry their 95% interval (a bootstrap over images for FID, KID, CLIP score, PSNR and SSIM; Wilson "
    "intervals for accuracies and agreement). Where a case was compared with the baseline on the same images "
    "(results of schema 4), its quality cell also gives **Δ**, the difference from the baseline, with its 95% "
    "paired interval: a bootstrap over images for per-image scores; for accuracies and agreement Bonett and "
    "Price's adjusted Wald interval for paired proportions, in percentage points, held to McNemar's exact test "
    "(it holds 0 where the test does not reject). ↑ higher is better, ↓ lower is better; — not reported (the "
    "baseline's fidelity to itself is not a measurement)."
)
MARKS = (
    "Marks respect the noise. **Bold**: best in its column, and its 95% interval overlaps no other row's interval. "
    f"{TIE_MARK}: tied for best: the best value's interval overlaps these rows' intervals, so none of them is bold. "
    f"{PARETO_MARK}: on the Pareto front of speedup against the section's primary quality metric: no other row is "
    "better on one of the two with the intervals apart and at least as good on the other. A column where every row "
    f"ties with the best carries no marks and is named under the table. {CONTENDED_MARK}: the machine was busy while "
    "the row was timed; its speedup does not compete and the row carries no marks. Busy means (results of schema 6) "
    "that other processes used more CPU during the row's timed rounds than the cores the row left idle plus a quarter"
    " of a core (the non-idle CPU time in /proc/stat of the cores the timing process may run on, less its own; "
    "recorded as `others_cpu`), or that the timing process got less than 75% of its threads' CPU time; older results "
    "judged the 1-minute load average against the cores, which counts the benchmark's own threads and lags by a "
    "minute. GFLOPs and memory are exact counts (equal values tie); throughput and s/image are not ranked (the paired"
    " speedup is); values at a cap (PSNR of identical images) and values without intervals (results files of schema "
    "1) are not ranked. A quality column with Δ intervals is ranked on them: a row's interval is the baseline's value"
    " plus its Δ interval and the baseline's value counts as exact, so a row ties with the baseline exactly when its "
    "Δ interval holds 0."
)


# --- cells -----------------------------------------------------------------------------------------------------


def fmt(value: float | None, key: str = "") -> str:
    if value is None:
        return "—"
    if key in ("speedup", "flops_ideal_speedup"):
        return f"{value:.2f}×"
    if key == "efficiency":
        return f"{100 * value:.0f}%"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"


def _bound(value: float, key: str) -> str:
    return f"{value:.2f}" if key == "speedup" else fmt(value, key)


def _signed(value: float) -> str:
    text = fmt(abs(value))
    return text if text.strip("0.,") == "" else ("−" if value < 0 else "+") + text


def cell(row: Row, key: str) -> str:
    """A row's value in column ``key``: point estimate, interval (a quality metric's own, over the images), the
    paired difference from the baseline (Δ, where recorded), cap and mark."""
    value = row.values.get(key)
    if value is None:
        return "—"
    text = fmt(value, key)
    estimate = row.estimates.get(key)
    if row.capped(key):
        return f"{text} (cap)"
    own = (row.record.quality_ci or {}).get(key) if key in row.record.quality else None
    interval = tuple(own) if own is not None else (estimate.interval if estimate is not None else None)
    if interval is not None and interval[0] != interval[1]:
        low, high = interval
        text += f" [{_bound(low, key)}, {_bound(high, key)}]"
    delta = (row.record.quality_delta or {}).get(key)
    if delta is not None:
        text += f" Δ {_signed(delta[0])} [{_signed(delta[1])}, {_signed(delta[2])}]"
    mark = row.marks.get(key)
    if mark == "bold":
        return f"**{text}**"
    if mark == "tied":
        return f"{text} {TIE_MARK}"
    return text


def tokens_summary(row: Row) -> str:
    """``q 98 · kv 98 · mlp 90 of 197 (12/12 blocks)``: mean query, key/value and MLP tokens over the blocks
    where any of them is below the tokens entering the block, against those entering tokens."""
    tokens = row.record.tokens
    if not tokens:
        return "—"
    blocks = list(tokens.values())
    reduced = [b for b in blocks if min(b["attn"], b["kv"], b["mlp"]) < b["tokens"] - 1e-9]
    if not reduced:
        return f"no reduction ({len(blocks)} blocks)"

    def mean(field: str) -> float:
        return sum(b[field] for b in reduced) / len(reduced)

    return (f"q {mean('attn'):.0f} · kv {mean('kv'):.0f} · mlp {mean('mlp'):.0f} of {mean('tokens'):.0f} "
            f"({len(reduced)}/{len(blocks)} blocks)")


def _escape(text: str) -> str:
    return text.replace("|", "\\|") or "—"


def table(section: Section) -> str:
    """The section's pipe table (tabulate)."""
    from tabulate import tabulate

    columns: list[tuple[str, str, str | None]] = list(section.speed_columns())
    for m in section.quality_metrics():
        unit = f" ({m['unit']})" if m.get("unit") else ""
        columns.append((m["name"], f"{m['name']}{unit}", m["better"]))
    columns = [c for c in columns if c[0] == "speedup" or any(c[0] in r.values for r in section.rows)]
    with_tokens = any(r.record.tokens for r in section.rows)
    headers = ["method", "kind", "preset", "options", "Pareto"]
    headers += [f"{title} {ARROWS[d]}" if d else title for _, title, d in columns]
    if with_tokens:
        headers.append("tokens per block")
    body = []
    for row in section.rows:
        flag = CONTENDED_MARK if row.contended else (PARETO_MARK if row.pareto else "")
        cells = [_escape(row.method), row.kind, "—" if row.is_baseline else _escape(row.preset),
                 _escape(row.options), flag]
        cells += [cell(row, key) for key, _, _ in columns]
        if with_tokens:
            cells.append(tokens_summary(row))
        body.append(cells)
    return tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True)


# --- markdown --------------------------------------------------------------------------------------------------


def _unique(values: list[Any]) -> list[Any]:
    """The values in their first order, once each, without None and "" (linear: a row's values are hashable)."""
    return [v for v in dict.fromkeys(values) if v is not None and v != ""]


def _setting(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def header(section: Section) -> str:
    records = [r.record for r in section.rows]
    first = records[0]
    device = f"`{section.device}` — {section.device_name}"
    if section.threads and section.device.startswith("cpu"):
        cores = _unique([r.cpu_count for r in records])
        device += f" ({section.threads} threads" + (f" of {', '.join(map(str, cores))} cores)" if cores else ")")
    versions = first.versions or {}
    version_text = ", ".join(f"{k} {versions[k]}" for k in ("torch", "diffusers", "timm", "tokred") if versions.get(k))
    dates = sorted(_unique([r.datetime[:10] for r in section.rows]))
    lines = [
        f"- **Device**: {device}",
        f"- **dtype**: {section.dtype}",
        f"- **Model**: {section.model} ({section.size})",
        f"- **Versions**: {version_text or 'unknown'}",
        f"- **Date**: {', '.join(dates) or 'unknown'}",
    ]
    if section.settings:
        lines.append("- **Settings**: " + ", ".join(f"{k}={_setting(v)}" for k, v in section.settings.items()))
    for command in _unique([r.command for r in records]):
        lines.append(f"- **Reproduce**: `{command}`")
    sources = _unique([r.source for r in section.rows])
    lines.append("- **Results**: " + ", ".join(f"[`{s}`]({s})" for s in sources))
    return "\n".join(lines)


def section_notes(section: Section) -> list[str]:
    """The paragraphs under a section's table: primary metric, contended rows, the results' notes, caveats."""
    parts = []
    primary = section.primary_metric()
    if primary is not None:
        text = f"Primary quality metric (Pareto front): `{primary['name']}` ({primary['better']} is better)"
        parts.append(f"{text}: {primary['note']}." if primary.get("note") else f"{text}.")
    elif not any(r.record.quality for r in section.rows):
        parts.append("Speed only: the real architecture with random weights (`--size arch`), so no quality "
                     "metrics and no Pareto front.")
    if not any(r.is_baseline for r in section.rows):
        parts.append("_No baseline row in these results: speedups are still relative to the baseline timed in the "
                     "same rounds._")
    contended = section.contended_rows
    if contended:
        reasons = "; ".join(
            f"{r.label}: {', '.join(r.record.contention or ['machine busy'])}" for r in contended
        )
        parts.append(f"{CONTENDED_MARK} ({len(contended)} of {len(section.rows)} rows; not ranked): {reasons}.")
    if section.inseparable:
        titles = {m["name"]: m["name"] for m in section.metrics} | {k: t for k, t, _ in section.speed_columns()}
        names = ", ".join(titles.get(k, k) for k in section.inseparable)
        parts.append(f"Not separable (every row's interval overlaps the best's, so nothing is marked): {names}.")
    if not section.has_intervals:
        parts.append("_Some rows have no 95% intervals (results of schema 1): their columns are not ranked._")
    for note in _unique([n for r in section.rows for n in r.record.notes or []]):
        parts.append(f"Note: {note}")
    if section.compiled:
        parts.append(compiled_note(section))
    return parts


def compiled_note(section: Section) -> str:
    """Under a compiled section: what was compiled, that the speedup is over the compiled baseline, and each
    row's compile time (excluded from the timed rounds), recompiles and graph breaks."""
    rows = []
    for r in section.rows:
        info = r.record.compile or {}
        if "compile_s" not in info:
            continue
        text = f"{r.label} {float(info['compile_s']):.1f} s"
        counts = [f"{k.replace('_', ' ')} {info[k]}" for k in ("recompiles", "graph_breaks", "timed_compilations")
                  if info.get(k)]
        rows.append(text + (f" ({', '.join(counts)})" if counts else ""))
    how = section.compiled.removeprefix("compiled ")
    return (f"Compiled: the timed module under `torch.compile` {how}, the baseline's as every "
            "method's, compiled and warmed up before the timed rounds; the speedup is the method compiled over the "
            "baseline compiled. Compile time (not in the timed rounds; later cases and worker processes may find "
            "inductor's on-disk cache): " + ("; ".join(rows) or "not recorded") + ".")


def comparison_table(compiled: Section, eager: Section) -> str:
    """Eager speedup (over the eager baseline) beside compiled speedup (over the compiled baseline), per row of
    the compiled section and of the eager one, with their intervals."""
    from tabulate import tabulate

    eager_rows = {r.identity: r for r in eager.rows if not r.is_baseline}
    compiled_rows = {r.identity: r for r in compiled.rows if not r.is_baseline}
    base_eager, base_compiled = (next((r for r in s.rows if r.is_baseline), None) for s in (eager, compiled))
    lines = []
    for identity in sorted(set(eager_rows) | set(compiled_rows)):
        e, c = eager_rows.get(identity), compiled_rows.get(identity)
        label = (e or c).label  # type: ignore[union-attr]
        lines.append([label, cell_plain(e, "speedup"), cell_plain(c, "speedup"), cell_plain(e, "s_per_image"),
                      cell_plain(c, "s_per_image")])
    lines.insert(0, ["baseline", "1.00×", "1.00×", cell_plain(base_eager, "s_per_image"),
                     cell_plain(base_compiled, "s_per_image")])
    how = compiled.compiled.removeprefix("compiled ").strip("()")
    headers = ["method", "eager speedup (over the eager baseline)",
               f"compiled speedup ({how}; over the compiled baseline)",
               "eager s/image", "compiled s/image"]
    # the eager section's full title: one table per resolution or model, each named apart
    title = f"### Eager against compiled: {eager.title}"
    note = ("Each column is its own run (its own processes and rounds): compare the speedups, each over its own "
            "baseline; the s/image of the two columns come from different processes.")
    return f"{title}\n\n" + tabulate(lines, headers=headers, tablefmt="github") + f"\n\n{note}"


def cell_plain(row: Row | None, key: str) -> str:
    """A row's value with its interval, without marks ("not measured" for a missing row)."""
    if row is None:
        return "not measured"
    value = row.values.get(key)
    if value is None:
        return "—"
    text = fmt(value, key)
    estimate = row.estimates.get(key)
    if estimate is not None and estimate.interval is not None and estimate.interval[0] != estimate.interval[1]:
        text += f" [{_bound(estimate.interval[0], key)}, {_bound(estimate.interval[1], key)}]"
    return text


def sources_of(markdown: str) -> dict[str, Any] | None:
    """What a leaderboard markdown was built from: ``{"sources": [...], "published": bool}`` (paths relative to
    the markdown's folder), read from its ``<!-- tokred-leaderboard ... -->`` line; None if it has none."""
    match = re.search(rf"<!-- {SOURCES_COMMENT} (\{{.*\}}) -->", markdown)
    return json.loads(match.group(1)) if match else None


def render(sections: list[Section], sources: Sequence[str], published: bool = True,
           scaling: Sequence[ScalingGroup] = ()) -> str:
    """The leaderboard markdown. ``sources``: the results files (relative to the markdown's folder); ``scaling``:
    the speedup-against-resolution groups (:mod:`tokred.leaderboard.scaling`)."""
    parts = ["# tokred leaderboard", "", INTRO, "", MARKS]
    if not sections:
        parts += ["", "_No measured results yet: `tokred bench` (README command 1) runs every task and writes this "
                      "file._"]
    for sec in sections:
        parts += ["", f"## {sec.title}", "", header(sec), "", table(sec)]
        notes = section_notes(sec)
        for note in notes:
            parts += ["", note]
        if plotted_rows(sec):
            parts += ["", f"![speed versus {sec.primary_metric()['name']}: {sec.title}]({sec.slug}.png)"]
    for compiled, eager in compiled_pairs(sections):
        parts += ["", comparison_table(compiled, eager)]
    for group in scaling:
        parts += ["", scaling_markdown(group, f"{group.slug}.png").rstrip("\n")]
    if published:
        parts += ["", published_table()]
    names = sorted(sources)
    command = shlex.join(["tokred", "leaderboard", *names, "-o", "README.md"] + ([] if published else
                                                                                   ["--no-published"]))
    parts += ["", "---", ""]
    if names:
        parts.append(f"Built from the results files beside this page ({', '.join(f'`{n}`' for n in names)}); "
                     f"rebuild it in this folder with `{command}`.")
    else:
        parts.append("Built from no results files.")
    recorded = json.dumps({"sources": names, "published": published})
    parts += ["", f"<!-- {SOURCES_COMMENT} {recorded} -->"]
    return "\n".join(parts) + "\n"


def published_table(path: str = PUBLISHED_FILE) -> str:
    from tabulate import tabulate

    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    rows = [[r["method"], r.get("kind", ""), r["setting"], r["result"], r["source"]] for r in data["rows"]]
    return (
        "## Published results (not measured by us)\n\n"
        f"{data['note']}\n\n" + tabulate(rows, headers=["method", "kind", "setting", "published result", "source"],
                                         tablefmt="pipe", disable_numparse=True)
    )


# --- build -----------------------------------------------------------------------------------------------------


def _copies(paths: Sequence[str], folder: str) -> list[tuple[str, str]]:
    """(input, its copy in ``folder/results``) for every input; two different inputs with one name refuse."""
    out: list[tuple[str, str]] = []
    by_name: dict[str, str] = {}
    for path in paths:
        name = os.path.basename(path)
        other = by_name.get(name)
        if other is not None and os.path.realpath(other) != os.path.realpath(path):
            raise OutputError(f"two results files are named {name} ({other}, {path}); their copies beside the "
                              "leaderboard would collide: rename one")
        if other is None:
            by_name[name] = path
            out.append((path, os.path.join(folder, RESULTS_FOLDER, name)))
    return out


def _benchmarks_oldest_first(documents: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every benchmark of ``documents`` (read results files), the files' in order of their ``datetime`` (a later
    file's row wins)."""
    docs = sorted(documents, key=lambda d: str(d.get("datetime", "")))
    return [b for d in docs for b in d["benchmarks"]]


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _check_not_an_input(paths: Sequence[str], out_path: str) -> None:
    """The markdown must not replace one of the results files it is built from (real paths compared)."""
    for path in paths:
        if _same_file(path, out_path):
            raise OutputError(f"-o {out_path} is one of the results files read ({path}); the leaderboard would "
                              "overwrite it: choose another -o (e.g. leaderboard/README.md)")


def build(paths: Sequence[str], out_path: str, published: bool = True, plots: bool = True) -> list[Section]:
    """Read ``paths``; write copies of them to ``results/`` beside ``out_path``, the plots, and the markdown to
    ``out_path`` (all atomically, the markdown last). Bad inputs (:class:`ResultsError`) and outputs that cannot
    be written (:class:`OutputError`) raise before anything is written."""
    if os.path.isdir(out_path):
        raise OutputError(f"-o {out_path} is a folder; give the markdown file, e.g. "
                          f"{os.path.join(out_path, 'README.md')}")
    _check_not_an_input(paths, out_path)
    folder = os.path.dirname(os.path.abspath(out_path))
    copies = _copies(paths, folder)
    sources = [os.path.relpath(dest, folder) for _, dest in copies]
    documents = {src: load_results(src) for src, _ in copies}  # each file read and checked once
    sections = load_sections(list(documents), sources, documents)
    scaling = scaling_groups(_benchmarks_oldest_first(list(documents.values())))
    text = render(sections, sources, published=published, scaling=scaling)
    check_writable_file(out_path, "-o")
    with OutputLock(out_path, "-o"):
        for src, dest in copies:
            if not (os.path.exists(dest) and os.path.samefile(src, dest)):
                with open(src, "rb") as fh:
                    atomic_write(dest, fh.read(), purpose="results copy")
        if plots:
            for sec in sections:
                plot(sec, os.path.join(folder, f"{sec.slug}.png"))
            for group in scaling:
                scaling_plot(group, os.path.join(folder, f"{group.slug}.png"))
        atomic_write(out_path, text, purpose="-o")
    return sections


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokred.leaderboard.generate", description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="results JSON files")
    parser.add_argument("-o", "--output", default="leaderboard/README.md")
    parser.add_argument("--no-published", action="store_true", help="leave out the published-results table")
    args = parser.parse_args(argv)
    try:
        build(args.results, args.output, published=not args.no_published)
    except (ResultsError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
