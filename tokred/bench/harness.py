"""The benchmark loop shared by ``tokred run`` and the pytest plugin.

For one task: set the task up once, record the unreduced model's reference outputs, measure the baseline, then
for each method x preset: ``tokred.apply`` -> evaluate quality -> time the workload -> measure speed ->
``remove``. Every benchmark becomes one entry in pytest-benchmark's JSON layout (:mod:`tokred.bench.results`).

Timing. CPU timings drift by tens of percent within minutes, so a method's speedup is never computed against a
baseline timed minutes earlier. Each timed round of a method runs one *untimed-by-the-benchmark* baseline call
first (patch removed, call timed by the harness, patch applied again) and then the timed method call; the
speedup is the ratio of the two medians over the same rounds. The number of rounds is calibrated once per task
from the baseline's call time (``min_rounds`` to ``max_rounds``, about ``target_s`` seconds of timing per
benchmark) and is the same for every benchmark of the task. CUDA is synchronized inside the tasks' workloads.

Selection errors (unknown task, method or preset) raise :class:`SelectionError` or the registry's errors, whose
messages list the valid names.
"""

from __future__ import annotations

import ast
import inspect
import math
import platform
import shlex
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import TokredError, UnsupportedModelError
from . import results as results_mod

BASELINE = "baseline"
DEFAULT_PRESET = "default"
CUSTOM_PRESET = "custom"
TEST_NAME = "test_method"
TEST_FILE = "benchmarks/test_methods.py"

# Per (task, size): task constructor arguments the harness sets unless the user does (only those the task
# accepts), and timing settings. Sized so that `tokred bench` (every registered method and preset on both
# embedded tasks) fits in about 15 minutes on 2 CPU cores; "quick" is a smoke test of a few minutes.
# Timing settings: min_rounds (paired rounds at least), warmup_rounds (untimed rounds first; the quality
# evaluation just before already warmed the patched model up, so expensive workloads need none).
PROFILES: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
    "default": {
        # about 0.5 s per image (20 DDIM steps, CFG) on 2 idle cores; per benchmark ~40 image generations:
        # 20 evaluated, 2 paired rounds of a 2-image batch, 5 batches inside measure_speed (GFLOPs, memory...)
        ("text_to_image", "embedded"): {
            "task": {"num_images": 20, "batch_size": 2},
            "min_rounds": 2,
            "warmup_rounds": 0,
        },
    },
    "quick": {
        ("vit_classification", "embedded"): {"task": {"num_images": 120}, "min_rounds": 2, "max_rounds": 10},
        ("text_to_image", "embedded"): {
            "task": {"num_images": 10, "batch_size": 2, "num_inference_steps": 10},
            "min_rounds": 1,
            "warmup_rounds": 0,
        },
    },
}
TIMING_DEFAULTS = {"min_rounds": 3, "max_rounds": 30, "warmup_rounds": 1, "target_s": 2.0}


class SelectionError(TokredError, ValueError):
    """A task, method or preset selection that does not exist; the message lists the valid names."""


# --- selection -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark: a task and a method preset (``method == "baseline"`` for the unreduced model)."""

    task: str
    method: str
    preset: str
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE

    @property
    def id(self) -> str:
        """The pytest id: ``vit_classification-tome-r8``, ``vit_classification-baseline``."""
        return f"{self.task}-{BASELINE}" if self.is_baseline else f"{self.task}-{self.method}-{self.preset}"

    @property
    def param(self) -> str:
        """The parameter value in results files: ``task:method:preset``."""
        return f"{self.task}:{self.method}:{self.preset}"


def parse_list(value: str | Sequence[str] | None) -> list[str] | None:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]``; None, ``""`` and ``"all"`` -> None (everything)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    out = [part.strip() for item in items for part in item.split(",") if part.strip()]
    return None if not out or out == ["all"] else out


def parse_assignments(pairs: Iterable[str] | None, what: str = "--set") -> dict[str, Any]:
    """``["num_images=20", "r=(16, -1)", "model=deit_tiny_patch16_224"]`` -> values as Python literals where
    they parse (numbers, booleans, tuples, lists, quoted strings), otherwise the raw string."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        if "=" not in pair or not pair.split("=", 1)[0].strip():
            raise SelectionError(f"{what}: expected key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        out[key.strip()] = value
    return out


def task_names(selection: str | Sequence[str] | None) -> list[str]:
    """Registered task names selected by ``selection`` (None / "all": every task); unknown names list the valid."""
    from .task import get_task, list_tasks

    names = parse_list(selection)
    if names is None:
        return list_tasks()
    for name in names:
        get_task(name)  # UnknownTaskError lists the valid tasks
    return names


def method_presets(method_cls: type, family: str) -> dict[str, dict[str, Any]]:
    """A method's presets for ``family``; a method with options but no presets there gets ``default`` = {}."""
    if family not in getattr(method_cls, "options", {}):
        return {}
    presets = dict((getattr(method_cls, "presets", None) or {}).get(family) or {})
    return presets or {DEFAULT_PRESET: {}}


def plan_cases(
    task: str,
    methods: str | Sequence[str] | None = None,
    presets: str | Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
    baseline: bool = True,
) -> list[Case]:
    """The baseline and every selected method x preset for ``task``.

    ``methods``: names (default: every registered method supporting the task's family). ``presets``: preset
    names, bare (``r8``: that preset of every selected method having it) or qualified (``tome:r8``);
    ``default`` selects a method's default options. ``options``: run the single selected method once with
    these options (preset ``custom``) instead of its presets.
    """
    from ..registry import get_method, list_methods
    from .task import get_task

    task_cls = get_task(task)
    family = task_cls.family
    supported = [m for m in list_methods() if method_presets(get_method(m), family)]
    chosen = parse_list(methods)
    if chosen is None:
        chosen = supported
    else:
        chosen = [m for m in chosen if m != BASELINE]
        for name in chosen:
            cls = get_method(name)  # UnknownMethodError lists the valid methods
            if not method_presets(cls, family):
                raise SelectionError(
                    f"method {name!r} does not support task {task!r} ({family} models; {name} supports "
                    f"{', '.join(cls.families()) or 'nothing'}); methods for {task}: {', '.join(supported) or 'none'}"
                )
    cases = [Case(task, BASELINE, BASELINE)] if baseline else []
    if options:
        if len(chosen) != 1:
            raise SelectionError(
                f"custom options need exactly one method (--methods NAME), got {len(chosen)}: {', '.join(chosen)}"
            )
        from ..options import parse_options

        method_cls = get_method(chosen[0])
        # checked here, before anything runs (model-dependent checks still happen at apply time)
        parse_options(method_cls.options[family], options, context=f"{chosen[0]} ({family})")
        return cases + [Case(task, chosen[0], CUSTOM_PRESET, dict(options))]

    wanted = parse_list(presets)
    available = {m: method_presets(get_method(m), family) for m in chosen}
    if wanted is not None:
        valid = sorted({p for ps in available.values() for p in ps} | {DEFAULT_PRESET})
        qualified = sorted(f"{m}:{p}" for m, ps in available.items() for p in ps)
        for item in wanted:
            method, _, preset = item.rpartition(":")
            if method and method not in available:
                raise SelectionError(
                    f"unknown preset {item!r}: method {method!r} is not selected for {task}; selected methods: "
                    f"{', '.join(available) or 'none'}"
                )
            ok = (preset in available[method] or preset == DEFAULT_PRESET) if method else preset in valid
            if not ok:
                raise SelectionError(
                    f"unknown preset {item!r} for {task} ({family}); valid presets: {', '.join(valid)} "
                    f"(or method:preset: {', '.join(qualified)})"
                )
    for method in chosen:
        table = dict(available[method])
        if wanted is not None:
            picked = {}
            for item in wanted:
                owner, _, preset = item.rpartition(":")
                if owner and owner != method:
                    continue
                if preset in table:
                    picked[preset] = table[preset]
                elif preset == DEFAULT_PRESET:
                    picked[preset] = {}
            table = picked
        cases.extend(Case(task, method, preset, dict(opts)) for preset, opts in table.items())
    return cases


def plan_all(
    tasks: Sequence[str],
    methods: str | Sequence[str] | None = None,
    presets: str | Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, list[Case]]:
    """:func:`plan_cases` for several tasks: a task that the method/preset selection does not apply to is left
    out (``--methods tome --presets r8`` over all tasks runs only the ViT task); the error is raised only when the
    selection applies to no task at all. Unknown method names always raise."""
    if len(tasks) == 1:
        return {tasks[0]: plan_cases(tasks[0], methods, presets, options)}
    planned: dict[str, list[Case]] = {}
    errors: list[SelectionError] = []
    for task in tasks:
        try:
            planned[task] = plan_cases(task, methods, presets, options)
        except SelectionError as err:
            errors.append(err)
    if not planned:
        raise errors[0]
    return planned


# --- environment ---------------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    """Versions of python and the packages results depend on (None where not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "diffusers", "timm", "tokred", "pytest-benchmark"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: Any) -> str:
    """A readable name of the hardware: the GPU's name, or the CPU model."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        return _cpu_name()
    return str(dev)


def accepted_kwargs(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``cls(...)`` accepts (all of them if it takes ``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def profile_settings(task: str, size: str, profile: str) -> dict[str, Any]:
    """The profile's task arguments (``"task"``) and timing settings for ``(task, size)``."""
    if profile not in PROFILES:
        raise SelectionError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    settings = dict(TIMING_DEFAULTS)
    settings.update(PROFILES[profile].get((task, size), {}))
    settings["task"] = dict(settings.get("task", {}))
    return settings


def reproduce_command(
    task: str,
    size: str,
    device: str,
    dtype: str | None,
    methods: Sequence[str] | None = None,
    presets: Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
    task_kwargs: dict[str, Any] | None = None,
    profile: str = "default",
    rounds: int | None = None,
) -> str:
    """The ``tokred run`` command line that repeats a run."""
    parts = ["tokred", "run", "--task", task, "--size", size, "--device", str(device)]
    if dtype:
        parts += ["--dtype", dtype]
    if methods:
        parts += ["--methods", ",".join(methods)]
    if presets:
        parts += ["--presets", ",".join(presets)]
    for key, value in (options or {}).items():
        parts += ["--options", f"{key}={value!r}"]
    for key, value in (task_kwargs or {}).items():
        parts += ["--set", f"{key}={value!r}" if not isinstance(value, str) else f"{key}={value}"]
    if profile == "quick":
        parts.append("--quick")
    if rounds:
        parts += ["--rounds", str(rounds)]
    return shlex.join(parts)


# --- timing --------------------------------------------------------------------------------------------------

# timer(target, setup, rounds, warmup_rounds): calls setup() (if given) then target() once per round, warmup rounds
# first. The pytest plugin passes benchmark.pedantic; the CLI uses simple_timer.
Timer = Callable[[Callable[[], Any], Callable[[], Any] | None, int, int], Any]


def simple_timer(target: Callable[[], Any], setup: Callable[[], Any] | None, rounds: int, warmup_rounds: int) -> None:
    for _ in range(warmup_rounds + rounds):
        if setup is not None:
            setup()
        target()


def _timed(fn: Callable[[], Any], sink: list[float]) -> Callable[[], Any]:
    def wrapper() -> Any:
        start = time.perf_counter()
        out = fn()
        sink.append(time.perf_counter() - start)
        return out

    return wrapper


class CaseSkipped(Exception):
    """A method that cannot run on this task's model (raised at apply time); the case is skipped."""


@dataclass
class CaseResult:
    case: Case
    times: list[float]
    extra_info: dict[str, Any]
    warmup_rounds: int = 1

    def benchmark_entry(self) -> dict[str, Any]:
        """This result as one entry of pytest-benchmark's ``benchmarks`` list (as ``test_methods.py`` names it)."""
        name = f"{TEST_NAME}[{self.case.id}]"
        return {
            "group": self.case.task,
            "name": name,
            "fullname": f"{TEST_FILE}::{name}",
            "params": {"tokred_case": self.case.param},
            "param": self.case.id,
            "extra_info": self.extra_info,
            "options": {
                "disable_gc": False,
                "timer": "perf_counter",
                "min_rounds": len(self.times),
                "max_time": None,
                "min_time": None,
                "precision": None,
                "confidence": None,
                "warmup": self.warmup_rounds,
            },
            "stats": results_mod.stats_dict(self.times),
        }


# --- the task session ----------------------------------------------------------------------------------------


class TaskRun:
    """One task set up once, its reference and baseline measured, and cases run against it."""

    def __init__(
        self,
        task: str,
        size: str = "embedded",
        device: str = "cpu",
        dtype: str | None = None,
        task_kwargs: dict[str, Any] | None = None,
        profile: str = "default",
        rounds: int | None = None,
        command: str | None = None,
        **timing: Any,
    ) -> None:
        """``rounds`` fixes the number of timed rounds; otherwise it is calibrated between the profile's
        ``min_rounds`` and ``max_rounds`` to about ``target_s`` seconds (``timing`` overrides those and
        ``warmup_rounds``)."""
        from .task import get_task

        self.task_name = task
        self.task_cls = get_task(task)
        self.size = size
        self.device = device
        self.dtype = dtype
        self.user_kwargs = dict(task_kwargs or {})
        self.profile = profile
        settings = profile_settings(task, size, profile)
        unknown = set(timing) - set(TIMING_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown timing settings: {', '.join(sorted(unknown))}")
        settings.update(timing)
        kwargs = settings.pop("task")
        kwargs.setdefault("progress", False)
        kwargs = accepted_kwargs(self.task_cls, kwargs)
        kwargs.update(self.user_kwargs)
        self.task_kwargs = kwargs
        if rounds is not None and rounds < 1:
            raise SelectionError(f"rounds must be >= 1, got {rounds}")
        self.fixed_rounds = rounds
        self.min_rounds, self.max_rounds = int(settings["min_rounds"]), int(settings["max_rounds"])
        self.warmup_rounds, self.target_s = int(settings["warmup_rounds"]), float(settings["target_s"])
        self.command = command or reproduce_command(task, size, device, dtype, task_kwargs=self.user_kwargs,
                                                    profile=profile, rounds=rounds)
        self.task: Any = None
        self._built: Any = None
        self._setup_error: str | None = None
        self.rounds = 0
        self.baseline_quality: dict[str, float] = {}
        self.baseline_speed: dict[str, float] = {}
        self.setup_s = 0.0

    def build(self) -> Any:
        """Construct the task without setting it up (cheap), so that a bad task argument (SelectionError naming
        it) is reported before anything runs."""
        kwargs = dict(self.task_kwargs)
        if self.dtype is not None:
            kwargs["dtype"] = self.dtype
        try:
            self._built = self.task_cls(size=self.size, device=self.device, **kwargs)
        except TypeError as err:
            valid = [p for p in inspect.signature(self.task_cls.__init__).parameters if p not in ("self", "kwargs")]
            raise SelectionError(f"task {self.task_name!r}: {err}; its arguments: {', '.join(valid)}") from None
        except ValueError as err:
            raise SelectionError(f"task {self.task_name!r}: {err}") from None
        return self._built

    def setup(self) -> TaskRun:
        """Build the task, record its reference, measure the baseline's quality and speed, calibrate rounds."""
        if self.task is not None:
            return self
        if self._setup_error is not None:  # do not repeat a failed (and possibly slow) setup for every case
            raise RuntimeError(f"task {self.task_name!r} failed to set up: {self._setup_error}")
        try:
            self._setup()
        except Exception as err:
            self.task = None
            self._setup_error = f"{type(err).__name__}: {err}"
            raise
        return self

    def _setup(self) -> None:
        start = time.perf_counter()
        task = self._built or self.build()
        task.setup()
        task.record_reference()
        self.task = task
        self.baseline_quality = dict(task.evaluate())  # also warms the model up
        if self.fixed_rounds is not None:
            self.rounds = self.fixed_rounds
        else:
            call_s = _time_once(task.workload())
            wanted = math.ceil(self.target_s / max(2 * call_s, 1e-9))
            self.rounds = max(self.min_rounds, min(self.max_rounds, wanted))
        self.baseline_speed = self._measure_speed()
        self.setup_s = time.perf_counter() - start

    def _measure_speed(self) -> dict[str, float]:
        """The task's measure_speed, with a single timed call where it accepts ``warmup``/``repeats`` (the harness
        times the workload itself; measure_speed is for GFLOPs, memory and task-specific numbers)."""
        fn = self.task.measure_speed
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in (("warmup", 0), ("repeats", 1)) if k in params}
        return dict(fn(**kwargs))

    def items_per_call(self, speed: dict[str, Any]) -> float:
        for source in (speed, self.task.describe()):
            value = source.get("batch_size")
            if isinstance(value, int | float) and value > 0:
                return float(value)
        return 1.0

    def base_info(self) -> dict[str, Any]:
        import torch

        task = self.task
        info = task.describe()
        return {
            "tokred": results_mod.SCHEMA_VERSION,
            "task": self.task_name,
            "family": task.family,
            "size": self.size,
            "model": str(info.get("model", getattr(task, "model_name", type(task.model).__name__))),
            "device": str(task.device),
            "device_name": device_name(getattr(task, "torch_device", task.device)),
            "dtype": str(task.dtype),
            "num_threads": torch.get_num_threads(),
            "versions": versions(),
            "command": self.command,
            "metrics": [
                {"name": m.name, "better": m.better, "unit": m.unit, "kind": m.kind} for m in type(task).metrics
            ],
            "task_info": results_mod.to_jsonable(info),
        }

    def run_case(self, case: Case, timer: Timer = simple_timer) -> CaseResult:
        """Measure one case; the model is unpatched again afterwards, whatever happens."""
        import tokred

        self.setup()
        task = self.task
        workload = task.workload()
        method_times: list[float] = []
        baseline_times: list[float] = []
        if case.is_baseline:
            tokred.remove(task.model)
            timer(_timed(workload, method_times), None, self.rounds, self.warmup_rounds)
            quality, speed = self.baseline_quality, self.baseline_speed
        else:
            holder: dict[str, Any] = {}
            try:
                holder["patch"] = tokred.apply(task.model, case.method, **case.options)
            except UnsupportedModelError as err:
                raise CaseSkipped(str(err)) from err
            try:
                quality = dict(task.evaluate())
                timed_baseline = _timed(workload, baseline_times)

                def paired_setup() -> None:
                    holder.pop("patch").remove()
                    timed_baseline()
                    holder["patch"] = tokred.apply(task.model, case.method, **case.options)

                timer(_timed(workload, method_times), paired_setup, self.rounds, self.warmup_rounds)
                speed = self._measure_speed()
            finally:
                patch = holder.pop("patch", None)
                if patch is not None:
                    patch.remove()
                tokred.remove(task.model)
        times = _measured(method_times, self.rounds)
        median = statistics.median(times)
        if case.is_baseline:
            base_times = times
        else:
            base_times = _measured(baseline_times, self.rounds) or [float("nan")]
        base_median = statistics.median(base_times)
        items = self.items_per_call(speed)
        info = self.base_info()
        info.update(
            method=case.method,
            preset=case.preset,
            options=results_mod.to_jsonable(case.options),
            options_repr=", ".join(f"{k}={v!r}" for k, v in case.options.items()),
            quality=results_mod.to_jsonable(quality),
            speed=results_mod.to_jsonable(speed),
            latency_ms=median * 1000.0,
            baseline_latency_ms=base_median * 1000.0,
            throughput_per_s=items / median,
            s_per_image=median / items,
            items_per_call=items,
            speedup=1.0 if case.is_baseline else base_median / median,
            # the ratio of the fastest calls: less sensitive to other processes' interference, which only adds time
            speedup_min=1.0 if case.is_baseline else min(base_times) / min(times),
            gflops=speed.get("gflops"),
            peak_mem_mb=speed.get("peak_mem_mb"),
            rounds=len(times),
            baseline_quality=results_mod.to_jsonable(self.baseline_quality),
        )
        return CaseResult(case, times, info, self.warmup_rounds)


def _time_once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _measured(times: list[float], rounds: int) -> list[float]:
    """Drop the warm-up rounds (the first ones) when the timer ran them."""
    return times[-rounds:] if len(times) > rounds else list(times)
