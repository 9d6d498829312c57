"""Issue 21: the CLI, the pytest plugin, output files and the leaderboard lose nothing, and bad input is one line.

Every test goes through what a user runs: ``tokred ...`` (``tokred.bench.cli.main`` or a real process) or
``pytest benchmarks/test_methods.py ...`` (``pytester``), on the tiny ``fake_vit`` task and the ``fake_merge``
method of the out-of-tree fixture plugin (``fixtures/fake_plugin``).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import _cli_process, _wait_for  # noqa: F401  (the CLI in another process)

from tokred.bench.cli import main
from tokred.bench.results import load_results
from tokred.bench.task import tasks as task_registry

pytest_plugins = ["pytester"]

FIXTURES = Path(__file__).parent / "fixtures"
BENCH_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "test_methods.py"
GOOD_RESULTS = FIXTURES / "leaderboard" / "results" / "embedded-cpu.json"
FAKE_RUN = ["run", "--task", "fake_vit", "--methods", "fake_merge", "--rounds", "1"]
PLUGIN_RUN = ("--benchmark-only", "--tokred-task=fake_vit", "--tokred-methods=fake_merge", "--tokred-presets=k2",
              "--tokred-rounds=1", "--tokred-set=threads=1")


# --- set-up (the fixture plugin and the helpers of test_cli.py and test_pytest_plugin.py) ---------------------------


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err


def usage_error_line(result):
    """The one ``ERROR: ...`` line of a pytest run that ended in a usage error (exit code 4)."""
    assert result.ret == pytest.ExitCode.USAGE_ERROR, "\n".join(result.outlines + result.errlines)
    text = "\n".join(result.outlines + result.errlines)
    assert "Traceback" not in text
    errors = [line for line in result.errlines if line.startswith("ERROR:")]
    assert len(errors) == 1, text
    return errors[0]


def presets_in(path):
    return [b["extra_info"]["preset"] for b in load_results(path)["benchmarks"]]


# --- 1, 2: the leaderboard's -o ---------------------------------------------------------------------------------


def test_leaderboard_output_that_is_an_input_is_refused(capsys, tmp_path):
    results = tmp_path / "results.json"
    shutil.copy(GOOD_RESULTS, results)
    before = results.read_bytes()
    link = tmp_path / "board.md"
    link.symlink_to(results)
    for out in (results, tmp_path / "." / "results.json", link):
        code, _, err = run_cli(capsys, "leaderboard", results, "-o", out)
        assert_one_line_error(code, err)
        assert f"-o {out} is one of the results files read" in err
        assert results.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board.md", "results.json"] and link.is_symlink()


def test_bench_output_that_is_its_results_file_is_refused(setup_calls, capsys, tmp_path):
    out = tmp_path / "run.json"
    code, _, err = run_cli(capsys, "bench", "--task", "fake_vit", "--methods", "fake_merge", "--presets", "k2",
                           "--rounds", "1", "--out", out, "-o", out)
    assert_one_line_error(code, err)
    assert f"-o {out} is also the results file" in err
    assert not setup_calls and not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["leaderboard", "bench"])
def test_output_that_is_not_a_regular_file_is_refused(setup_calls, capsys, tmp_path, command):
    """Like -o /dev/null: a device, pipe or socket is not replaced by a file (and no results/ folder appears)."""
    fifo = tmp_path / "board.md"
    os.mkfifo(fifo)
    if command == "leaderboard":
        argv = ["leaderboard", GOOD_RESULTS, "-o", fifo]
    else:
        argv = ["bench", "--task", "fake_vit", "--methods", "fake_merge", "--presets", "k2", "--rounds", "1",
                "--out", tmp_path / "results", "-o", fifo]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err)
    assert f"-o {fifo} exists and is not a regular file" in err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board.md"] and not setup_calls


# --- 3, 9, 11: the plugin's --benchmark-json and --benchmark-disable --------------------------------------------


def test_existing_benchmark_json_is_backed_up_before_it_is_replaced(bench_dir):
    target = bench_dir.path / "existing.json"
    earlier = '{"benchmarks": [], "note": "earlier results"}\n'
    target.write_text(earlier)
    result = bench_dir.runpytest_inprocess(*PLUGIN_RUN, "--benchmark-json=existing.json")
    result.assert_outcomes(passed=2)
    assert (bench_dir.path / "existing.json.bak").read_text() == earlier
    assert presets_in(target) == ["baseline", "k2"]
    assert any("existing.json already existed: its previous content is kept in existing.json.bak" in line
               for line in result.outlines)
    # a second run keeps the first backup and backs the first run's results up beside it
    first = target.read_bytes()
    result = bench_dir.runpytest_inprocess(*PLUGIN_RUN, "--benchmark-json=existing.json")
    result.assert_outcomes(passed=2)
    assert (bench_dir.path / "existing.json.bak").read_text() == earlier
    assert (bench_dir.path / "existing.json.bak1").read_bytes() == first


def test_benchmark_json_in_a_missing_folder_is_refused_at_start(bench_dir):
    result = bench_dir.runpytest_inprocess(*PLUGIN_RUN, "--benchmark-json=missing/folder/out.json")
    line = usage_error_line(result)
    assert "--benchmark-json=missing/folder/out.json" in line and "does not exist" in line
    assert not [line for line in result.outlines if "passed" in line]  # nothing ran
    assert not (bench_dir.path / "missing").exists()


def test_benchmark_disable_skips_without_measuring(bench_dir, monkeypatch):
    from tokred.bench.harness import TaskRun

    calls = []
    monkeypatch.setattr(TaskRun, "run_case", lambda self, case: calls.append(case))
    result = bench_dir.runpytest_inprocess("--benchmark-disable", "-rs", "--tokred-task=fake_vit",
                                           "--tokred-methods=fake_merge")
    result.assert_outcomes(skipped=3)
    assert "--benchmark-disable: nothing is measured" in "\n".join(result.outlines)
    assert not calls


# --- 4 to 8, 20, 21: plugin options checked once at start-up ----------------------------------------------------


@pytest.mark.parametrize(
    "option, expected",
    [
        ("--tokred-set=num_images=-1", ["num_images must be >= 1"]),
        ("--tokred-set=nope=1", ["'nope'", "num_images"]),
        ("--tokred-rounds=0", ["--tokred-rounds=0", ">= 1"]),
        ("--tokred-device=foo", ["--tokred-device foo: not a torch device"]),
        ("--tokred-device=cuda", ["--tokred-device cuda: CUDA is not available"]),
        ("--tokred-methods=", ["--tokred-methods '' selects no method", "fake_merge", "tome"]),
        ("--tokred-task= ", ["--tokred-task ' ' selects no task", "fake_vit", "vit_classification"]),
        ("--tokred-presets=,", ["--tokred-presets ',' selects no preset", "k2", "r8"]),
    ],
)
def test_bad_plugin_options_are_one_usage_error(bench_dir, monkeypatch, option, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU
    base = [a for a in PLUGIN_RUN if not a.startswith(option.split("=")[0] + "=")]
    result = bench_dir.runpytest_inprocess(*base, option)
    line = usage_error_line(result)
    for fragment in expected:
        assert fragment in line


# --- 15, 16, 17: results files ------------------------------------------------------------------------------------


def test_resume_refuses_a_file_of_another_task(setup_calls, capsys, tmp_path):
    import tokred_fake_plugin

    class OtherVit(tokred_fake_plugin.FakeVitTask):
        summary = "test task: another tiny ViT task"

    task_registry.register("other_vit")(OtherVit)
    path = tmp_path / "vit_results.json"
    assert run_cli(capsys, *FAKE_RUN, "--presets", "k2", "--out", path)[0] == 0
    setup_calls.clear()
    before = path.read_bytes()
    code, _, err = run_cli(capsys, "run", "--task", "other_vit", "--methods", "fake_merge", "--rounds", "1",
                           "--out", path, "--resume")
    assert_one_line_error(code, err)
    assert f"--resume: {path} holds results of task fake_vit, not other_vit" in err
    assert path.read_bytes() == before and not setup_calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit_results.json"]


def test_resume_through_a_symlink_writes_its_target(fake_plugin, capsys, tmp_path):
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "results.json"
    assert run_cli(capsys, *FAKE_RUN, "--presets", "k2", "--out", real)[0] == 0
    link = tmp_path / "link.json"
    link.symlink_to(real)
    code, _, err = run_cli(capsys, *FAKE_RUN, "--presets", "k8", "--out", link, "--resume")
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert presets_in(real) == ["baseline", "k2", "k8"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["results.json"]  # no lock or temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "link.json"]


def test_two_processes_on_one_file_under_two_names(tmp_path):
    race = tmp_path / "race.json"
    link = tmp_path / "link.json"
    link.symlink_to(race)
    gate = tmp_path / "gate"
    gate.mkdir()
    first = _cli_process(*FAKE_RUN, "--presets", "k2", "--out", race, gate=gate)
    try:
        _wait_for(gate / "ready", first)  # the first run holds race.json locked and has written nothing yet
        second = subprocess.run(
            [sys.executable, str(FIXTURES / "cli_process.py"), "--", *FAKE_RUN, "--presets", "k8", "--out",
             str(link), "--resume"],
            capture_output=True, text=True, timeout=120, env=dict(os.environ),
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert f"{link} (a link to {race}) is being written by another tokred process (pid {first.pid}:" in (
            second.stderr)
        (gate / "go").touch()
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert presets_in(race) == ["baseline", "k2"] and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate", "link.json", "race.json"]


# --- 18, 19, 20, 21: selections -----------------------------------------------------------------------------------


def test_repeated_names_are_selected_once(fake_plugin, capsys, tmp_path):
    out = tmp_path / "run.json"
    code, _, err = run_cli(capsys, "run", "--task", "fake_vit,fake_vit", "--methods", "fake_merge,fake_merge",
                           "--presets", "k2,k2,fake_merge:k2", "--rounds", "1", "--out", out)
    assert code == 0, err
    bench = load_results(out)["benchmarks"]
    assert [b["param"] for b in bench] == ["fake_vit-baseline", "fake_vit-fake_merge-k2"]
    assert "--methods fake_merge --presets k2,fake_merge:k2" in bench[1]["extra_info"]["command"]


def test_repeated_names_are_collected_once_by_the_plugin(bench_dir):
    result = bench_dir.runpytest_inprocess("--collect-only", "-q", "--tokred-task=fake_vit,fake_vit",
                                           "--tokred-methods=fake_merge,fake_merge", "--tokred-presets=k2,k2")
    ids = [line.split("[", 1)[1].rstrip("]") for line in result.outlines if line.startswith("test_methods.py::")]
    assert ids == ["fake_vit-baseline", "fake_vit-fake_merge-k2"]


def test_options_and_presets_exclude_each_other(setup_calls, capsys, tmp_path):
    code, _, err = run_cli(capsys, *FAKE_RUN, "--options", "k=8", "--presets", "k2", "--out", tmp_path / "r.json")
    assert_one_line_error(code, err)
    assert "--options and --presets exclude each other" in err and "drop --presets k2" in err
    assert not setup_calls and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "option, value, names",
    [
        ("--methods", "", ["fake_merge", "tome"]),
        ("--methods", ",", ["fake_merge", "tome"]),
        ("--task", "", ["fake_vit", "vit_classification", "text_to_image"]),
        ("--task", " ", ["fake_vit", "vit_classification", "text_to_image"]),
        ("--presets", "", ["k2", "r8", "default"]),
    ],
)
def test_empty_selection_is_not_all(setup_calls, capsys, tmp_path, option, value, names):
    argv = list(FAKE_RUN)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path)
    assert_one_line_error(code, err)
    assert f"{option} {value!r} selects no" in err and "or 'all'" in err
    for name in names:
        assert name in err
    assert not setup_calls and not list(tmp_path.iterdir())


def test_unknown_device_is_one_line(setup_calls, capsys, tmp_path):
    code, _, err = run_cli(capsys, *FAKE_RUN, "--device", "foo", "--out", tmp_path)
    assert_one_line_error(code, err)
    assert "--device foo: not a torch device" in err
    assert not setup_calls and not list(tmp_path.iterdir())


# --- 22: the leaderboard of a large results file ------------------------------------------------------------------


def test_pareto_front_matches_the_pairwise_definition():
    import random

    from tokred.leaderboard.ranking import Estimate, _front_pairwise, pareto_front

    rng = random.Random(21)
    for trial in range(200):
        points = {}
        for i in range(rng.randint(1, 40)):
            pair = []
            for _ in range(2):
                value = rng.choice([1.0, 2.0, 3.0]) if trial % 3 == 0 else rng.uniform(0, 10)  # ties too
                low, high = value - rng.uniform(0, 2), value + rng.uniform(0, 2)
                pair.append(Estimate(value, (low, high)) if rng.random() > 0.05 else Estimate(value))
            points[i] = tuple(pair)
        directions = (rng.choice(["higher", "lower"]), rng.choice(["higher", "lower"]))
        pool = {k: p for k, p in points.items() if p[0].interval is not None and p[1].interval is not None}
        assert pareto_front(points, directions) == _front_pairwise(pool, directions)


def large_results(path, rows):
    """A results file of ``rows`` benchmarks: the fixture's, repeated with distinct presets and options."""
    import copy
    import json
    import random

    data = json.loads(GOOD_RESULTS.read_text())
    vit = [b for b in data["benchmarks"] if (b.get("extra_info") or {}).get("task") == "vit_classification"]
    base = [b for b in vit if b["extra_info"]["method"] == "baseline"][:1]
    others = [b for b in vit if b["extra_info"]["method"] != "baseline"]
    rng = random.Random(0)
    out = list(base)
    for i in range(rows - 1):
        bench = copy.deepcopy(others[i % len(others)])
        info = bench["extra_info"]
        info["preset"] = f"{info['preset']}-{i}"
        info["options"] = dict(info["options"], variant=i)
        info.pop("options_repr", None)
        factor = rng.uniform(0.7, 1.3)
        info["speedup"] *= factor
        info["speedup_ci"] = [info["speedup_ci"][0] * factor, info["speedup_ci"][1] * factor]
        out.append(bench)
    data["benchmarks"] = out
    path.write_text(json.dumps(data))
    return path


def test_leaderboard_of_many_rows_is_not_quadratic(tmp_path, monkeypatch):
    """2,000 rows: rows are matched by identity through a dict and the Pareto front is a sweep, not a comparison
    of every pair (68 s for the leaderboard of 2,000 rows before)."""
    from tokred.leaderboard import ranking, sections
    from tokred.leaderboard.generate import build

    counts = {"dominates": 0, "identity": 0}
    dominates, identity = ranking.dominates, sections.Row.identity

    def counted_dominates(*args):
        counts["dominates"] += 1
        return dominates(*args)

    def counted_identity(row):
        counts["identity"] += 1
        return identity.fget(row)

    monkeypatch.setattr(ranking, "dominates", counted_dominates)
    monkeypatch.setattr(sections.Row, "identity", property(counted_identity))
    rows = 2000
    built = build([str(large_results(tmp_path / "many.json", rows))], str(tmp_path / "board" / "README.md"),
                  plots=False)
    assert sum(len(s.rows) for s in built) == rows
    assert counts["dominates"] <= 10 * rows and counts["identity"] <= 10 * rows
