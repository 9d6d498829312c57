"""Compiled benchmarks (issue 20, item 3): ``tokred run --compile`` and ``--tokred-compile`` time the baseline and
every method under ``torch.compile``, compile time outside the timed rounds, recorded per case, in results files
and leaderboard sections of their own. The tiny ViT task of test_harness, with the ``eager`` backend (dynamo's
tracing, no C++ toolchain): fast."""

from __future__ import annotations

import json
import time

import pytest
import torch
from test_harness import tiny_task  # noqa: F401 - the fixture

from tokred.bench import compiled, harness
from tokred.bench.cli import UsageError, _out_path, make_parser, plan
from tokred.bench.compiled import CompileSettings, from_options
from tokred.bench.harness import CaseSkipped, TaskRun, plan_cases
from tokred.bench.runner import run_task
from tokred.leaderboard.generate import build

EAGER = {"backend": "eager"}


def test_settings_label_suffix_and_option_errors():
    assert from_options(False) is None
    default = from_options(True)
    assert default == CompileSettings("inductor", "default", True)
    assert default.label == "compiled (inductor)" and default.suffix == "-compiled-inductor"
    other = from_options(True, "aot_eager", "max-autotune", False)
    assert other.label == "compiled (aot_eager, max-autotune, graph breaks allowed)"
    assert other.suffix == "-compiled-aot_eager-max-autotune-breaks"
    with pytest.raises(ValueError, match="--compile-backend set.* nothing is compiled without --compile"):
        from_options(False, backend="eager")
    with pytest.raises(ValueError, match="--tokred-compile: unknown compile backend 'nope'; valid: .*inductor"):
        from_options(True, backend="nope", prefix="--tokred-")
    with pytest.raises(ValueError, match="unknown compile mode 'fast'; valid: default, reduce-overhead"):
        CompileSettings(mode="fast")


def test_the_cli_options_choose_a_file_of_their_own(tmp_path):
    args = make_parser().parse_args(["run", "--task", "vit_classification", "--size", "arch", "--compile",
                                     "--compile-backend", "eager", "--no-compile-fullgraph", "--out", str(tmp_path)])
    (run, _, path), = plan(args)
    assert run.compile == CompileSettings("eager", "default", False)
    assert path.endswith("vit_classification-arch-cpu-compiled-eager-breaks.json")
    assert "--compile --compile-backend eager --no-compile-fullgraph" in run.command
    assert _out_path("r", "t", "arch", "cpu", False) == "r/t-arch-cpu.json"  # eager: unchanged
    bad = make_parser().parse_args(["run", "--task", "vit_classification", "--compile-mode", "max-autotune"])
    with pytest.raises(UsageError, match="--compile-mode set"):
        plan(bad)


def test_a_compiled_case_records_its_compile_and_times_compiled_calls(tiny_task):  # noqa: F811
    torch._dynamo.reset()
    run = TaskRun(tiny_task, rounds=3, compile=EAGER)
    base, tome = (run.run_case(c).extra_info for c in plan_cases(tiny_task, "tome", "r8"))
    for info in (base, tome):
        record = info["compile"]
        assert record["backend"] == "eager" and record["mode"] == "default" and record["fullgraph"] is True
        assert record["compile_s"] > 0 and record["warmup_s"] >= record["compile_s"] * 0.5
        assert record["compilations"] >= 1 and record["graph_breaks"] == 0 and record["steady"] is True
        assert record["timed_compilations"] == 0 and record["compile_rounds"] >= 2
        json.dumps(info, allow_nan=False)
    # the method's case compiles the paused (baseline) state and the method's: recompiles, a few, then none
    assert 1 <= tome["compile"]["recompiles"] <= 3 and base["compile"]["recompiles"] == 0
    assert run.task.model._compiled_call_impl is None  # undone after the case
    assert "--compile --compile-backend eager" in base["command"]


def test_compile_time_stays_out_of_the_timed_rounds(tiny_task, monkeypatch):  # noqa: F811
    """A stub compiler whose first call takes 0.3 s (and counts as a compilation): none of it is timed."""
    counter = {"compilations": 0.0}

    def fake_compile(module, settings):
        original = module._call_impl

        def first_slow(*args, **kwargs):
            if counter["compilations"] == 0:
                time.sleep(0.3)
                counter["compilations"] += 1
            return original(*args, **kwargs)

        module._compiled_call_impl = first_slow

    monkeypatch.setattr(harness, "compile_module", fake_compile)
    monkeypatch.setattr(compiled.Watch, "snapshot", staticmethod(
        lambda: {"compilations": counter["compilations"], "compile_s": 0.0, "graphs": 0.0, "graph_breaks": 0.0}))
    run = TaskRun(tiny_task, rounds=3, warmup_rounds=0, compile=EAGER)
    result = run.run_case(plan_cases(tiny_task, "tome", "r8")[1])
    record = result.extra_info["compile"]
    assert max(result.times) < 0.3 and record["warmup_s"] >= 0.3
    assert record["compile_s"] >= 0.25  # the slow call less a steady one (no dynamo timing from the stub)
    assert record["compile_rounds"] == 2 and record["compilations"] == 1


def test_a_case_that_fails_to_compile_is_skipped_with_the_reason(tiny_task, monkeypatch, tmp_path):  # noqa: F811
    def broken(module, settings):
        def fail(*args, **kwargs):
            raise torch._dynamo.exc.Unsupported("data-dependent branch\nExplanation: the count comes from .item()")
        module._compiled_call_impl = fail

    monkeypatch.setattr(harness, "compile_module", broken)
    run = TaskRun(tiny_task, rounds=2, compile=EAGER)
    cases = plan_cases(tiny_task, "tome", "r8")
    with pytest.raises(CaseSkipped, match=r"compiled \(eager\) failed: Unsupported: data-dependent branch "
                                          r"Explanation: the count comes from .item\(\)"):
        run.run_case(cases[1])
    report = run_task(run, cases, str(tmp_path / "out.json"), log=lambda m: None)
    assert [case for case, _ in report.skipped] == [c.id for c in cases] and not report.failed
    assert "Unsupported" in report.skipped[1][1]


def test_compiled_and_eager_sections_and_their_comparison(tiny_task, tmp_path, monkeypatch):  # noqa: F811
    # what is compiled does not matter here, only where its results go: a stub compiler keeps the test fast
    monkeypatch.setattr(harness, "compile_module", lambda module, settings: None)
    cases = plan_cases(tiny_task, "tome", "r8")
    eager_file, compiled_file = str(tmp_path / "eager.json"), str(tmp_path / "compiled.json")
    run_task(TaskRun(tiny_task, rounds=2), cases, eager_file, log=lambda m: None)
    report = run_task(TaskRun(tiny_task, rounds=2, compile=EAGER), cases, compiled_file, log=lambda m: None)
    assert len(report.finished) == 2
    keys = [b["extra_info"]["case_key"] for b in json.load(open(compiled_file))["benchmarks"]]
    assert all(k["compile"] == {"backend": "eager", "mode": "default", "fullgraph": True} for k in keys)
    out = str(tmp_path / "board" / "README.md")
    sections = build([eager_file, compiled_file], out, published=False, plots=False)
    assert sorted(s.compiled for s in sections) == ["", "compiled (eager)"]
    assert all(len(s.rows) == 2 for s in sections)
    text = open(out).read()
    assert "## tiny_vit_task · embedded · " in text and " · compiled (eager)\n" in text
    assert "the speedup is the method compiled over the baseline compiled" in text
    assert "### Eager against compiled:" in text
    table = text.split("### Eager against compiled:")[1]
    assert "| tome r8 " in table and "not measured" not in table


def test_the_pytest_options_are_parsed(pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_inprocess("--tokred-compile-backend=eager", "--tokred-task=vit_classification")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--tokred-compile-backend set* nothing is compiled without --tokred-compile*"])
    from tokred.bench import pytest_plugin

    config = pytester.parseconfig("--tokred-compile", "--tokred-compile-backend=aot_eager",
                                  "--no-tokred-compile-fullgraph")
    assert pytest_plugin._settings(config)["compile"] == CompileSettings("aot_eager", "default", False)


pytest_plugins = ["pytester"]


def test_the_workers_compile_records_are_pooled():
    from tokred.bench.workers import pooled_compile

    first = {"backend": "inductor", "compile_s": 40.0, "recompiles": 1, "graphs": 2, "graph_breaks": 0,
             "compilations": 2, "compile_rounds": 2, "timed_compilations": 0, "steady": True}
    later = {**first, "compile_s": 12.0, "recompiles": 2, "timed_compilations": 1}
    pooled = pooled_compile([first, None, later])
    assert pooled["compile_s"] == 40.0 and pooled["process_compile_s"] == [40.0, 12.0]
    assert pooled["recompiles"] == 2 and pooled["timed_compilations"] == 1 and pooled["steady"] is True
    assert pooled_compile([None, None]) is None


def test_graph_breaks_are_counted_without_fullgraph_and_fail_the_case_with_it(tiny_task):  # noqa: F811
    def with_a_break(run):
        run.setup()
        run.task.model.blocks[0].register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
        return run

    case = plan_cases(tiny_task, "tome", "r8")[0]  # the baseline row
    loose = with_a_break(TaskRun(tiny_task, rounds=2, compile={"backend": "eager", "fullgraph": False}))
    record = loose.run_case(case).extra_info["compile"]
    assert record["fullgraph"] is False and record["graph_breaks"] >= 1 and record["graphs"] >= 2
    strict = with_a_break(TaskRun(tiny_task, rounds=2, compile=EAGER))
    with pytest.raises(CaseSkipped, match=r"compiled \(eager\) failed: .*graph_break"):
        strict.run_case(case)


def test_each_worker_process_compiles_for_itself():
    """Two spawned workers each compile their own embedded ViT; the record has both compile times."""
    from tokred.bench.harness import Case

    run = TaskRun("vit_classification", task_kwargs={"num_images": 16, "threads": 1}, rounds=2, processes=2,
                  min_time_s=0.0, compile=EAGER)
    try:
        info = run.run_case(Case("vit_classification", "tome", "r8", {"r": 8})).extra_info
    finally:
        run.release()
    record = info["compile"]
    assert info["processes"] == 2 and len(record["process_compile_s"]) == 2
    assert all(s > 0 for s in record["process_compile_s"]) and record["compile_s"] == record["process_compile_s"][0]
    assert record["timed_compilations"] == 0 and record["backend"] == "eager"
