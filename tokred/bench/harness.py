"""The benchmark loop shared by ``tokred run``, ``tokred bench`` and the pytest plugin.

For one task: set the task up once at its thread count, record the unreduced model's reference outputs (and
its quality from them), measure the baseline, then for each method x preset: ``tokred.apply`` -> evaluate quality
-> time the workload paired with the baseline -> FLOPs and memory -> ``remove``. Every benchmark becomes one entry
in pytest-benchmark's JSON layout (:mod:`tokred.bench.results`), with the ``extra_info`` keys of results schema 2.

Timing (:mod:`tokred.bench.timing`, :mod:`tokred.bench.stats`): each round times one baseline call (patch
removed) and one method call (patch applied again), warm-up rounds first and dropped; the speedup is the median
of the per-round ratios with a 95% bootstrap interval; rounds go on from 5 until that interval is within +-5% or
the case's budget (``budget_s``) is spent, but never before the timing floor, ``min_time_s`` seconds of the
method's own timed calls. The baseline row times the baseline alone, by the same rule on its call times.
``--rounds N`` fixes the number of rounds.

Processes (:mod:`tokred.bench.workers`): with ``processes`` N > 1 (the workload profile's, ``--processes N``) the
rounds are timed in N spawned worker processes, each with its own model, and the interval comes from the
per-process results (:func:`tokred.bench.stats.process_speedup`); quality, FLOPs and memory are measured once,
here. ``processes=1`` times in this process.

Paired quality (:mod:`tokred.bench.paired`): the task's per-image values (``Quality.per_image``) of the baseline
are kept, and each case records its difference from them on the same images (``quality_delta``, schema 4;
from schema 6 every case but the baseline has one, empty with ``quality_delta_reason`` where nothing is paired).

Contention (:mod:`tokred.bench.contention`): the case runs at the task's thread count (``threads``), and the
other processes' CPU time over the timed rounds (``/proc/stat``; the load average where there is none) and the
process's own CPU time around the timed calls decide ``contended``.

Settings come from the profile of the task's workload (``Task.profile(size, name)``, see
:mod:`tokred.bench.workload`) and can be overridden with ``--set``
(``tokred run``) / ``--tokred-set`` (pytest): the names in :data:`HARNESS_SETTINGS` go to the harness, every
other one to the task's constructor.

Selection errors (unknown task, method or preset) raise :class:`SelectionError` or the registry's errors, whose
messages list the valid names.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import platform
import shlex
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import TokredError, UnsupportedModelError
from . import results as results_mod
from . import stats as stats_mod
from .compiled import CompileFailed, CompileSettings, Watch, compile_module, fx_graph_cache, uncompile_module, warm_up
from .contention import Monitor, check_threads, torch_threads
from .paired_migration import unpaired_reason
from .record import run_settings
from .task import Quality
from .timing import Timings, TimingSettings, time_paired
from .workload import DEFAULT_SIZE, unit_of

BASELINE = "baseline"
DEFAULT_PRESET = "default"
CUSTOM_PRESET = "custom"
TEST_NAME = "test_method"
TEST_FILE = "benchmarks/test_methods.py"

LADDERS = ("all", "ends")  # plan_cases: every preset of a method's ladder, or its mildest and strongest
PROFILE_NAMES = ("default", "quick")  # "default": the main job, `tokred bench`; "quick": a smoke test
# Harness settings and their defaults (threads None: the task's default_threads()).
TIMING_DEFAULTS: dict[str, Any] = {
    "min_rounds": stats_mod.MIN_ROUNDS,
    "max_rounds": 50,
    "warmup_rounds": 1,
    "budget_s": 60.0,
    "target_rel_half_width": stats_mod.TARGET_REL_HALF_WIDTH,
    "threads": None,
    "min_time_s": stats_mod.MIN_TIME_S,  # the timing floor: seconds of the method's own timed calls
    "processes": 1,  # worker processes the rounds are spread over (1: this process)
}
HARNESS_SETTINGS = tuple(TIMING_DEFAULTS)
# The process count where neither the command line nor --set gives one, over the workload profile's: "1" keeps a
# test suite or a CI smoke run in one process (a worker's start is a few seconds of imports and model build).
PROCESSES_ENV = "TOKRED_PROCESSES"

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
    variant: str = ""  # the sweep values of its run (see expand_sweeps), "" when nothing is swept
    order: int | None = field(default=None, compare=False, hash=False)  # place in the method's preset ladder

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE

    @property
    def id(self) -> str:
        """The pytest id: ``vit_classification-tome-r8``, ``vit_classification-baseline``,
        ``text_to_image@sd3-1024-todo-default``."""
        task = f"{self.task}@{self.variant}" if self.variant else self.task
        return f"{task}-{BASELINE}" if self.is_baseline else f"{task}-{self.method}-{self.preset}"

    @property
    def param(self) -> str:
        """The parameter value in results files: ``task:method:preset`` (``task@variant:method:preset``)."""
        task = f"{self.task}@{self.variant}" if self.variant else self.task
        return f"{task}:{self.method}:{self.preset}"


def _split(value: str | Sequence[str]) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    # a name given twice is selected once (the first time), so no case is timed twice
    return list(dict.fromkeys(part.strip() for item in items for part in item.split(",") if part.strip()))


def parse_list(value: str | Sequence[str] | None) -> list[str] | None:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (repeated names once, in order); None and ``"all"``
    -> None (everything). An empty selection (``""``, ``" "``, ``","``) is not "all": SelectionError (the CLI
    and the pytest plugin check it first with :func:`check_selection`, which names the option)."""
    if value is None:
        return None
    out = _split(value)
    if not out:
        raise SelectionError(f"empty selection {value!r}: give names, comma-separated, or 'all'")
    return None if out == ["all"] else out


def selection_names(kind: str) -> list[str]:
    """The valid names of a selection ``kind``: "task", "method" or "preset" (every method's presets for any
    family, and ``default``)."""
    from ..registry import get_method, list_methods
    from .task import list_tasks

    if kind == "task":
        return list_tasks()
    if kind == "method":
        return list_methods()
    presets = {DEFAULT_PRESET}
    for name in list_methods():
        for table in (getattr(get_method(name), "presets", None) or {}).values():
            presets.update(table or {})
    return sorted(presets)


def check_selection(value: str | Sequence[str] | None, option: str, kind: str) -> None:
    """An explicit selection that names nothing (``--methods ""``, ``--task " "``) is an error naming ``option``
    and the valid names; only the word ``all`` (or leaving the option out) selects everything."""
    if value is None or _split(value):
        return
    raise SelectionError(
        f"{option} {value if isinstance(value, str) else ','.join(value)!r} selects no {kind}; give {kind} names, "
        f"comma-separated, or 'all'; valid: {', '.join(selection_names(kind))}"
    )


def check_selections(selections: Sequence[tuple[str, str | Sequence[str] | None, str]]) -> None:
    """:func:`check_selection` for each ``(option, value, kind)``: the task, method and preset selections of the
    CLI and the pytest plugin."""
    for option, value, kind in selections:
        check_selection(value, option, kind)


def check_device(device: str, option: str = "--device") -> None:
    """A device string torch knows and this machine has (``cuda`` needs a GPU, ``cuda:N`` that many); a
    SelectionError naming ``option`` otherwise."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SelectionError(f"{option} {device}: not a torch device ({reason}); e.g. cpu, cuda, cuda:0") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SelectionError(f"{option} {device}: CUDA is not available on this machine; use {option} cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise SelectionError(f"{option} {device}: this machine has {count} CUDA device(s) (cuda:0 to "
                                 f"cuda:{count - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise SelectionError(f"{option} {device}: MPS is not available on this machine; use {option} cpu")


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


def expand_sweeps(task: str, task_kwargs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The runs that ``task_kwargs`` asks for: one per combination of the values of the task's sweep settings
    (``Task.sweeps``) given as a list (``--set resolution=512,768,1024`` gives ``(512, 768, 1024)``; a string with
    commas is split: ``--set architecture=sd15,sd3``), as ``[(variant, kwargs)]``; ``variant`` names the
    combination (``"sd3-1024"``; ``""`` when nothing is swept)."""
    import itertools

    from .task import get_task

    sweeps = getattr(get_task(task), "sweeps", ())
    axes: list[tuple[str, list[Any]]] = []
    for key in sweeps:
        value = task_kwargs.get(key)
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple):
            if not value:
                raise SelectionError(f"--set {key}= is an empty list; give one value or several, e.g. {key}=a,b")
            axes.append((key, list(dict.fromkeys(value))))
    if not axes:
        return [("", dict(task_kwargs))]
    out = []
    for combo in itertools.product(*(values for _, values in axes)):
        kwargs = dict(task_kwargs)
        kwargs.update({key: value for (key, _), value in zip(axes, combo, strict=True)})
        out.append(("-".join(str(v) for v in combo), kwargs))
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
    family: str | None = None,
    ladder: str = "all",
) -> list[Case]:
    """The baseline and every selected method x preset for ``task``.

    ``methods``: names (default: every registered method supporting the task's family). ``presets``: preset
    names, bare (``r8``: that preset of every selected method having it) or qualified (``tome:r8``);
    ``default`` selects a method's default options. ``options``: run the single selected method once with
    these options (preset ``custom``) instead of its presets. ``family``: the model family of the run (default:
    the task's; a task whose workloads build several families says which with ``Task.family_for``).
    ``ladder``: without a preset selection, ``"all"`` runs each method's whole ladder of presets (mild to
    strong, in the order of its ``presets`` table), ``"ends"`` only its mildest and strongest (the main job).
    """
    if ladder not in LADDERS:
        raise SelectionError(f"unknown ladder {ladder!r}; valid: {', '.join(LADDERS)}")
    from ..registry import get_method, list_methods
    from .task import get_task

    task_cls = get_task(task)
    family = family or task_cls.family
    supported = [m for m in list_methods() if method_presets(get_method(m), family)]
    chosen = parse_list(methods)
    if chosen is None:
        chosen = supported
    else:
        # a composition by its canonical name (tome+deepcache is deepcache+tome), each method once
        chosen = list(dict.fromkeys(get_method(m).name for m in chosen if m != BASELINE))
        for name in chosen:
            cls = get_method(name)  # UnknownMethodError lists the valid methods
            if not method_presets(cls, family):
                raise SelectionError(
                    f"method {name!r} does not support task {task!r} ({family} models; {name} supports "
                    f"{', '.join(cls.families()) or 'nothing'}); methods for {task}: {', '.join(supported) or 'none'}"
                )
    if options and parse_list(presets) is not None:
        given = presets if isinstance(presets, str) else ",".join(presets)
        raise SelectionError(
            f"--options and --presets exclude each other: --options runs {', '.join(chosen)} once with these "
            f"options (preset {CUSTOM_PRESET!r}) instead of its presets; drop --presets {given} or the --options"
        )
    cases = [Case(task, BASELINE, BASELINE)] if baseline else []
    if options:
        if len(chosen) != 1:
            raise SelectionError(
                f"custom options need exactly one method (--methods NAME), got {len(chosen)}: {', '.join(chosen)}"
            )
        # checked here, before anything runs (model-dependent checks still happen at apply time)
        get_method(chosen[0]).parse_options(family, options)
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
        if wanted is None and ladder == "ends" and len(table) > 2:
            names = list(table)
            table = {names[0]: table[names[0]], names[-1]: table[names[-1]]}
        order = list(available[method])
        cases.extend(Case(task, method, preset, dict(opts), order=order.index(preset) if preset in order else None)
                     for preset, opts in table.items())
    return cases


def plan_all(
    tasks: Sequence[str],
    methods: str | Sequence[str] | None = None,
    presets: str | Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, list[Case]]:
    """:func:`plan_cases` for several tasks on their default workloads: a task that the method/preset selection
    does not apply to is left out (``--methods tome --presets r8`` over all tasks runs only the ViT task); the
    error is raised only when the selection applies to no task at all. Unknown method names always raise. (The
    CLI and the pytest plugin use :func:`plan_sweeps`, which also takes the size and swept settings.)"""
    return {run.task: run.cases for run in plan_sweeps(tasks, DEFAULT_SIZE, None, methods, presets, options)}


@dataclass
class PlannedRun:
    """One run of a task: its sweep ``variant`` (see :func:`expand_sweeps`), task arguments and cases."""

    task: str
    variant: str
    task_kwargs: dict[str, Any]
    cases: list[Case]


def plan_sweeps(
    tasks: Sequence[str],
    size: str,
    task_kwargs: dict[str, Any] | None = None,
    methods: str | Sequence[str] | None = None,
    presets: str | Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
    ladder: str = "all",
) -> list[PlannedRun]:
    """Every run of ``tasks`` that ``task_kwargs`` asks for (one per combination of swept settings), each with
    the cases :func:`plan_cases` selects for its model family (``Task.family_for``: ``architecture=sd3`` runs
    the MMDiT's methods). As :func:`plan_all`, a selection that applies to some task only leaves the others out,
    and one that applies to none raises. An unknown ``size`` raises a ValueError naming the valid ones."""
    from .task import get_task

    out: list[PlannedRun] = []
    errors: list[TokredError] = []
    for task in tasks:
        for variant, kwargs in expand_sweeps(task, dict(task_kwargs or {})):
            family = get_task(task).family_for(size, kwargs)
            try:
                cases = plan_cases(task, methods, presets, options, family=family, ladder=ladder)
            except SelectionError as err:
                if len(tasks) == 1:
                    raise
                errors.append(err)
                continue
            out.append(PlannedRun(task, variant, kwargs, [dataclasses.replace(c, variant=variant) for c in cases]))
    if not out and errors:
        raise errors[0]
    return out


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
    """The profile's task arguments (``"task"``) and harness settings for ``task`` on workload ``size`` (the
    workload's own, over :data:`TIMING_DEFAULTS`)."""
    from .task import get_task

    if profile not in PROFILE_NAMES:
        raise SelectionError(f"unknown profile {profile!r}; valid: {', '.join(PROFILE_NAMES)}")
    settings = dict(TIMING_DEFAULTS)
    settings.update(get_task(task).profile(size, profile))
    settings["task"] = dict(settings.get("task", {}))
    return settings


def timing_settings(settings: dict[str, Any], rounds: int | None) -> TimingSettings:
    """:class:`TimingSettings` from harness settings; a bad value is a SelectionError naming it and its range."""
    try:
        return TimingSettings(
            min_rounds=settings["min_rounds"],
            max_rounds=settings["max_rounds"],
            warmup_rounds=settings["warmup_rounds"],
            budget_s=settings["budget_s"],
            target_rel_half_width=settings["target_rel_half_width"],
            rounds=rounds,
            min_time_s=settings["min_time_s"],
        )
    except (TypeError, ValueError) as err:
        raise SelectionError(f"timing settings: {err}") from None


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
    processes: int | None = None,
    compile: CompileSettings | None = None,
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
    if processes:
        parts += ["--processes", str(processes)]
    if compile is not None:
        parts += ["--compile", "--compile-backend", compile.backend]
        if compile.mode != "default":
            parts += ["--compile-mode", compile.mode]
        if not compile.fullgraph:
            parts.append("--no-compile-fullgraph")
    return shlex.join(parts)


# --- results of a case ----------------------------------------------------------------------------------------


class CaseSkipped(Exception):
    """A method that cannot run on this task's model (raised at apply time); the case is skipped."""


@dataclass
class CaseResult:
    case: Case
    times: list[float]
    extra_info: dict[str, Any]
    warmup_rounds: int = 1

    def benchmark_entry(self) -> dict[str, Any]:
        """This result as one entry of pytest-benchmark's ``benchmarks`` list (as ``test_methods.py`` names it);
        ``stats`` are those of the method's timed calls (warm-up excluded)."""
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


def token_counts(patch: Any) -> dict[str, dict[str, Any]] | None:
    """The patch's mean tokens per block since its last reset (``tokred.Patch.token_counts``), as JSON; None
    when the core does not offer them."""
    if patch is None or not hasattr(patch, "token_counts"):
        return None
    counts = patch.token_counts()
    return {str(k): dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(c) for k, c in counts.items()}


def reset_token_counts(patch: Any) -> None:
    if patch is not None and hasattr(patch, "reset_token_counts"):
        patch.reset_token_counts()


def start_sequence(workload: Any, method: Any, name: str) -> None:
    """Begin a stateful workload's sequence for ``method``: its warm-up calls untimed, and, for a method whose calls
    differ in a period (:meth:`tokred.Method.cycle_calls`, a cache), a whole cycle per timed call, the baseline's
    alike. A method without a period, or a workload that cannot time cycles, is refused (CaseSkipped) with the
    reason: no run of single calls would be a fair unit."""
    warmup, cycle = int(method.warmup_calls()), method.cycle_calls()
    if cycle is None:
        raise CaseSkipped(
            f"{name}: its denoiser calls are not periodic (it decides per generation or per call which calls reuse), "
            f"so no run of single calls ({unit_of(workload)}) is a fair timed unit; time it by whole generations "
            "(text_to_image: --set unit=generation)"
        )
    if cycle == 1:
        workload.start(warmup)
    elif "cycle" in inspect.signature(workload.start).parameters:
        workload.start(warmup, cycle=int(cycle))
    else:
        raise CaseSkipped(f"{name}: its calls repeat in cycles of {cycle}, and this workload's timed call "
                          f"({unit_of(workload)}) cannot time a cycle; time it by whole generations")


def compile_target(task: Any) -> Any:
    """The module a compiled run compiles: the task's :meth:`~tokred.bench.task.Task.compile_target` (a task
    written before compiled runs: its model, when that is a module)."""
    import torch

    own = getattr(task, "compile_target", None)
    target = own() if callable(own) else task.model
    if not isinstance(target, torch.nn.Module):
        raise SelectionError(f"task {getattr(task, 'name', type(task).__name__)!r} has no module to compile "
                             f"(compile_target() gave a {type(target).__name__}); run it without --compile")
    return target


def _ratio(a: Any, b: Any) -> float | None:
    ok = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in (a, b))
    return float(a) / float(b) if ok else None


# --- the task session ----------------------------------------------------------------------------------------


class TaskRun:
    """One task set up once, its reference and baseline measured, and cases run against it."""

    def __init__(
        self,
        task: str,
        size: str = DEFAULT_SIZE,
        device: str = "cpu",
        dtype: str | None = None,
        task_kwargs: dict[str, Any] | None = None,
        profile: str = "default",
        rounds: int | None = None,
        command: str | None = None,
        compile: CompileSettings | dict[str, Any] | None = None,
        **timing: Any,
    ) -> None:
        """``task_kwargs``: task constructor arguments and harness settings (:data:`HARNESS_SETTINGS`: ``threads``,
        ``budget_s``, ``min_rounds``, ``max_rounds``, ``warmup_rounds``, ``target_rel_half_width``,
        ``min_time_s``, ``processes``), as ``--set`` gives them; ``timing``: harness settings given in code (over
        the profile's; ``--set`` over both). ``rounds`` fixes the number of timed rounds. ``compile``: time the
        task's module under ``torch.compile`` (:mod:`tokred.bench.compiled`; None: eager)."""
        from .task import get_task
        from .workers import check_processes

        if isinstance(compile, dict):
            compile = CompileSettings(**compile)
        self.compile: CompileSettings | None = compile

        # what a timing worker process builds its own run from (one process each: no pools of pools)
        self._worker_spec = {"task": task, "size": size, "device": device, "dtype": dtype,
                             "task_kwargs": {k: v for k, v in (task_kwargs or {}).items() if k != "processes"},
                             "profile": profile, "rounds": rounds, "command": "-", **timing, "processes": 1,
                             "compile": compile.as_dict() if compile is not None else None}

        self.task_name = task
        self.task_cls = get_task(task)
        self.size = size
        self.device = device
        self.dtype = dtype
        self.user_kwargs = dict(task_kwargs or {})
        self.profile = profile
        settings = profile_settings(task, size, profile)
        unknown = set(timing) - set(HARNESS_SETTINGS)
        if unknown:
            raise TypeError(
                f"unknown timing settings: {', '.join(sorted(unknown))}; valid: {', '.join(HARNESS_SETTINGS)}"
            )
        user_harness = {k: v for k, v in self.user_kwargs.items() if k in HARNESS_SETTINGS}
        env = os.environ.get(PROCESSES_ENV, "").strip()
        if env and "processes" not in timing and "processes" not in user_harness:
            try:
                settings["processes"] = int(env)
            except ValueError:
                raise SelectionError(f"{PROCESSES_ENV}={env!r}: expected a process count, an int >= 1") from None
        settings.update(timing)
        settings.update(user_harness)
        kwargs = settings.pop("task")
        kwargs.setdefault("progress", False)
        kwargs = accepted_kwargs(self.task_cls, kwargs)
        kwargs.update({k: v for k, v in self.user_kwargs.items() if k not in HARNESS_SETTINGS})
        self.task_kwargs = kwargs
        self.settings = {k: settings[k] for k in HARNESS_SETTINGS}
        if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
            raise SelectionError(f"rounds must be an int >= 1, got {rounds!r}")
        self.timing = timing_settings(self.settings, rounds)
        if self.settings["threads"] is not None:
            try:
                check_threads(self.settings["threads"])
            except ValueError as err:
                raise SelectionError(str(err)) from None
        try:
            self.processes = check_processes(self.settings["processes"])
        except ValueError as err:
            raise SelectionError(str(err)) from None
        self._pool: Any = None
        self.fixed_rounds = rounds
        # what the runner reports; with adaptive rounds, the minimum
        self.rounds = rounds if rounds is not None else self.timing.min_rounds
        self.warmup_rounds = self.timing.warmup_rounds
        self.command = command or reproduce_command(task, size, device, dtype, task_kwargs=self.user_kwargs,
                                                    profile=profile, rounds=rounds, compile=compile)
        self.task: Any = None
        self._built: Any = None
        self._setup_error: str | None = None
        self.threads: int | None = self.settings["threads"]
        self.baseline_quality: dict[str, float] = {}
        self.baseline_quality_ci: dict[str, tuple[float, float]] = {}
        self.baseline_quality_n: dict[str, int] = {}
        self.baseline_per_image: dict[str, list[float]] = {}  # the baseline's per-image values (paired metrics)
        self.baseline_binary: set[str] = set()
        self.baseline_speed: dict[str, float] = {}
        self.setup_s = 0.0

    def build(self) -> Any:
        """Construct the task without setting it up (cheap), so that a bad task argument (SelectionError naming
        it) is reported before anything runs; decides the thread count."""
        kwargs = dict(self.task_kwargs)
        if self.dtype is not None:
            kwargs["dtype"] = self.dtype
        try:
            self._built = self.task_cls(size=self.size, device=self.device, **kwargs)
        except TypeError as err:
            valid = [p for p in inspect.signature(self.task_cls.__init__).parameters if p not in ("self", "kwargs")]
            raise SelectionError(
                f"task {self.task_name!r}: {err}; its arguments: {', '.join(valid)}; harness settings: "
                f"{', '.join(HARNESS_SETTINGS)}"
            ) from None
        except ValueError as err:
            raise SelectionError(f"task {self.task_name!r}: {err}") from None
        if self.settings["threads"] is None:
            default = getattr(self._built, "default_threads", None)
            self.threads = default() if callable(default) else None
        return self._built

    @property
    def family(self) -> str:
        """The model family of this run's workload (which methods apply)."""
        return self.task_cls.family_for(self.size, self.task_kwargs)

    def release(self) -> None:
        """Drop the set-up task and its model (a sweep's next run builds its own), and end the timing workers."""
        self.task = None
        self._built = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def pool(self) -> Any:
        """The timing workers (:class:`tokred.bench.workers.WorkerPool`, started on first use), or None with
        ``processes=1``."""
        if self.processes <= 1:
            return None
        if self._pool is None:
            from .workers import WorkerPool

            self._pool = WorkerPool(self._worker_spec, self.processes).start()
        return self._pool

    def setup_timing(self) -> TaskRun:
        """Set up only what timing needs: the task's model and inputs (``task.setup()``), no reference outputs, no
        quality, no baseline measurement. What a timing worker process does."""
        if self.task is None:
            task = self._built or self.build()
            with torch_threads(self.threads):
                task.setup()
            self.task = task
        return self

    def setup(self) -> TaskRun:
        """Build the task, record its reference and the baseline's quality and speed (GFLOPs, memory)."""
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

    def _reference_metrics(self, task: Any) -> set[str]:
        return {m.name for m in type(task).metrics if getattr(m, "reference", False)}

    def _setup(self) -> None:
        start = time.perf_counter()
        task = self._built or self.build()
        self.pool()  # the workers build their models while this process records the reference
        with torch_threads(self.threads):
            task.setup()
            quality = task.record_reference()  # also warms the model up
            self.task = task
            if quality is None:  # a task that does not score its reference outputs
                quality = task.evaluate()
            self._set_baseline_quality(quality)
            self.baseline_speed = self._measure_speed()
        self.setup_s = time.perf_counter() - start

    def _set_baseline_quality(self, quality: Any) -> None:
        """The baseline's quality without the metrics that compare the model with itself (PSNR 100, agreement
        100%): absent, not perfect."""
        drop = self._reference_metrics(self.task)
        self.baseline_quality = {k: v for k, v in dict(quality).items() if k not in drop}
        self.baseline_quality_ci = {k: v for k, v in getattr(quality, "ci", {}).items() if k not in drop}
        self.baseline_quality_n = {k: v for k, v in getattr(quality, "n", {}).items() if k not in drop}
        self.baseline_per_image = {k: list(v) for k, v in getattr(quality, "per_image", {}).items() if k not in drop}
        self.baseline_binary = set(getattr(quality, "binary", set())) - drop

    def _paired_baseline(self, quality: Any) -> dict[str, list[float]]:
        """The baseline's per-image values to pair ``quality``'s with: its own, and for a reference metric
        (compared with the unreduced model's outputs) with a finite ``self_value``, that value for every image
        (SSIM 1, agreement 100%: the unreduced model against itself)."""
        out = dict(self.baseline_per_image)
        for metric in type(self.task).metrics:
            values = getattr(quality, "per_image", {}).get(metric.name)
            if metric.reference and metric.self_value is not None and values is not None:
                binary = metric.name in getattr(quality, "binary", set())
                out.setdefault(metric.name, [1.0 if binary else float(metric.self_value)] * len(values))
        return out

    def _measure_speed(self) -> dict[str, float]:
        """The task's measure_speed (GFLOPs, memory and task-specific numbers). A task written for the older
        protocol, which times inside measure_speed, is asked for its cheapest run (``timing=False`` or a single
        call); its timings are not used: the harness times the workload."""
        fn = self.task.measure_speed
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in (("timing", False), ("warmup", 0), ("repeats", 1)) if k in params}
        if "timing" in kwargs:
            kwargs.pop("warmup", None), kwargs.pop("repeats", None)
        return dict(fn(**kwargs))

    def items_per_call(self, speed: dict[str, Any]) -> float:
        for source in (speed, self.task.describe()):
            value = source.get("batch_size")
            if isinstance(value, int | float) and value > 0:
                return float(value)
        return 1.0

    def base_info(self) -> dict[str, Any]:
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
            "versions": versions(),
            "command": self.command,
            "metrics": [
                {"name": m.name, "better": m.better, "unit": m.unit, "kind": m.kind,
                 **({"primary": True} if getattr(m, "primary", False) else {}),
                 **({"note": m.note} if getattr(m, "note", "") else {})} for m in type(task).metrics
            ],
            "task_info": results_mod.to_jsonable(info),
        }

    def _on_cpu(self) -> bool:
        import torch

        return torch.device(getattr(self.task, "torch_device", self.task.device)).type == "cpu"

    def notes(self, case: Case) -> list[str]:
        """Caveats for this case's row: the task's own (``task.notes()``, its workload's) and, on random weights,
        the method's (``Method.random_weights_caveat``: a method whose reduction follows trained features)."""
        from ..registry import get_method

        own = getattr(self.task, "notes", None)
        out = [str(n) for n in (own() if callable(own) else [])]
        if getattr(self.task, "random_weights", False) and not case.is_baseline:
            caveat = getattr(get_method(case.method), "random_weights_caveat", "")
            if caveat:
                out.append(caveat)
        return out

    def run_case(self, case: Case) -> CaseResult:
        """Measure one case; the model is unpatched again afterwards, whatever happens."""
        self.setup()
        with torch_threads(self.threads) as threads:
            return self._run_case(case, threads)

    def _run_case(self, case: Case, threads: int) -> CaseResult:
        import tokred

        task = self.task
        workload = task.workload()
        pool = self.pool()
        if case.is_baseline:
            quality = Quality(self.baseline_quality, self.baseline_quality_ci, self.baseline_quality_n,
                              self.baseline_per_image, self.baseline_binary)
            speed = self.baseline_speed
            timings, tokens = self.time_case(case, self.timing, threads) if pool is None else (None, None)
        else:
            holder: dict[str, Any] = {}
            try:
                holder["patch"] = tokred.apply(task.model, case.method, **case.options)
            except UnsupportedModelError as err:
                raise CaseSkipped(str(err)) from err
            try:
                quality = task.evaluate()
                if pool is None:
                    timings, tokens = self._time_applied(case, holder, self.timing, threads, workload)
                else:  # timed in the workers; FLOPs and memory here, from the method's steady state
                    timings, tokens = None, None
                    if getattr(workload, "stateful", False):  # a cache's FLOPs over its cycle
                        start_sequence(workload, holder["patch"].method, case.method)
                speed = self._measure_speed()
            finally:
                patch = holder.pop("patch", None)
                if patch is not None:
                    patch.remove()
                tokred.remove(task.model)
        if pool is not None:  # quality, FLOPs and memory are measured once, here; the rounds in the workers
            from .workers import time_replicated

            timings, tokens = time_replicated(pool, case, self.timing, threads, self._on_cpu(),
                                              paired=not case.is_baseline)
        info = self._extra_info(case, timings, quality, speed, threads, tokens, unit_of(workload),
                                calls_per_unit=int(getattr(workload, "calls", 1) or 1))
        return CaseResult(case, timings.method_times, info, timings.warmup_rounds)

    def time_case(self, case: Case, settings: TimingSettings,
                  threads: int | None = None) -> tuple[Timings, dict[str, Any] | None]:
        """Time ``case`` here (:func:`time_paired`: the baseline row alone, a method paired with the baseline):
        the patch is applied for it and removed afterwards, whatever happens (what a timing worker does for each
        pass). Its timings and the token counts of its latest method call."""
        import tokred

        if threads is None:
            with torch_threads(self.threads) as threads:
                return self.time_case(case, settings, threads)
        task = self.task
        workload = task.workload()
        if case.is_baseline:
            tokred.remove(task.model)
            if getattr(workload, "stateful", False):
                workload.start(0)
            return self._timed(workload, settings, Monitor(threads=threads, check_cpu=self._on_cpu())), None
        holder: dict[str, Any] = {}
        try:
            holder["patch"] = tokred.apply(task.model, case.method, **case.options)
        except UnsupportedModelError as err:
            raise CaseSkipped(str(err)) from err
        try:
            return self._time_applied(case, holder, settings, threads, workload)
        finally:
            patch = holder.pop("patch", None)
            if patch is not None:
                patch.remove()
            tokred.remove(task.model)

    def _time_applied(self, case: Case, holder: dict[str, Any], settings: TimingSettings, threads: int,
                      workload: Any) -> tuple[Timings, dict[str, Any] | None]:
        """Paired rounds of ``case``, whose patch ``holder["patch"]`` is applied (and may be replaced: the
        caller removes ``holder["patch"]`` afterwards, whatever happens)."""
        import tokred

        task = self.task
        stateful = getattr(workload, "stateful", False)
        monitor = Monitor(threads=threads, check_cpu=self._on_cpu())
        tokens: dict[str, Any] = {}

        # compiled: pause, never re-apply (new patch objects would fail dynamo's guards and recompile every round)
        pause = stateful or self.compile is not None

        def use_baseline() -> None:
            if pause:  # the method's state from its earlier calls must survive the baseline's call
                holder["patch"].pause()
            else:
                holder.pop("patch").remove()

        def use_method() -> None:
            if pause:
                holder["patch"].resume()
            else:
                holder["patch"] = tokred.apply(task.model, case.method, **case.options)

        def after_method() -> None:  # the token counts of the latest method call
            counts = token_counts(holder.get("patch"))
            if counts is not None:
                tokens["counts"] = counts
            reset_token_counts(holder.get("patch"))
            if stateful:
                workload.advance()

        if stateful:  # a fresh sequence, the method's warm-up calls run untimed; a cache's cycle is the unit
            start_sequence(workload, holder["patch"].method, case.method)
        timings = self._timed(workload, settings, monitor, baseline=workload, use_baseline=use_baseline,
                              use_method=use_method, after_method=after_method)
        return timings, tokens.get("counts")

    def _timed(self, workload: Any, settings: TimingSettings, monitor: Monitor, **paired: Any) -> Timings:
        """:func:`time_paired` of ``workload`` (``paired``: its baseline and switches), eager or, with
        ``self.compile``, with the task's module compiled first and the compile warm-up rounds run untimed (see
        :mod:`tokred.bench.compiled`); the compile record goes to ``Timings.extra["compile"]``."""
        if self.compile is None:
            return time_paired(workload, settings, monitor, **paired)
        import torch

        label = self.compile.label
        target = compile_target(self.task)
        compile_module(target, self.compile)
        try:
            def round_once(timer: Any) -> None:  # one round exactly as the timed ones, its calls timed by `timer`
                time_paired(workload, TimingSettings(rounds=1, warmup_rounds=0),
                            Monitor(threads=monitor.threads, check_cpu=False), call_timer=timer, **paired)

            info: dict[str, Any] = {**self.compile.as_dict(), **warm_up(round_once)}
            watch = Watch()
            try:
                timings = time_paired(workload, settings, monitor, **paired)
            except torch._dynamo.exc.TorchDynamoException as err:  # a recompile that failed in the timed rounds
                raise CompileFailed(f"{type(err).__name__}: {str(err).strip().splitlines()[0]}") from err
            info["timed_compilations"] = int(watch.delta()["compilations"])
            info["fx_graph_cache"] = fx_graph_cache()
            timings.extra["compile"] = info
            return timings
        except CompileFailed as err:
            raise CaseSkipped(f"{label} failed: {err}") from err
        finally:
            uncompile_module(target)

    def _paired_info(self, case: Case, quality: Any, values: dict[str, Any]) -> dict[str, Any]:
        """Schema 4: the per-image values of the paired metrics (``quality_per_image``, hits as 0/1) and, for a
        case other than the baseline, each one's difference from the baseline on the same images with its 95%
        interval (``quality_delta``) and McNemar's p-value for hits (``quality_delta_p``); see
        :mod:`tokred.bench.paired`. Schema 6: a case other than the baseline always carries ``quality_delta``,
        empty with ``quality_delta_reason`` where nothing could be paired."""
        from .paired import quality_deltas

        per_image = {k: v for k, v in getattr(quality, "per_image", {}).items() if k in values}
        out: dict[str, Any] = {}
        if per_image:
            binary = set(getattr(quality, "binary", set())) & set(per_image)
            out["quality_per_image"] = {k: [int(x) if k in binary else float(x) for x in v]
                                        for k, v in per_image.items()}
        if case.is_baseline:
            return out
        deltas: dict[str, list[float]] = {}
        if per_image:
            deltas, pvalues = quality_deltas(per_image, self._paired_baseline(quality), binary)
            if pvalues:
                out["quality_delta_p"] = pvalues
        out["quality_delta"] = deltas
        if not deltas:
            out["quality_delta_reason"] = unpaired_reason(
                random_weights=bool(getattr(self.task, "random_weights", False)), size=self.size,
                has_quality=bool(values), has_per_image=bool(per_image))
        return out

    def _extra_info(self, case: Case, timings: Timings, quality: Any, speed: dict[str, Any], threads: int,
                    tokens: dict[str, Any] | None, unit: str, calls_per_unit: int = 1) -> dict[str, Any]:
        times = timings.method_times
        median = statistics.median(times)
        base_median = statistics.median(timings.baseline_times) if timings.paired else median
        estimate = timings.speedup()
        # a timed unit of several denoiser calls (a cache's cycle) makes items_per_call images per call
        items = self.items_per_call(speed) * calls_per_unit
        drop = self._reference_metrics(self.task) if case.is_baseline else set()
        values = {k: v for k, v in dict(quality).items() if k not in drop}
        gflops, base_gflops = speed.get("gflops"), self.baseline_speed.get("gflops")
        ideal = 1.0 if case.is_baseline else _ratio(base_gflops, gflops)
        info = self.base_info()
        info.update(
            method=case.method,
            preset=case.preset,
            options=results_mod.to_jsonable(case.options),
            options_repr=", ".join(f"{k}={v!r}" for k, v in case.options.items()),
            quality=results_mod.to_jsonable(values),
            quality_ci={k: [float(lo), float(hi)] for k, (lo, hi) in getattr(quality, "ci", {}).items()
                        if k in values},
            quality_n={k: int(n) for k, n in getattr(quality, "n", {}).items() if k in values},
            baseline_quality=results_mod.to_jsonable(self.baseline_quality),
            **self._paired_info(case, quality, values),
            preset_order=case.order,
            speed=results_mod.to_jsonable(speed),
            latency_ms=median * 1000.0,
            baseline_latency_ms=base_median * 1000.0,
            throughput_per_s=items / median,
            s_per_image=median / items,
            items_per_call=items / calls_per_unit,
            speedup=estimate.value,
            speedup_ci=[estimate.ci[0], estimate.ci[1]],
            round_ratios=list(estimate.ratios),
            rounds=timings.rounds,
            processes=timings.processes,
            process_speedups=list(estimate.process_medians) if timings.process_rounds and timings.paired else None,
            process_rounds=list(timings.process_rounds) if timings.process_rounds else None,
            process_latency_ms=([statistics.median(t) * 1000.0 for t in timings.split(times)]
                                if timings.process_rounds else None),
            method_time_s=timings.method_time_s,
            min_time_s=self.timing.min_time_s,
            warmup_rounds=timings.warmup_rounds,
            threads=threads,
            num_threads=threads,
            gflops=gflops,
            baseline_gflops=base_gflops,
            flops_ideal_speedup=ideal,
            efficiency=None if ideal is None else estimate.value / ideal,
            peak_mem_mb=speed.get("peak_mem_mb"),
            notes=self.notes(case),
        )
        info.update(timings.monitor.info())
        if "compile" in timings.extra:
            info["compile"] = timings.extra["compile"]
        if not case.is_baseline:
            from ..registry import get_method

            info["method_kind"] = get_method(case.method).kind
        if tokens is not None:
            info["tokens"] = tokens
        # schema 3: what one timed call is, the workload kind, architecture and resolution (where they apply)
        info.setdefault("unit", unit)
        info.setdefault("workload", self.size)
        for key, value in run_settings(info.get("task_info")).items():
            info.setdefault(key, value)
        return results_mod.CaseRecord.from_values(info).to_extra_info()
