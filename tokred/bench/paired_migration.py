"""``quality_delta`` in every results file: why a case has none, and filling it into files written before schema 6.

From results schema 6 every case but the baseline carries ``quality_delta`` (:mod:`tokred.bench.paired`): the
difference from the baseline on the same images of each paired metric, or ``{}`` with ``quality_delta_reason``
where nothing can be paired (:func:`unpaired_reason`: random weights measure no quality; a task or an older file
without per-image values has nothing to pair).

:func:`fill_quality_delta` brings a results document written before schema 6 to that rule: a case that lacks
``quality_delta`` is paired with the baseline of its section (the same task, workload, model, device, dtype and
task settings) from the per-image values both stored (``quality_per_image``), exactly as the harness pairs them;
where they did not store any, the case gets ``{}`` and the reason. A case's schema version (``tokred``) is kept:
it says what the file could record when it was written. ``tokred migrate-results FILE...`` runs it on files
(:func:`migrate_file`; ``--check`` only reports).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .paired import quality_deltas

__all__ = ["fill_quality_delta", "migrate_file", "unpaired_reason"]

RANDOM_WEIGHTS = "quality not measured: random weights (size {size}, speed only)"
NO_QUALITY = "quality not measured: the task's evaluate() gave no metrics"
NO_PER_IMAGE = "no per-image quality values to pair: the task gives only aggregate metrics"
OLD_SCHEMA = "no per-image quality values to pair: written with results schema {version}, before paired comparisons"
NO_BASELINE = "no baseline with per-image values of the same images in this results file to pair with"


def unpaired_reason(*, random_weights: bool, size: str, has_quality: bool, has_per_image: bool) -> str:
    """Why a case's ``quality_delta`` is empty (``quality_delta_reason``)."""
    if random_weights:
        return RANDOM_WEIGHTS.format(size=size)
    if not has_quality:
        return NO_QUALITY
    if not has_per_image:
        return NO_PER_IMAGE
    return NO_BASELINE


def _section_key(extra: Mapping[str, Any]) -> str:
    """What a case shares with its baseline: task, workload, model, device, dtype and the task's settings."""
    keys = ("task", "size", "workload", "model", "device", "dtype", "architecture", "resolution", "task_info")
    return json.dumps({k: extra.get(k) for k in keys}, sort_keys=True)


def _random_weights(extra: Mapping[str, Any]) -> bool:
    """Whether the case's workload has random weights (its task's workload class says; the registry may not know
    the task of a file written elsewhere: then no quality and size ``arch`` say so)."""
    from .task import get_task

    size = extra.get("workload") or extra.get("size")
    try:
        workload = get_task(extra["task"]).workloads.get(size)
    except Exception:  # noqa: BLE001 - an unknown task: judge from the file
        workload = None
    if workload is not None:
        return bool(getattr(workload, "random_weights", False))
    return size == "arch" and not extra.get("quality")


def _self_values(task: str) -> dict[str, float]:
    """The task's reference metrics with a value for the unreduced model against itself (agreement 100%)."""
    from .task import get_task

    try:
        metrics = get_task(task).metrics
    except Exception:  # noqa: BLE001 - an unknown task: no reference metric can be paired
        return {}
    return {m.name: float(m.self_value) for m in metrics if m.reference and m.self_value is not None}


def _binary(values: list[Any]) -> bool:
    """Hits are stored as the integers 0 and 1, scores as floats."""
    return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) and v in (0, 1) for v in values)


def _pair(extra: dict[str, Any], baseline: Mapping[str, Any] | None) -> dict[str, Any]:
    """``quality_delta`` (and ``quality_delta_p``, or ``quality_delta_reason``) of one case."""
    per_image = extra.get("quality_per_image") or {}
    deltas: dict[str, list[float]] = {}
    pvalues: dict[str, float] = {}
    if per_image and baseline is not None:
        reference = dict(baseline.get("quality_per_image") or {})
        for name, value in _self_values(extra["task"]).items():
            if name in per_image and name not in reference:
                hits = _binary(per_image[name])
                reference[name] = [1 if hits else value] * len(per_image[name])
        binary = {name for name, values in per_image.items() if _binary(values)}
        deltas, pvalues = quality_deltas(per_image, reference, binary)
    out: dict[str, Any] = {"quality_delta": deltas}
    if pvalues:
        out["quality_delta_p"] = pvalues
    if not deltas:
        version = extra.get("tokred", 1)
        if _random_weights(extra):
            reason = unpaired_reason(random_weights=True, size=extra.get("workload") or extra.get("size"),
                                     has_quality=False, has_per_image=False)
        elif extra.get("quality") and not per_image and version < 4:
            reason = OLD_SCHEMA.format(version=version)
        else:
            reason = unpaired_reason(random_weights=False, size=extra.get("size", ""),
                                     has_quality=bool(extra.get("quality")), has_per_image=bool(per_image))
        out["quality_delta_reason"] = reason
    return out


def fill_quality_delta(data: dict[str, Any]) -> list[str]:
    """Give every non-baseline tokred case of the results document ``data`` (changed in place) that lacks
    ``quality_delta`` its paired differences, or ``{}`` and the reason; returns one line per case changed."""
    benchmarks = [b for b in data.get("benchmarks", [])
                  if isinstance(b, dict) and isinstance(b.get("extra_info"), dict) and "tokred" in b["extra_info"]]
    baselines: dict[str, dict[str, Any]] = {}
    for bench in benchmarks:
        extra = bench["extra_info"]
        if extra.get("method") == "baseline":
            baselines.setdefault(_section_key(extra), extra)
    changes = []
    for bench in benchmarks:
        extra = bench["extra_info"]
        if extra.get("method") == "baseline" or "quality_delta" in extra:
            continue
        added = _pair(extra, baselines.get(_section_key(extra)))
        extra.update(added)
        what = (", ".join(added["quality_delta"]) if added["quality_delta"]
                else f"{{}} ({added['quality_delta_reason']})")
        changes.append(f"{bench.get('name', extra.get('method'))}: quality_delta {what}")
    return changes


def migrate_file(path: str | os.PathLike, write: bool = True) -> list[str]:
    """:func:`fill_quality_delta` on the results file ``path`` (checked before and after); written back atomically
    when something changed and ``write``. Returns the changes."""
    from .results import load_results, validate, write_results

    source = os.fspath(path)
    data = load_results(source)
    changes = fill_quality_delta(data)
    if changes:
        validate(data, source)
        if write:
            write_results(source, data)
    return changes
