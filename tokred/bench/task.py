"""The interface every benchmark task implements, and the task registry.

A task builds a model and its data, and measures the model's speed and quality. It never imports a method:
the harness applies methods to ``task.model`` through :func:`tokred.apply`, so any registered method,
built-in or installed through the ``tokred.methods`` entry point, is measured the same way.

Protocol used by the harness (pytest plugin and ``tokred run``)::

    task = get_task("vit_classification")(size="embedded", device="cpu", dtype="float32")
    task.setup()                          # build model + data (may be slow; once per session)
    task.record_reference()               # unreduced outputs, for agreement / fidelity metrics
    fn = task.workload()                  # zero-argument callable: one timed unit of work
    speed = task.measure_speed()          # latency, throughput, GFLOPs, peak memory (own timing loop)
    quality = task.evaluate()             # accuracy, agreement, FID, PSNR ...  (vs. the reference)
    patch = tokred.apply(task.model, "tome", **options); ...; patch.remove()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import UnknownTaskError
from ..registry import Registry

SIZES = ("embedded", "full")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Metric:
    """A reported number: its name, unit and which direction is better ("higher" or "lower")."""

    name: str
    better: str  # "higher" | "lower"
    unit: str = ""
    kind: str = "quality"  # "quality" | "speed"


class Task:
    """Base class of benchmark tasks. Subclasses register with ``@register_task("name")``.

    Constructor arguments common to all tasks: ``size`` ("embedded": the offline default shipped with
    tokred; "full": the real full-size model, whose weights must be available locally or in the Hugging Face
    cache), ``device`` and ``dtype``. Tasks accept further keyword arguments of their own.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    family: ClassVar[str] = ""  # adapter family of the model it builds ("timm_vit", "diffusers_unet")
    metrics: ClassVar[tuple[Metric, ...]] = ()

    def __init__(self, size: str = "embedded", device: str = "cpu", dtype: str = "float32", **kwargs: Any) -> None:
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
        self.size = size
        self.device = device
        self.dtype = dtype
        self.model: Any = None  # what methods are applied to; set by setup()

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
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

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
