"""Ranking that respects noise: which values of a leaderboard column are best, tied, or on the Pareto front.

Every ranked value is a point estimate with a 95% interval (``Estimate``); exact quantities (counted FLOPs) have
the interval ``[v, v]``; a value whose interval is unknown (a schema-1 results file) has ``interval=None``.
The definitions, used verbatim in the leaderboard's text:

* **Overlap**: two closed intervals overlap when each one's low end is at most the other's high end.
* **Separately better**: ``a`` is separately better than ``b`` in a direction when their intervals do not
  overlap and ``a``'s lies on the better side (higher: ``a.low > b.high``; lower: ``a.high < b.low``). A value
  without an interval is never separately better or worse than anything.
* **Best (bold)**: among a column's competitors (at least two), the best point value is bold only if its
  interval overlaps no other competitor's interval. If some do, no value is bold: the best and every competitor
  whose interval overlaps the best's are *tied* (marked). When that is every competitor, the column separates
  nothing (``all_tied``). If any competitor has no interval, the column is not ranked at all.
* **Pareto front (★)**: over speedup and the primary quality metric, ``b`` dominates ``a`` when ``b`` is
  separately better than ``a`` on one axis and at least as good as ``a`` on the other (point values). The front
  is the points that nothing dominates; only points with both intervals take part. So a row loses its star
  only to a row shown to beat it on one axis and not worse on the other; a row whose advantage is within the
  noise keeps its star, as does a row that no other row beats separately.

This dominance implies ordinary Pareto dominance of the point values, which has no cycles, so the front of a
non-empty pool is never empty. (Letting "not separately worse" replace "at least as good" on the second axis
would drop more rows, but it admits cycles — four rows each dominated by the next — and then empty fronts.)

Callers choose the competitors and which of them may be marked (``eligible``): the leaderboard keeps rows whose
timing was contended out of the speedup column's competition and never marks them anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    value: float
    interval: tuple[float, float] | None = None  # 95% interval; None when unknown

    @classmethod
    def exact(cls, value: float) -> Estimate:
        return cls(value, (value, value))


def overlaps(a: Estimate, b: Estimate) -> bool:
    """Whether the intervals overlap (closed); an unknown interval overlaps everything."""
    if a.interval is None or b.interval is None:
        return True
    return a.interval[0] <= b.interval[1] and b.interval[0] <= a.interval[1]


def separately_better(a: Estimate, b: Estimate, direction: str) -> bool:
    """``a`` better than ``b`` with non-overlapping intervals (``direction``: "higher" or "lower")."""
    if a.interval is None or b.interval is None:
        return False
    if direction == "higher":
        return a.interval[0] > b.interval[1]
    return a.interval[1] < b.interval[0]


@dataclass(frozen=True)
class ColumnMarks:
    bold: frozenset = frozenset()  # the separated best (at most one key)
    tied: frozenset = frozenset()  # the best and those not separated from it, when it is not separated
    all_tied: bool = False  # every competitor is tied with the best: the column does not separate anything


def rank_column(
    values: Mapping[Hashable, Estimate], direction: str, eligible: Iterable[Hashable] | None = None
) -> ColumnMarks:
    """Bold and tied keys of one column (definitions in the module docstring). ``values``: the competitors;
    ``eligible``: the keys that may carry a mark (default: all). Ties on the point value are broken by the
    mapping's order, which does not change the outcome: equal values overlap, so they tie."""
    allowed = set(values) if eligible is None else set(eligible)
    if len(values) < 2 or any(e.interval is None for e in values.values()):
        return ColumnMarks()
    items = list(values.items())
    sign = 1.0 if direction == "higher" else -1.0
    best_key, best = max(items, key=lambda kv: sign * kv[1].value)
    overlapping = {k for k, e in items if k != best_key and overlaps(e, best)}
    if not overlapping:
        return ColumnMarks(bold=frozenset({best_key} & allowed))
    tied = {best_key} | overlapping
    return ColumnMarks(tied=frozenset(tied & allowed), all_tied=tied == set(values))


def dominates(b: tuple[Estimate, Estimate], a: tuple[Estimate, Estimate], directions: tuple[str, str]) -> bool:
    """Whether point ``b`` dominates point ``a`` (each ``(speed, quality)``; see the module docstring)."""
    for axis in (0, 1):
        other = 1 - axis
        sign = 1.0 if directions[other] == "higher" else -1.0
        if separately_better(b[axis], a[axis], directions[axis]) and sign * b[other].value >= sign * a[other].value:
            return True
    return False


def pareto_front(
    points: Mapping[Hashable, tuple[Estimate, Estimate]], directions: tuple[str, str] = ("higher", "higher")
) -> frozenset:
    """Keys of the points no other point dominates; points lacking an interval on either axis are left out
    (they are neither starred nor able to dominate)."""
    pool = {k: p for k, p in points.items() if p[0].interval is not None and p[1].interval is not None}
    if any(e.interval[0] > e.interval[1] for p in pool.values() for e in p):  # pragma: no cover - not valid results
        return _front_pairwise(pool, directions)
    # A point is dominated along ``axis`` when some other point reaches past its interval on that axis and is at
    # least as good on the other. With the points sorted by how far they reach, the best value on the other axis
    # among those reaching past a bar is a running maximum: O(n log n) instead of every pair (large leaderboards).
    # A point never reaches past its own bar (low <= high), so "some other point" needs no exclusion.
    dominated: set[Hashable] = set()
    for axis in (0, 1):
        other = 1 - axis
        sign = 1.0 if directions[other] == "higher" else -1.0
        # b is separately better than a on this axis when reach(b) > bar(a)
        if directions[axis] == "higher":
            reach = {k: p[axis].interval[0] for k, p in pool.items()}
            bar = {k: p[axis].interval[1] for k, p in pool.items()}
        else:
            reach = {k: -p[axis].interval[1] for k, p in pool.items()}
            bar = {k: -p[axis].interval[0] for k, p in pool.items()}
        reaching = sorted(((reach[k], sign * p[other].value) for k, p in pool.items()), reverse=True)
        best, i = -math.inf, 0
        for key in sorted(pool, key=bar.__getitem__, reverse=True):
            while i < len(reaching) and reaching[i][0] > bar[key]:
                best = max(best, reaching[i][1])
                i += 1
            if best >= sign * pool[key][other].value:
                dominated.add(key)
    return frozenset(k for k in pool if k not in dominated)


def _front_pairwise(
    pool: Mapping[Hashable, tuple[Estimate, Estimate]], directions: tuple[str, str]
) -> frozenset:
    """:func:`pareto_front` by comparing every pair (the definition; quadratic)."""
    return frozenset(
        k for k, p in pool.items() if not any(dominates(q, p, directions) for j, q in pool.items() if j != k)
    )
