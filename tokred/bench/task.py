"""The interface every benchmark task implements, and the task registry.

A task builds a model and its data, and measures the model's speed and quality. It never imports a method:
the harness applies methods to ``task.model`` through :func:`tokred.apply`, so any registered method,
built-in or installed through the ``tokred.methods`` entry point, is measured the same way.

Protocol used by the harness (pytest plugin and ``tokred run``)::

    task = get_task("vit_classification")(size="embedded", device="cpu", dtype="float32")  # settings checked here
    task.setup()                          # build model + data (may be slow; once per session)
    base = task.record_reference()        # unreduced outputs, for agreement / fidelity metrics; may return the
                                          # unreduced model's Quality from those outputs (None: harness evaluates)
    fn = task.workload()                  # zero-argument callable: one unit of work, timed by the harness only
    speed = task.measure_speed()          # GFLOPs, peak memory, task-specific numbers; never wall time
    quality = task.evaluate()             # Quality: accuracy, agreement, FID, PSNR ... with intervals
    patch = tokred.apply(task.model, "tome", **options); ...; patch.remove()

The harness (:mod:`tokred.bench.harness`) times ``fn`` with and without the patch in paired rounds
(:mod:`tokred.bench.timing`) at ``task.default_threads()`` torch threads. ``evaluate()`` may return a plain dict of
point estimates; a :class:`Quality` also carries each metric's 95% interval and the number of images behind it.
Metrics with ``reference=True`` compare the model with the unreduced model's outputs (PSNR, agreement): the
baseline row does not report them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import UnknownTaskError
from ..registry import Registry
from .workload import DEFAULT_SIZE, LEGACY_SIZES, Workload, check_size

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Metric:
    """A reported number: its name, unit and which direction is better ("higher" or "lower")."""

    name: str
    better: str  # "higher" | "lower"
    unit: str = ""
    kind: str = "quality"  # "quality" | "speed"
    reference: bool = False  # compares with the unreduced model's outputs: not reported for the baseline itself
    # the section's primary quality axis (Pareto front, plot) when rows report it; the first such metric wins
    primary: bool = False
    # a reference metric's value for the unreduced model against itself (SSIM 1, agreement 100%), where finite:
    # its per-image values are paired with this constant (PSNR has none: identical images have no finite PSNR)
    self_value: float | None = None
    note: str = ""  # why the metric is primary (the leaderboard prints it under the section)


class Quality(dict):
    """What :meth:`Task.evaluate` returns: ``{metric: point estimate}`` (a plain dict to read), with ``ci``
    ``{metric: (low, high)}``, the 95% interval of each metric, and ``n`` ``{metric: count}``, the number of
    images (or samples) behind it.

    ``per_image`` ``{metric: [value of image 0, 1, ...]}``: the per-image values behind a metric that averages
    them, in a fixed image order (the same images for every case of a task), so the harness can pair a case
    with the baseline image by image (:mod:`tokred.bench.paired`); ``binary``: those metrics whose per-image
    values are hits (0/1: accuracy, agreement), compared with McNemar's test."""

    def __init__(self, values: Any = (), ci: dict[str, Any] | None = None, n: dict[str, int] | None = None,
                 per_image: dict[str, Any] | None = None, binary: Any = ()) -> None:
        super().__init__(values)
        self.ci: dict[str, tuple[float, float]] = {k: (float(v[0]), float(v[1])) for k, v in (ci or {}).items()}
        self.n: dict[str, int] = {k: int(v) for k, v in (n or {}).items()}
        self.per_image: dict[str, list[float]] = {k: [float(x) for x in v] for k, v in (per_image or {}).items()}
        self.binary: set[str] = set(binary)

    def add(self, name: str, value: float, ci: tuple[float, float] | None = None, n: int | None = None,
            per_image: Any = None, binary: bool = False) -> None:
        self[name] = float(value)
        if ci is not None:
            self.ci[name] = (float(ci[0]), float(ci[1]))
        if n is not None:
            self.n[name] = int(n)
        if per_image is not None:
            self.per_image[name] = [float(x) for x in per_image]
            if binary:
                self.binary.add(name)

    def without(self, names: Any) -> Quality:
        """A copy without the given metrics."""
        drop = set(names)
        return Quality(
            {k: v for k, v in self.items() if k not in drop},
            {k: v for k, v in self.ci.items() if k not in drop},
            {k: v for k, v in self.n.items() if k not in drop},
            {k: v for k, v in self.per_image.items() if k not in drop},
            self.binary - drop,
        )


def check_int(name: str, value: Any, low: int, high: int | None = None, none_ok: bool = False) -> int | None:
    """``value`` if it is an int in ``[low, high]`` (None allowed with ``none_ok``), else a ValueError naming the
    setting and its valid range. Booleans are not ints here."""
    if value is None and none_ok:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        valid = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name} must be {valid}{' or None' if none_ok else ''}, got {value!r}")
    return value


def check_number(name: str, value: Any, low: float, none_ok: bool = False) -> float | None:
    """``value`` as a float if it is a finite number >= ``low``, else a ValueError naming the setting and range."""
    if value is None and none_ok:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    if not ok:
        raise ValueError(f"{name} must be a finite number >= {low:g}{' or None' if none_ok else ''}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


class Task:
    """Base class of benchmark tasks. Subclasses register with ``@register_task("name")``.

    A task scores one job; the kinds of model it runs are its ``workloads`` (:mod:`tokred.bench.workload`),
    keyed by the ``size`` argument (e.g. "embedded": the offline default shipped with tokred; "arch": a real
    architecture with random weights, for speed only; "full": a real model with its weights). Constructor
    arguments common to all tasks: ``size``, ``device`` and ``dtype``. Tasks accept further keyword arguments of
    their own and check every one of them in the constructor (a ValueError naming the setting and its valid
    range), before anything is built. Settings named in ``sweeps`` may be given as a list (``--set
    resolution=512,1024``): the harness runs the task once per value.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    family: ClassVar[str] = ""  # adapter family of the default model ("timm_vit", "diffusers_unet", ...)
    metrics: ClassVar[tuple[Metric, ...]] = ()
    workloads: ClassVar[dict[str, type[Workload]]] = {}
    sweeps: ClassVar[tuple[str, ...]] = ()

    def __init__(self, size: str = DEFAULT_SIZE, device: str = "cpu", dtype: str = "float32", **kwargs: Any) -> None:
        check_size(self.sizes(), self.name or type(self).__name__, size)
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
        self.size = size
        self.device = device
        self.dtype = dtype
        self.model: Any = None  # what methods are applied to; set by setup()

    @classmethod
    def sizes(cls) -> tuple[str, ...]:
        """The workload kinds (``size`` values) this task offers."""
        return tuple(cls.workloads) or LEGACY_SIZES

    @classmethod
    def family_for(cls, size: str, settings: dict[str, Any]) -> str:
        """The adapter family of the model that ``cls(size=size, **settings)`` would build, without building it
        (the methods to plan depend on it). By default the task's ``family``."""
        return cls.family

    @classmethod
    def profile(cls, size: str, name: str) -> dict[str, Any]:
        """The harness settings and task arguments (``"task"``) of profile ``name`` for workload ``size``."""
        if size not in cls.workloads:
            return {"task": {}}
        return cls.workloads[size].profile(name)

    @property
    def random_weights(self) -> bool:
        """Whether the model has random weights (speed only): methods whose reduction follows the features then
        reduce what random features give, not what trained ones would."""
        kind = self.workloads.get(self.size)
        return bool(kind and kind.random_weights)

    # --- to implement -------------------------------------------------------------------------------
    def setup(self) -> None:
        raise NotImplementedError

    def record_reference(self) -> None:
        """Run the unreduced model and keep what quality metrics compare against."""
        raise NotImplementedError

    def workload(self):
        """A zero-argument callable doing one timed unit of work (one batch / one image batch)."""
        raise NotImplementedError

    def measure_speed(self) -> dict[str, float]:
        """GFLOPs per item, peak memory and task-specific numbers of one workload call; no wall time (the
        harness times the workload). ``batch_size`` (items per workload call) when it is not 1."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Quality metrics of the model as it is now (patched or not); a :class:`Quality` carries intervals."""
        raise NotImplementedError

    def compile_target(self) -> Any:
        """The module a compiled run (``tokred run --compile``, :mod:`tokred.bench.compiled`) compiles in place
        after the method is applied: the one module the timed workload's calls spend their time in. By default
        the task's ``model``; a diffusion task's is its denoiser."""
        return self.model

    def default_threads(self) -> int | None:
        """The torch thread count the harness runs this task with (None: leave torch's setting as it is)."""
        kind = self.workloads.get(self.size)
        return kind.default_threads(self.device) if kind else None

    def notes(self) -> list[str]:
        """Caveats for every row of this task's results (the leaderboard prints them under the section)."""
        return []

    def describe(self) -> dict[str, Any]:
        """Model, data and settings, for results' ``extra_info`` and the leaderboard header."""
        return {"task": self.name, "size": self.size, "device": self.device, "dtype": self.dtype}


tasks = Registry("task", "tokred.tasks", "tokred.tasks", Task, UnknownTaskError)


def register_task(name: str | None = None):
    """Class decorator: ``@register_task("vit_classification")``."""
    return tasks.register(name)


def list_tasks(pattern: str = "*") -> list[str]:
    return tasks.names(pattern)


def get_task(name: str) -> type[Task]:
    return tasks.get(name)
