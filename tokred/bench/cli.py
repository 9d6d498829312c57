"""The ``tokred`` command line: list methods and tasks, run benchmarks, build the leaderboard.

::

    tokred list [--json]                          methods (options, defaults, valid ranges, presets) and tasks
    tokred run --task NAME|all [--methods A,B] [--presets P,M:P] [--options K=V ...]
               [--size embedded|arch|full] [--device cpu] [--dtype float32] [--set K=V ...]
               [--rounds N] [--processes N] [--quick] [--out results/] [--resume | --force]
               [--compile [--compile-backend inductor] [--compile-mode default|reduce-overhead|max-autotune]
                [--no-compile-fullgraph]]
    tokred leaderboard RESULTS.json ... [-o leaderboard/README.md] [--no-published]
    tokred bench [run options] [--out results/] [-o leaderboard/README.md]     run every task, then the leaderboard

Results use pytest-benchmark's JSON layout (``pytest-benchmark compare`` reads them) and are written atomically
after every finished benchmark, so an interrupted run keeps what it finished (``--resume`` continues it).

Results files are never overwritten by surprise (:mod:`tokred.bench.runner`). If the ``--out`` file already
exists, ``tokred run`` stops before setting anything up (exit 2) unless it is given ``--resume`` or ``--force``.
``--resume`` keeps every benchmark in the file and runs only the cases it lacks. A case counts as done only if
its whole identity matches: task, size, device, dtype, method, preset, options and task settings (``--set`` and
the profile's). A case with other settings runs again, and the file keeps both. ``--force`` replaces the file
when the first new benchmark is written, and keeps the old file as ``FILE.bak``. A run holds a lock on its
results file from start to end. A second ``tokred run`` on the same file exits at once with code 2, naming the
file and the process holding it; it does not wait. Temporary files left by a killed run are removed by the
next run on the same file. Every output (``--out``, ``-o``) is checked before the first, slow setup: the
folder is created, the file must be writable and must not be a folder or another non-regular file (``-o
/dev/null``, a pipe), and no other run may hold its lock. A symbolic link is written through (its target is
replaced, the link stays) and locked as its target, so two runs on one file under two names exclude each other.
``--resume`` refuses a file that holds another task's results. ``-o`` must not be one of the results files read
(``tokred leaderboard``) or written (``tokred bench``).

Selections: a name given twice is selected once; an empty selection (``--methods ""``, ``--task " "``) is an
error, only ``all`` (the default) selects everything; ``--options`` and ``--presets`` exclude each other.

``tokred leaderboard`` / ``tokred bench`` write the markdown, its plots and a copy of every results file they
read (``results/`` beside the markdown), so the leaderboard can be rebuilt from what sits next to it.

Timing: paired rounds of the baseline and each method, warm-up dropped, adaptive rounds (at least 5, and at least
the workload's timing floor of method-call seconds, ``--set min_time_s=S``). ``--processes N`` spreads each case's
rounds over N spawned worker processes (the workload's profile decides when it is not given: 3 for the arch
workloads and the embedded ViT; 1 times in the run's own process), and the speedup's interval covers the
process-to-process spread.

Compiled runs (``--compile``, :mod:`tokred.bench.compiled`): the baseline and every method alike are timed with the
task's module (the denoiser, the ViT) under ``torch.compile`` (backend ``--compile-backend``, default inductor;
``--compile-mode``; ``fullgraph=True`` unless ``--no-compile-fullgraph``), compiled after the method is applied and
warmed up until nothing new compiles, outside the timed rounds; each case records its compile time, recompiles
and graph breaks (``compile``). Their results go to a file of their own (``...-compiled-inductor.json``) and a
leaderboard section of their own; a method that fails to compile is skipped with the reason. ``tokred bench``
(the main job) does not compile unless asked.

Exit codes: 0 success; 1 some benchmarks failed (the others are kept); 2 bad input or an output that cannot be
written (one line on stderr, the valid choices listed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from textwrap import fill
from typing import Any

from .workload import DEFAULT_SIZE

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# --- list ------------------------------------------------------------------------------------------------------


def _fmt_value(value: Any) -> str:
    return repr(value)


def listing(jsonable: bool = False) -> dict[str, Any]:
    """Methods (families, options with defaults and valid ranges, presets) and tasks, as plain data (JSON types
    only with ``jsonable``: tuples become lists)."""
    from ..registry import get_method, list_methods
    from .results import to_jsonable
    from .task import get_task, list_tasks

    methods = []
    for name in list_methods():
        cls = get_method(name)
        families = {}
        for family in cls.families():
            spec = {"options": cls.describe_options(family), "presets": (cls.presets or {}).get(family, {})}
            families[family] = to_jsonable(spec) if jsonable else spec
        members = [m.name for m in getattr(cls, "members", ())]
        methods.append({"name": name, "kind": cls.kind, "summary": cls.summary, "module": cls.__module__,
                        "families": families, **({"members": members} if members else {})})
    tasks = []
    for name in list_tasks():
        cls = get_task(name)
        tasks.append(
            {
                "name": name,
                "summary": cls.summary,
                "family": cls.family,
                "metrics": [{"name": m.name, "better": m.better, "unit": m.unit, "kind": m.kind} for m in cls.metrics],
                "methods": [m["name"] for m in methods if cls.family in m["families"]],
                "sizes": list(cls.sizes()),
            }
        )
    return {"methods": methods, "tasks": tasks, "architectures": architectures(methods)}


def architectures(methods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The denoiser architecture table (``--set architecture=NAME`` of text_to_image, arch and full sizes), each
    with the methods whose family it is."""
    from ..tasks.architectures import ARCHITECTURES

    return [
        {"name": a.name, "description": a.description, "class": a.model_class, "family": a.family,
         "parameters": a.parameters, "default_resolution": a.default_resolution, "pipeline": a.pipeline_class,
         "hub_id": a.hub_id, "methods": [m["name"] for m in methods if a.family in m["families"]]}
        for a in ARCHITECTURES.values()
    ]


def print_listing(data: dict[str, Any]) -> None:
    from tabulate import tabulate

    print("METHODS")
    for m in data["methods"]:
        print(f"\n{m['name']}: {m['summary']}")
        print(f"  kind {m['kind']}")
        if m.get("members"):
            print(f"  composition of {', '.join(m['members'])} (the cache outside; options as member.option)")
        for family, spec in m["families"].items():
            print(f"  family {family}")
            rows = [
                [o["name"], fill(_fmt_value(o["default"]), 24), fill(o["valid"], 36), fill(o["doc"], 56)]
                for o in spec["options"]
            ]
            # (tabulate's own maxcolwidths turns the string 'False' into True; wrap by hand)
            table = tabulate(rows, headers=["option", "default", "valid", "doc"], tablefmt="simple",
                             disable_numparse=True)
            print("\n".join("    " + line for line in table.splitlines()))
            presets = spec["presets"] or {}
            if presets:
                text = "; ".join(f"{p} ({', '.join(f'{k}={v!r}' for k, v in o.items()) or 'defaults'})"
                                 for p, o in presets.items())
                print(f"    presets: {text}")
            else:
                print("    presets: default (the defaults above)")
    print("\nTASKS")
    for t in data["tasks"]:
        arrows = {"higher": "↑", "lower": "↓"}
        quality = ", ".join(f"{x['name']} {arrows[x['better']]}" for x in t["metrics"] if x["kind"] == "quality")
        speed = ", ".join(f"{x['name']} {arrows[x['better']]}" for x in t["metrics"] if x["kind"] != "quality")
        print(f"\n{t['name']} ({t['family']}): {t['summary']}")
        print(f"  quality: {quality or '-'}")
        print(f"  speed:   {speed or '-'}")
        print(f"  methods: {', '.join(t['methods']) or '-'}")
        print(f"  sizes:   {', '.join(t.get('sizes', [])) or '-'}")
    print("\nARCHITECTURES (text_to_image --size arch|full --set architecture=NAME; a list sweeps)")
    rows = [[a["name"], a["description"], a["class"], f"{a['parameters'] / 1e9:.2f}B", a["default_resolution"],
             ", ".join(a["methods"]) or "-"] for a in data.get("architectures", [])]
    print(tabulate(rows, headers=["name", "model", "class", "params", "px", "methods"], tablefmt="simple",
                   disable_numparse=True))


def cmd_list(args: argparse.Namespace) -> int:
    data = listing(jsonable=args.json)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_listing(data)
    return EXIT_OK


# --- run -------------------------------------------------------------------------------------------------------


def _out_path(out: str, task: str, size: str, device: str, several: bool, suffix: str = "") -> str:
    """``out`` when it is a .json file, else ``out/TASK-SIZE-DEVICE{suffix}.json`` (``suffix``: a compiled run's,
    ``-compiled-inductor``: compiled and eager results never share a file)."""
    if out.endswith(".json"):
        if several:
            raise UsageError(f"--out {out}: several tasks need a folder, not a .json file")
        return out
    safe_device = "".join(ch if ch.isalnum() else "" for ch in device)
    return os.path.join(out, f"{task}-{size}-{safe_device}{suffix}.json")


def plan(args: argparse.Namespace) -> list[tuple[Any, list[Any], str]]:
    """Validate every selection before anything runs: [(TaskRun, cases, output path)], one run per task and per
    combination of swept settings (``--set resolution=512,1024``; the runs of a task share its output file)."""
    from ..errors import TokredError
    from .harness import (
        TaskRun,
        check_device,
        check_selections,
        parse_assignments,
        parse_list,
        plan_sweeps,
        reproduce_command,
        task_names,
    )

    # an empty selection (--methods "", --task " ") is an error, not "all"
    check_selections([("--task", args.task, "task"), ("--methods", args.methods, "method"),
                      ("--presets", args.presets, "preset")])
    tasks = task_names(args.task)
    options = parse_assignments(args.options, "--options")
    task_kwargs = parse_assignments(args.set, "--set")
    profile = "quick" if args.quick else "default"
    if task_kwargs and len(tasks) > 1:
        raise UsageError("--set applies to one task; choose it with --task NAME")
    check_device(str(args.device), "--device")
    from .compiled import from_options

    try:
        compile = from_options(getattr(args, "compile", False), getattr(args, "compile_backend", None),
                               getattr(args, "compile_mode", None), getattr(args, "compile_fullgraph", None))
    except ValueError as err:
        raise UsageError(f"tokred: {err}") from None
    timing: dict[str, Any] = {}
    if args.processes is not None:
        from .workers import check_processes

        try:
            timing["processes"] = check_processes(args.processes, "--processes")
        except ValueError as err:
            raise UsageError(f"tokred: {err}") from None
        if "processes" in task_kwargs and task_kwargs["processes"] != args.processes:
            raise UsageError(f"tokred: --processes {args.processes} and --set processes={task_kwargs['processes']!r} "
                             "disagree; give one of them")
    out = []
    try:
        # the main job (tokred bench) runs each method's mildest and strongest preset; --sweep (and tokred run)
        # the whole ladder
        ladder = "ends" if getattr(args, "ladder_ends", False) and not args.sweep else "all"
        planned = plan_sweeps(tasks, args.size, task_kwargs, args.methods, args.presets, options, ladder)
    except ValueError as err:
        if isinstance(err, TokredError):
            raise
        raise UsageError(f"tokred: {err}") from None
    for p in planned:
        presets = parse_list(args.presets)
        if ladder == "ends" and presets is None and not options:  # `tokred run` would run the whole ladder
            presets = [f"{c.method}:{c.preset}" for c in p.cases if not c.is_baseline] or None
        command = reproduce_command(
            p.task, args.size, args.device, args.dtype, parse_list(args.methods), presets,
            options, p.task_kwargs, profile, args.rounds, args.processes, compile,
        )  # fmt: skip
        run = TaskRun(p.task, args.size, args.device, args.dtype, p.task_kwargs, profile, args.rounds,
                      command=command, compile=compile, **timing)
        run.build()  # bad task arguments fail here, before anything runs
        # another architecture of the arch workload (--set architecture=sdxl) gets a file of its own; the
        # resolutions of a sweep share one
        kwargs = p.task_kwargs
        size = f"{args.size}-{kwargs['architecture']}" if "architecture" in kwargs else args.size
        suffix = compile.suffix if compile is not None else ""
        out.append((run, p.cases, _out_path(args.out, p.task, size, args.device, several=len(tasks) > 1,
                                            suffix=suffix)))
    return out


def _log(message: str) -> None:
    print(message, flush=True)


def open_outputs(planned: list[tuple[Any, list[Any], str]], resume: bool, force: bool,
                 stack: contextlib.ExitStack) -> list[Any]:
    """Open (lock, check) every results file before anything runs; closed when ``stack`` closes."""
    from .runner import ResultsOutput

    opened: dict[str, Any] = {}  # the runs of a sweep share their task's file
    for run, _, path in planned:
        if path not in opened:
            opened[path] = stack.enter_context(ResultsOutput(path, resume=resume, force=force, task=run.task_name))
    return [opened[path] for _, _, path in planned]


def run_planned(planned: list[tuple[Any, list[Any], str]], outputs: list[Any]) -> tuple[int, list[str]]:
    from ..errors import TokredError
    from .contention import warn_if_loaded
    from .files import OutputError
    from .runner import run_task

    warn_if_loaded([run.threads for run, _, _ in planned])  # one line on stderr when other processes hold the cores
    written: list[str] = []
    status = EXIT_OK
    for (run, cases, path), output in zip(planned, outputs, strict=True):
        try:
            report = run_task(run, cases, output, log=_log)
        except OutputError as err:  # the disk filled up, the folder vanished...: the file keeps what it had
            print(f"tokred: error: {run.task_name}: {err}", file=sys.stderr)
            status = max(status, EXIT_FAILED)
            continue
        except (TokredError, FileNotFoundError) as err:  # e.g. missing weights: the other tasks still run
            print(f"tokred: error: {run.task_name}: {err}", file=sys.stderr)
            status = max(status, EXIT_USAGE)
            continue
        except Exception as err:
            print(f"tokred: error: {run.task_name} failed to set up: {type(err).__name__}: {err}", file=sys.stderr)
            status = max(status, EXIT_FAILED)
            continue
        finally:
            run.release()  # a sweep's next run builds its own model: free this one's memory first
        if path not in written:
            written.append(path)
        for case_id, message in report.failed:
            print(f"tokred: {case_id} failed: {message}", file=sys.stderr)
            status = max(status, EXIT_FAILED)
        if report.interrupted:
            kept = len(report.results["benchmarks"])
            where = f"{kept} finished benchmarks kept in {path} (continue with --resume)" if kept else "nothing saved"
            print(f"tokred: interrupted; {where}", file=sys.stderr)
            return EXIT_INTERRUPTED, written
        print(f"{run.task_name}: {len(report.results['benchmarks'])} benchmarks in {path}", flush=True)
    return status, written


def cmd_run(args: argparse.Namespace) -> int:
    planned = plan(args)
    with contextlib.ExitStack() as stack:
        outputs = open_outputs(planned, args.resume, args.force, stack)
        status, _ = run_planned(planned, outputs)
    return status


# --- leaderboard and bench -------------------------------------------------------------------------------------


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from ..leaderboard.generate import build

    sections = build(args.results, args.output, published=not args.no_published)
    print(f"wrote {args.output} ({len(sections)} sections; results copied to {_copies_folder(args.output)})")
    return EXIT_OK


def _copies_folder(markdown: str) -> str:
    from ..leaderboard.generate import RESULTS_FOLDER

    return os.path.join(os.path.dirname(markdown) or ".", RESULTS_FOLDER)


def published_results(markdown: str, measured: Sequence[str]) -> list[str]:
    """The results files that the leaderboard ``markdown`` was built from (its ``tokred-leaderboard`` line),
    except those this run measured again (a file of the same name: its copy is replaced), so that the main job
    replaces only the sections it measured and keeps every other section and results file already published."""
    from ..leaderboard.generate import sources_of

    try:
        with open(markdown, encoding="utf-8") as fh:
            recorded = sources_of(fh.read())
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    if not recorded:
        return []
    folder = os.path.dirname(os.path.abspath(markdown))
    replaced = {os.path.basename(p) for p in measured}
    kept = []
    for source in recorded.get("sources", []):
        path = os.path.join(folder, source)
        if os.path.basename(source) not in replaced and os.path.isfile(path):
            kept.append(path)
    return kept


def cmd_migrate_results(args: argparse.Namespace) -> int:
    from .paired_migration import migrate_file

    pending = 0
    for path in args.results:
        changes = migrate_file(path, write=not args.check)
        pending += bool(changes)
        verb = "would add" if args.check else "added"
        print(f"{path}: {verb} quality_delta to {len(changes)} cases" if changes else f"{path}: up to date")
        for line in changes:
            print(f"  {line}")
    return EXIT_FAILED if args.check and pending else EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from ..leaderboard.generate import build
    from .files import OutputLock, check_writable_file

    planned = plan(args)
    board = os.path.realpath(args.output)
    for _, _, path in planned:
        if os.path.realpath(path) == board:
            raise UsageError(f"tokred bench: -o {args.output} is also the results file (--out {path}); the "
                             "leaderboard would overwrite the results: choose another -o")
    with contextlib.ExitStack() as stack:
        # the leaderboard's file is checked (and held) too before the long run, not only at its end
        check_writable_file(args.output, "-o")
        stack.enter_context(OutputLock(args.output, "-o"))
        outputs = open_outputs(planned, args.resume, args.force, stack)
        status, written = run_planned(planned, outputs)
        if status == EXIT_INTERRUPTED:
            return status
        existing = [p for p in written if os.path.exists(p)]
        if not existing:
            return status
        sections = build(existing + published_results(args.output, existing), args.output,
                         published=not args.no_published)
    print(f"wrote {args.output} ({len(sections)} sections; results copied to {_copies_folder(args.output)})")
    return status


# --- parser ----------------------------------------------------------------------------------------------------


def _add_run_arguments(p: argparse.ArgumentParser, default_task: str | None) -> None:
    p.add_argument("--task", default=default_task, required=default_task is None,
                   help="task name(s), comma-separated, or 'all'")
    p.add_argument("--methods", default="all", help="method names, comma-separated, or 'all' (default)")
    p.add_argument("--presets", default="all",
                   help="preset names (r8) or method:preset (tome:r8), comma-separated; 'default' = the method's "
                        "default options; 'all' (default)")
    p.add_argument("--options", action="append", default=[], metavar="KEY=VALUE",
                   help="run one method (--methods NAME) with these options instead of its presets (repeatable; "
                        "not with --presets)")
    p.add_argument("--size", default=DEFAULT_SIZE,
                   help="the kind of model (the task's workloads; `tokred list` shows them): embedded: the offline "
                        "models shipped with tokred (default); arch: the real architectures at random init (speed "
                        "only, offline); full: full-size models with their weights")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="model dtype (default: the task's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="task argument, e.g. --set num_images=100 --set model=deit_tiny_patch16_224 (repeatable)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per benchmark (default: calibrated)")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="spread each case's timed rounds over N spawned worker processes, each building its own "
                        "model (1: time in this process; default: the workload's, 3 for arch and the embedded ViT)")
    p.add_argument("--quick", action="store_true", help="smaller embedded runs: a smoke test of a few minutes")
    p.add_argument("--compile", action="store_true",
                   help="time the baseline and every method with the task's module (denoiser, ViT) under "
                   "torch.compile, compiled before the timed rounds; results in a file and section of their own")
    p.add_argument("--compile-backend", default=None, metavar="NAME",
                   help="torch.compile backend with --compile (default inductor; eager, aot_eager ...)")
    p.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune",
                                                            "max-autotune-no-cudagraphs"),
                   help="torch.compile mode with --compile (default: default)")
    p.add_argument("--compile-fullgraph", default=None, action=argparse.BooleanOptionalAction,
                   help="with --compile: fullgraph=True (default; a graph break fails the case, skipped with the "
                   "reason) or, --no-compile-fullgraph, graph breaks allowed and counted")
    p.add_argument("--sweep", action="store_true",
                   help="every preset of each method's ladder, mild to strong (tokred run always does; tokred bench "
                        "runs the mildest and strongest unless --sweep or --presets is given)")
    p.add_argument("--out", default="results", help="output folder (one file per task) or .json file")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="the output exists: keep its benchmarks and run only the cases it lacks (same task, "
                               "size, device, dtype, method, preset, options and task settings)")
    existing.add_argument("--force", action="store_true",
                          help="the output exists: replace it once the first benchmark finishes (the old file is "
                               "kept as FILE.bak)")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tokred", description="Token-reduction methods: list, benchmark, leaderboard.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,run,leaderboard,bench,migrate-results}",
                                parser_class=_Parser)
    p = sub.add_parser("list", help="methods with their options and presets, and tasks")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="benchmark methods on a task; writes pytest-benchmark JSON")
    _add_run_arguments(p, default_task=None)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("leaderboard", help="build the leaderboard markdown and plots from results files")
    p.add_argument("results", nargs="+", help="results JSON files (tokred run or pytest --benchmark-json)")
    p.add_argument("-o", "--output", default="leaderboard/README.md",
                   help="markdown file (plots and copies of the results files go beside it)")
    p.add_argument("--no-published", action="store_true", help="leave out the published-results table")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("migrate-results", help="add quality_delta (results schema 6) to results files written "
                       "before it: paired with the baseline where per-image values were stored, else the reason")
    p.add_argument("results", nargs="+", help="results JSON files, rewritten in place")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file lacks quality_delta")
    p.set_defaults(func=cmd_migrate_results)

    p = sub.add_parser("bench", help="run every task (embedded, CPU by default), then build the leaderboard")
    _add_run_arguments(p, default_task="all")
    p.add_argument("-o", "--output", default="leaderboard/README.md", help="leaderboard markdown file")
    p.add_argument("--no-published", action="store_true", help="leave out the published-results table")
    p.set_defaults(func=cmd_bench, ladder_ends=True)
    return parser


# What the CLI needs beyond the core: the ``bench`` extra.
BENCH_MODULES = ("tabulate", "pytest_benchmark", "timm", "diffusers", "torchmetrics")


def missing_bench_modules() -> list[str]:
    import importlib.util

    return [name for name in BENCH_MODULES if importlib.util.find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    missing = missing_bench_modules()
    if missing:
        print(
            f"tokred: the benchmark suite needs the 'bench' extra (missing: {', '.join(missing)}); "
            'install it with: pip install "tokred[bench]"',
            file=sys.stderr,
        )
        return EXIT_USAGE
    from ..errors import TokredError
    from .files import OutputError
    from .results import ResultsError

    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except UsageError as err:
        print(f"{err}", file=sys.stderr)
        return EXIT_USAGE
    except (TokredError, ResultsError, OutputError, FileNotFoundError) as err:
        # bad names, options, results files, outputs, missing weights or data: one line, no traceback
        print(f"tokred: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tokred: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
