"""pytest plugin (entry point ``pytest11``): benchmark every registered method on a tokred task.

A test that takes the ``tokred_case`` fixture (``benchmarks/test_methods.py``)::

    def test_method(tokred_case, benchmark):
        tokred_case.run(benchmark)

is parametrized over the chosen tasks x (the baseline + every registered method x its presets for the task's
model family), so a method installed through the ``tokred.methods`` entry point is benchmarked without edits.
Each benchmark is measured by the same harness as ``tokred run`` (:mod:`tokred.bench.harness`: paired,
alternating baseline and method rounds, warm-up dropped, adaptive rounds, bootstrap interval of the speedup); the
method's timed calls are recorded into the ``benchmark`` fixture as its rounds (so pytest-benchmark's statistics,
``--benchmark-json``, ``--benchmark-autosave`` and ``compare`` see them) and ``benchmark.extra_info`` gets the
results-schema keys: quality with intervals, speedup with its interval and per-round ratios, FLOPs-ideal speedup,
efficiency, GFLOPs, peak memory, threads, other processes' CPU, load average, contention, options, task, model,
device, versions.

Options (group ``tokred``)::

    --tokred-task=NAME[,NAME]   tasks (default: all registered)     --tokred-size=embedded|arch|full
    --tokred-methods=A,B        methods (default: all for the task) --tokred-device=cpu|cuda[:i]
    --tokred-presets=P,M:P      presets (default: all)              --tokred-dtype=float32|float16|bfloat16
    --tokred-set=KEY=VALUE      a task argument or harness setting (threads, budget_s, min_rounds, max_rounds,
                                warmup_rounds; repeatable)
    --tokred-rounds=N           fixed timed rounds (default: adaptive)  --tokred-quick  smaller embedded runs
    --tokred-processes=N        spread each case's rounds over N spawned worker processes (1: in-process;
                                default: the workload's profile)
    --tokred-compile            time the baseline and every method with the task's module under torch.compile
                                (compiled before the timed rounds; see tokred.bench.compiled), with
    --tokred-compile-backend=NAME (default inductor)  --tokred-compile-mode=default|reduce-overhead|max-autotune
    --no-tokred-compile-fullgraph  graph breaks allowed and counted (default: fullgraph=True)

Usage: ``pytest benchmarks/ --benchmark-only --benchmark-json=out.json`` (also ``--benchmark-autosave``,
``pytest-benchmark compare``; ``--benchmark-skip`` and ``--benchmark-disable`` skip them: nothing is measured).
torch and the registries are imported only when a test asks for ``tokred_case`` or a tokred option is given, so
the plugin costs nothing in unrelated test runs.

Checked at start-up (a one-line usage error, exit code 4, before anything runs): the tokred options (names,
task arguments, harness settings, rounds, device) when any is given, and the ``--benchmark-json`` path (its
folder must exist and be writable). When the tokred benchmarks run and the ``--benchmark-json`` file already
exists, it is copied to ``FILE.bak`` (``FILE.bak1``, ... if that exists) before pytest-benchmark replaces it, and a
line says so.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import pytest

FIXTURE = "tokred_case"
_RUNS_KEY = pytest.StashKey[dict]()
_COLLECTED_KEY = pytest.StashKey[bool]()  # tokred benchmarks were parametrized in this session
_BACKED_UP_KEY = pytest.StashKey[bool]()
# the options that make the plugin check its selection at start-up (their defaults select everything)
_DEFAULTS = {"tokred_task": "all", "tokred_methods": "all", "tokred_presets": "all", "tokred_set": [],
             "tokred_device": "cpu", "tokred_dtype": None, "tokred_size": "embedded", "tokred_rounds": None,
             "tokred_quick": False, "tokred_processes": None, "tokred_compile": False,
             "tokred_compile_backend": None, "tokred_compile_mode": None, "tokred_compile_fullgraph": None}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tokred", "tokred benchmarks (token-reduction methods x tasks)")
    group.addoption("--tokred-task", default="all", help="task name(s), comma-separated, or 'all' (default)")
    group.addoption("--tokred-methods", default="all", help="method names, comma-separated, or 'all' (default)")
    group.addoption(
        "--tokred-presets", default="all", help="preset names (r8) or method:preset (tome:r8), or 'all' (default)"
    )
    group.addoption("--tokred-device", default="cpu", help="torch device (default: cpu)")
    group.addoption(
        "--tokred-dtype",
        default=None,
        choices=("float32", "float16", "bfloat16"),
        help="model dtype (default: the task's; float32 on CPU)",
    )
    group.addoption(
        "--tokred-size",
        default="embedded",  # tokred.bench.workload.DEFAULT_SIZE (not imported: the plugin loads nothing heavy)
        help="embedded: the offline models shipped with tokred (default); arch: the real architectures at random "
        "init (speed only, offline); full: the full-size models",
    )
    group.addoption(
        "--tokred-set", action="append", default=[], metavar="KEY=VALUE",
        help="task argument, or harness setting threads/budget_s/min_rounds/max_rounds/warmup_rounds (repeatable)",
    )  # fmt: skip
    group.addoption(
        "--tokred-rounds", type=int, default=None, help="fixed timed rounds per benchmark (default: adaptive, >= 5)"
    )
    group.addoption("--tokred-quick", action="store_true", help="smaller embedded runs (a smoke test)")
    group.addoption(
        "--tokred-processes", type=int, default=None, metavar="N",
        help="spread each case's timed rounds over N spawned worker processes (1: in this process; default: the "
        "workload's, 3 for arch and the embedded ViT)",
    )  # fmt: skip
    group.addoption("--tokred-compile", action="store_true",
                    help="time the baseline and every method with the task's module (denoiser, ViT) under "
                    "torch.compile, compiled before the timed rounds")
    group.addoption("--tokred-compile-backend", default=None, metavar="NAME",
                    help="torch.compile backend with --tokred-compile (default inductor)")
    group.addoption("--tokred-compile-mode", default=None,
                    choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                    help="torch.compile mode with --tokred-compile (default: default)")
    group.addoption("--tokred-compile-fullgraph", default=None, action=argparse.BooleanOptionalAction,
                    help="with --tokred-compile: fullgraph=True (default) or, --no-tokred-compile-fullgraph, graph "
                    "breaks allowed and counted")


def _settings(config: pytest.Config) -> dict[str, Any]:
    from tokred.bench.harness import parse_assignments

    return {
        "tasks": config.getoption("tokred_task"),
        "methods": config.getoption("tokred_methods"),
        "presets": config.getoption("tokred_presets"),
        "device": config.getoption("tokred_device"),
        "dtype": config.getoption("tokred_dtype"),
        "size": config.getoption("tokred_size"),
        "task_kwargs": parse_assignments(config.getoption("tokred_set"), "--tokred-set"),
        "rounds": config.getoption("tokred_rounds"),
        "profile": "quick" if config.getoption("tokred_quick") else "default",
        "processes": config.getoption("tokred_processes"),
        "compile": _compile(config),
    }


def _compile(config: pytest.Config) -> Any:
    """The compile settings of the ``--tokred-compile*`` options (None: eager); a usage error names the option."""
    from tokred.bench.compiled import from_options

    try:
        return from_options(config.getoption("tokred_compile"), config.getoption("tokred_compile_backend"),
                            config.getoption("tokred_compile_mode"), config.getoption("tokred_compile_fullgraph"),
                            prefix="--tokred-")
    except ValueError as err:
        raise pytest.UsageError(str(err)) from None


def _timing(s: dict[str, Any]) -> dict[str, Any]:
    """The harness settings the plugin's own options give (``--tokred-processes``), checked: a usage error names
    the option."""
    processes = s["processes"]
    if processes is None:
        return {}
    from tokred.bench.workers import check_processes

    try:
        check_processes(processes, "--tokred-processes")
    except ValueError as err:
        raise pytest.UsageError(str(err)) from None
    given = s["task_kwargs"].get("processes", processes)
    if given != processes:
        raise pytest.UsageError(f"--tokred-processes={processes} and --tokred-set processes={given!r} disagree; "
                                "give one of them")
    return {"processes": processes}


def _plan(config: pytest.Config, check: bool = False) -> list[Any]:
    """The selected cases; a bad selection is a pytest usage error (one line, exit code 4). ``check``: also
    build every run's task (its arguments and harness settings checked, nothing set up), check the rounds and
    the device, as ``tokred run`` does before it runs anything."""
    from tokred.bench.harness import TaskRun, check_device, check_selections, parse_list, plan_sweeps, task_names
    from tokred.errors import TokredError

    try:
        s = _settings(config)
        # an empty selection (--tokred-methods=) is an error, not "all"
        check_selections([("--tokred-task", s["tasks"], "task"), ("--tokred-methods", s["methods"], "method"),
                          ("--tokred-presets", s["presets"], "preset")])
        # one run per task and per combination of swept settings (--tokred-set architecture=sd15,sd3), each with
        # its model family's methods
        planned = plan_sweeps(task_names(s["tasks"]), s["size"], s["task_kwargs"], s["methods"], s["presets"])
        if check:
            rounds = s["rounds"]
            if rounds is not None and rounds < 1:
                raise pytest.UsageError(f"--tokred-rounds={rounds}: the timed rounds per benchmark must be >= 1 "
                                        "(leave it out for adaptive rounds)")
            check_device(str(s["device"]), "--tokred-device")
            timing = _timing(s)
            for run in planned:
                TaskRun(run.task, size=s["size"], device=s["device"], dtype=s["dtype"], task_kwargs=run.task_kwargs,
                        profile=s["profile"], rounds=s["rounds"], command="-", compile=s["compile"], **timing).build()
    except (TokredError, ValueError) as err:  # (ValueError: an unknown --tokred-size names the valid ones)
        raise pytest.UsageError(str(err)) from None
    cases = [c for run in planned for c in run.cases]
    if parse_list(s["methods"]) is not None and not any(not c.is_baseline for c in cases):
        raise pytest.UsageError(f"no benchmarks selected by --tokred-methods={s['methods']}")
    return cases


def _check_benchmark_json(config: pytest.Config) -> None:
    """``--benchmark-json=PATH`` is written after every benchmark has run: a folder that is missing or not
    writable would lose them all, so it is a usage error now."""
    path = _benchmark_json(config)
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise pytest.UsageError(f"--benchmark-json={path} is a folder; give a file path")
    if not os.path.isdir(folder):
        raise pytest.UsageError(f"--benchmark-json={path}: the folder {folder} does not exist; create it or choose "
                                "another path (the results are written after every benchmark has run)")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise pytest.UsageError(f"--benchmark-json={path}: cannot write in {folder}; choose another path")


def _benchmark_json(config: pytest.Config) -> str | None:
    try:
        value = config.getoption("benchmark_json")
    except ValueError:  # pytest-benchmark not installed
        return None
    return None if value is None else os.fspath(value)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    _check_benchmark_json(config)
    # Check explicit tokred options at start-up, so a typo or a bad value is one usage error rather than a
    # collection error or a traceback in every benchmark. Without tokred options nothing is imported here.
    explicit = any(config.getoption(name) != default for name, default in _DEFAULTS.items())
    if explicit:
        _plan(config, check=True)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]) -> None:
    """pytest-benchmark is about to write ``--benchmark-json``: if the file exists and tokred's benchmarks ran
    in this session, copy it to ``FILE.bak`` first (a new ``FILE.bakN`` if that is taken), so no earlier results
    are lost, and say so."""
    path = _benchmark_json(config)
    if path is None or not config.stash.get(_COLLECTED_KEY, False) or config.stash.get(_BACKED_UP_KEY, False):
        return
    config.stash[_BACKED_UP_KEY] = True
    if not os.path.isfile(path):
        return
    from tokred.bench.files import atomic_write

    with open(path, "rb") as fh:
        content = fh.read()
    backup, n = f"{path}.bak", 0
    while os.path.exists(backup) and not _holds(backup, content):
        n += 1
        backup = f"{path}.bak{n}"
    if not os.path.exists(backup):
        atomic_write(backup, content, purpose="--benchmark-json backup")
    message = f"tokred: {path} already existed: its previous content is kept in {backup}"
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(message, yellow=True)
    else:  # pragma: no cover - -p no:terminal
        print(message)


def _holds(path: str, content: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read() == content
    except OSError:
        return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if FIXTURE not in metafunc.fixturenames:
        return
    cases = _plan(metafunc.config)
    metafunc.config.stash[_COLLECTED_KEY] = True
    metafunc.parametrize(FIXTURE, [c.param for c in cases], ids=[c.id for c in cases], indirect=True)


class BoundCase:
    """What a benchmark test receives: one case and the session's set-up task."""

    def __init__(self, case: Any, run: Any, config: pytest.Config | None = None) -> None:
        self.case = case
        self.harness_run = run
        self.config = config

    @property
    def task(self) -> Any:
        return self.harness_run.setup().task

    def run(self, benchmark: Any) -> dict[str, Any]:
        """Benchmark the case with the harness and record it in pytest-benchmark's fixture; returns (and stores)
        ``extra_info``."""
        from tokred.bench.harness import CaseSkipped

        if getattr(benchmark, "disabled", False):  # the paired rounds would be timed for nothing
            explicit = self.config is None or self.config.getoption("benchmark_disable", False)
            pytest.skip("--benchmark-disable: nothing is measured" if explicit else
                        "pytest-benchmark disabled benchmarks (xdist is on): nothing is measured")
        benchmark.group = self.case.task
        try:
            result = self.harness_run.run_case(self.case)
        except CaseSkipped as err:
            pytest.skip(str(err))
        record_rounds(benchmark, result.times)
        benchmark.extra_info.update(result.extra_info)
        return result.extra_info


def record_rounds(benchmark: Any, times: list[float]) -> None:
    """Give pytest-benchmark's fixture the method's timed calls (seconds, one call per round) as its rounds.

    The rounds are adaptive and paired with baseline calls, which ``benchmark.pedantic`` (a fixed number of rounds
    of one function) cannot run, so the harness times them and the fixture receives the durations the way its own
    pedantic loop would record them (one stats entry, one ``update`` per round). With ``--benchmark-disable`` the
    fixture keeps no statistics, and nothing is recorded.
    """
    if getattr(benchmark, "disabled", False):
        return
    stats = benchmark._make_stats(1)  # what pedantic(iterations=1) does before its rounds
    for duration in times:
        stats.update(duration)
    benchmark._mode = "tokred paired rounds"  # marks the fixture as used (pytest-benchmark warns otherwise)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """End the session's timing worker processes (``--tokred-processes``) with their runs."""
    for run in session.config.stash.get(_RUNS_KEY, {}).values():
        run.release()


@pytest.fixture(scope="session")
def tokred_runs(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Per-task harness runs of this session (each task set up once, its baseline measured once)."""
    return request.config.stash.setdefault(_RUNS_KEY, {})


@pytest.fixture
def tokred_case(request: pytest.FixtureRequest, tokred_runs: dict[str, Any]) -> BoundCase:
    """The (task, method, preset) of this parametrized benchmark, bound to its task's session-wide setup."""
    from tokred.bench.harness import (
        BASELINE,
        Case,
        TaskRun,
        expand_sweeps,
        method_presets,
        parse_list,
        reproduce_command,
    )
    from tokred.bench.task import get_task
    from tokred.registry import get_method

    param = getattr(request, "param", None)
    if param is None:
        pytest.fail(f"{FIXTURE} is parametrized by the tokred plugin; it cannot be used by hand")
    task_part, method, preset = param.split(":", 2)
    task, _, variant = task_part.partition("@")
    s = _settings(request.config)
    kwargs = dict(expand_sweeps(task, s["task_kwargs"]))[variant]
    family = get_task(task).family_for(s["size"], kwargs)
    options = {} if method == BASELINE else method_presets(get_method(method), family).get(preset, {})
    case = Case(task, method, preset, dict(options), variant=variant)
    if task_part not in tokred_runs:
        command = reproduce_command(
            task, s["size"], s["device"], s["dtype"], parse_list(s["methods"]), parse_list(s["presets"]),
            task_kwargs=kwargs, profile=s["profile"], rounds=s["rounds"], processes=s["processes"],
            compile=s["compile"],
        )
        for other in list(tokred_runs):  # one set-up model at a time: a sweep's runs can be large
            tokred_runs.pop(other).release()
        tokred_runs[task_part] = TaskRun(
            task, size=s["size"], device=s["device"], dtype=s["dtype"], task_kwargs=kwargs,
            profile=s["profile"], rounds=s["rounds"], command=command, compile=s["compile"], **_timing(s),
        )  # fmt: skip
    return BoundCase(case, tokred_runs[task_part], request.config)
