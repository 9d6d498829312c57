"""Workloads: the kind of model a task runs, as a type.

A *task* scores one job (image classification, text-to-image generation): its metrics, its quality protocol
and how that protocol is sharded. A *workload* is one kind of model for that job, and owns everything that
depends on the kind: building the model, making its inputs or generating, its defaults (steps, batch, threads,
the timing budget of each profile), what one timed call is (:attr:`Workload.unit`), and its caveats for the
leaderboard. The kinds a task offers are its ``workloads`` table, keyed by the ``--size`` names:

* ``embedded``: a small trained model shipped with tokred (speed and quality, offline, seconds per call);
* ``arch``: a real architecture with random weights (speed, FLOPs, memory and token counts; no quality);
* ``full``: a real model with its weights (Hugging Face cache or a local path).

Nothing outside the workload definitions branches on those names: the harness asks the workload class for its
timing profile (:meth:`Workload.profile`), threads (:meth:`Workload.default_threads`), notes and whether its
weights are random (:attr:`Workload.random_weights`).

The timed call (:meth:`Task.workload`, a :class:`TimedCall`) is either *stateless* (a generation, a batch: each
call starts afresh, so the harness removes the patch for the baseline's calls and applies it again for the
method's) or *stateful* (one denoiser call inside a running generation: the method's state from the earlier
calls must survive the baseline's calls, so the harness pauses the patch instead, see
:meth:`tokred.Patch.pause`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from .contention import cpu_count

# the kinds a task without a ``workloads`` table (written before workloads) accepts as ``size``
LEGACY_SIZES = ("embedded", "arch", "full")
DEFAULT_SIZE = "embedded"  # the workload kind of `tokred run` / `tokred bench` when no --size is given
# Harness settings of a profile: "task" holds task arguments the harness sets unless the user does.
Profile = dict[str, Any]


class Workload:
    """Base class of a task's workloads (see the module docstring).

    Class attributes a workload sets: ``kind`` (its ``--size`` name), ``summary``, ``random_weights`` (speed
    only: the task reports no quality), ``cpu_threads`` (``"one"``: a small model, as fast on one thread and
    robust to a busy neighbour; ``"all"``: every available core), ``profiles`` (per profile name, the harness
    settings and task arguments of a run: ``{"default": {"budget_s": 10.0, "task": {"num_images": 60}}}``),
    ``settings`` (the task arguments that only this kind of model accepts; any other kind refuses them, naming
    the kind that takes them).
    """

    kind: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    random_weights: ClassVar[bool] = False
    cpu_threads: ClassVar[str] = "all"
    profiles: ClassVar[dict[str, Profile]] = {}
    settings: ClassVar[frozenset[str]] = frozenset()
    note: ClassVar[str] = ""

    @classmethod
    def profile(cls, name: str) -> Profile:
        """The harness settings and task arguments (``"task"``) of profile ``name`` for this workload."""
        out = dict(cls.profiles.get(name, {}))
        out["task"] = dict(out.get("task", {}))
        return out

    @classmethod
    def default_threads(cls, device: Any) -> int | None:
        """The torch thread count to time this workload with on ``device`` (None on GPUs: torch's setting)."""
        import torch

        if torch.device(device).type != "cpu":
            return None
        return 1 if cls.cpu_threads == "one" else cpu_count()

    def notes(self) -> list[str]:
        """Caveats that hold for every row of this workload (printed under its leaderboard section)."""
        return [self.note] if self.note else []


class TimedCall:
    """One unit of work the harness times: ``call()`` runs it once. ``unit`` says what it is ("generation of 2
    images", "denoiser call", "batch of 8 images"); it is recorded with every result.

    A *stateful* call (``stateful = True``) is one step of a sequence in which a method keeps state: the harness
    applies the method once per case, calls :meth:`start` with the number of untimed calls the method needs to
    reach its steady state (:meth:`tokred.Method.warmup_calls`), times the method's calls with the patch active
    and the baseline's with it paused, and calls :meth:`advance` (untimed) after each of the method's calls.

    A method whose calls differ in a period (a cache: :meth:`tokred.Method.cycle_calls`, DeepCache's full and
    reusing calls) is timed a whole cycle at a time: the harness passes ``cycle=n`` to :meth:`start`, and each
    timed call then runs ``n`` consecutive steps of the sequence, the baseline's as the method's. ``calls`` is
    how many steps one timed call runs (1 unless a cycle was asked for): per-step figures (FLOPs) are the unit's
    divided by it, the average over the cycle. A stateful call that cannot time cycles keeps the ``start``
    signature without ``cycle``; the harness then refuses cached methods on it, with the reason.
    """

    stateful: ClassVar[bool] = False

    def __init__(self, fn: Callable[[], Any], unit: str) -> None:
        self._fn = fn
        self.unit = unit
        self.calls = 1

    def __call__(self) -> Any:
        return self._fn()

    def start(self, warmup_calls: int = 0) -> None:
        """Begin a sequence (stateful calls only): run ``warmup_calls`` calls, untimed. Stateful calls that time
        cycles take ``cycle: int = 1`` too (see the class docstring)."""

    def advance(self) -> None:
        """Move on to the next call of the sequence (stateful calls only; untimed)."""


def unit_of(call: Any) -> str:
    """What one call of a task's timed workload is (``""`` for a plain callable)."""
    return str(getattr(call, "unit", ""))


def check_size(valid: tuple[str, ...], task: str, kind: Any) -> str:
    """``kind`` if it is one of ``valid``, else a ValueError naming the valid kinds of ``task``."""
    if kind not in valid:
        raise ValueError(f"unknown size {kind!r} for {task}; valid sizes: {', '.join(valid)}")
    return kind


def workload_class(workloads: dict[str, type[Workload]], task: str, kind: str) -> type[Workload]:
    """``workloads[kind]``, or a ValueError naming the valid kinds of ``task``."""
    return workloads[check_size(tuple(workloads), task, kind)]


def refuse_foreign_settings(workloads: dict[str, type[Workload]], kind: str, given: dict[str, Any]) -> None:
    """A ValueError for each given setting that belongs to another kind of workload than ``kind``."""
    own = workloads[kind].settings
    for name, value in given.items():
        if value is None or name in own:
            continue
        owners = [k for k, cls in workloads.items() if name in cls.settings]
        if owners:
            raise ValueError(
                f"{name}= applies to size={' or '.join(repr(o) for o in owners)}; size={kind!r} "
                f"({workloads[kind].summary}) does not take it"
            )


def hf_cache_hint() -> str:
    """Where ``from_pretrained`` looked for weights that are not local: the Hugging Face cache, and whether
    downloads are off (for the missing-weights errors of the ``full`` workloads)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE, is_offline_mode

        offline = " (HF_HUB_OFFLINE is set: no download)" if is_offline_mode() else ""
        return f"the Hugging Face cache {HF_HUB_CACHE}{offline}"
    except ImportError:  # pragma: no cover
        return "the Hugging Face cache"
