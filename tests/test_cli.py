"""The ``tokred`` command line: list, run, leaderboard, bench; bad input; interrupted runs keep their results.

Runs use ``fake_vit``, a tiny random timm ViT task, and ``fake_merge``, a method: both come from an out-of-tree
plugin (``fixtures/fake_plugin``) found only through its entry points.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import tokred
from tokred import Method
from tokred.bench.cli import main
from tokred.bench.harness import TaskRun, plan_cases
from tokred.bench.results import load_results
from tokred.bench.runner import run_task
from tokred.options import is_bool, option
from tokred.registry import methods as method_registry

FIXTURES = Path(__file__).parent / "fixtures"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err


# --- list ------------------------------------------------------------------------------------------------------


def test_list_prints_methods_options_presets_and_tasks(fake_plugin, capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    methods_part, tasks_part = out.split("\nTASKS\n")
    # every registered method, the out-of-tree one included, with its options' defaults, ranges and presets
    for name in tokred.list_methods():
        assert f"\n{name}: " in methods_part
    tome = methods_part.split("\ntome: ")[1]
    assert "family timm_vit" in tome and "family diffusers_unet" in tome
    r_line = next(line for line in tome.splitlines() if line.strip().startswith("r "))
    assert "13" in r_line and "int >= 0" in r_line
    crossattn = next(line for line in tome.splitlines() if line.strip().startswith("merge_crossattn"))
    assert "False" in crossattn  # defaults are printed as they are
    assert "presets: r8 (r=8); r13 (r=13); r16-decreasing (r=(16, -1))" in tome
    fake = methods_part.split("\nfake_merge: ")[1]
    assert "k2 (k=2); k8 (k=8)" in fake
    # tasks with their metrics' directions and the methods that support them
    assert "vit_classification (timm_vit)" in tasks_part
    assert "text_to_image (diffusers_unet)" in tasks_part
    fake_task = tasks_part.split("fake_vit (timm_vit)")[1].split("\n\n")[0]
    assert "top1 ↑" in fake_task and "latency_ms ↓" in fake_task
    assert "fake_merge" in fake_task and "tome" in fake_task


def test_list_json(fake_plugin, capsys):
    code, out, _ = run_cli(capsys, "list", "--json")
    assert code == 0
    data = json.loads(out)
    tome = next(m for m in data["methods"] if m["name"] == "tome")
    assert tome["families"]["timm_vit"]["presets"]["r16-decreasing"] == {"r": [16, -1]}
    r = next(o for o in tome["families"]["timm_vit"]["options"] if o["name"] == "r")
    assert r["default"] == 13 and r["valid"].startswith("int >= 0")
    assert {t["name"] for t in data["tasks"]} >= {"vit_classification", "text_to_image", "fake_vit"}


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "--task", "vit_clasification"], ["unknown task 'vit_clasification'", "vit_classification",
                                                   "text_to_image"]),
        (["run", "--task", "fake_vit", "--methods", "tomee"], ["unknown method 'tomee'", "tome", "fake_merge"]),
        (["run", "--task", "fake_vit", "--methods", "cat_pruning"], ["does not support task 'fake_vit'",
                                                                     "fake_merge", "tome"]),
        (["run", "--task", "fake_vit", "--methods", "tome", "--presets", "r99"], ["unknown preset 'r99'", "r8",
                                                                                 "r16-decreasing"]),
        (["run", "--task", "fake_vit", "--presets", "tome:k2"], ["unknown preset 'tome:k2'", "fake_merge:k2"]),
        (["run", "--task", "fake_vit", "--size", "huge"], ["unknown size 'huge'", "embedded"]),
        (["run", "--task", "fake_vit", "--set", "num_imgs=3"], ["num_imgs", "num_images"]),
        (["run", "--task", "fake_vit", "--set", "num_images=0"], ["num_images must be >= 1"]),
        (["run", "--task", "fake_vit", "--set", "oops"], ["expected key=value"]),
        (["run", "--task", "fake_vit", "--methods", "tome,fake_merge", "--options", "r=4"], ["exactly one method"]),
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ],
)
def test_bad_input_is_one_line_exit_2(fake_plugin, capsys, tmp_path, argv, expected):
    code, _, err = run_cli(capsys, *argv, *(["--out", tmp_path] if argv[0] == "run" else []))
    assert_one_line_error(code, err)
    for text in expected:
        assert text in err
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_invalid_option_value_names_the_option(fake_plugin, capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--task", "fake_vit", "--methods", "fake_merge", "--options", "k=-1",
                           "--out", tmp_path)
    assert_one_line_error(code, err)
    assert "option 'k'=-1 is invalid; valid: int >= 0" in err
    assert not list(tmp_path.iterdir())


def test_malformed_results_file_named_in_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "leaderboard", FIXTURES / "malformed_results.json", "-o", tmp_path / "lb.md")
    assert_one_line_error(code, err)
    assert "malformed_results.json" in err and "'benchmarks[2].extra_info.speedup'" in err
    assert not (tmp_path / "lb.md").exists()


# --- run, leaderboard, bench -----------------------------------------------------------------------------------


def test_run_writes_pytest_benchmark_json(fake_plugin, capsys, tmp_path):
    code, out, err = run_cli(capsys, "run", "--task", "fake_vit", "--methods", "fake_merge", "--rounds", "2",
                             "--out", tmp_path)
    assert code == 0, err
    path = tmp_path / "fake_vit-embedded-cpu.json"
    data = load_results(path)
    assert set(data) == {"machine_info", "commit_info", "benchmarks", "datetime", "version"}
    names = [b["name"] for b in data["benchmarks"]]
    assert names == [
        "test_method[fake_vit-baseline]",
        "test_method[fake_vit-fake_merge-k2]",
        "test_method[fake_vit-fake_merge-k8]",
    ]
    k8 = data["benchmarks"][2]
    assert k8["fullname"] == "benchmarks/test_methods.py::test_method[fake_vit-fake_merge-k8]"
    assert k8["params"] == {"tokred_case": "fake_vit:fake_merge:k8"}
    assert k8["stats"]["rounds"] == 2 and len(k8["stats"]["data"]) == 2
    info = k8["extra_info"]
    assert info["options"] == {"k": 8} and info["method"] == "fake_merge" and info["preset"] == "k8"
    assert info["task"] == "fake_vit" and info["model"] == "tiny-random-vit"
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["speedup"] > 0 and info["gflops"] < data["benchmarks"][0]["extra_info"]["gflops"]
    assert "--methods fake_merge" in info["command"] and "--rounds 2" in info["command"]
    assert "fake_vit-fake_merge-k8: speedup" in out

    # pytest-benchmark's own tool reads the file
    compare = subprocess.run(
        [sys.executable, "-m", "pytest_benchmark", "compare", str(path), "--columns=median"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert compare.returncode == 0, compare.stderr
    assert "test_method[fake_vit-fake_merge-k8]" in compare.stdout

    # and so does the leaderboard
    code, out, err = run_cli(capsys, "leaderboard", path, "-o", tmp_path / "lb" / "README.md")
    assert code == 0, err
    text = (tmp_path / "lb" / "README.md").read_text()
    assert "## fake_vit · embedded" in text and "| fake_merge " in text
    assert list((tmp_path / "lb").glob("*.png"))


def test_custom_options_run_one_case(fake_plugin, capsys, tmp_path):
    out = tmp_path / "custom.json"
    code, _, err = run_cli(capsys, "run", "--task", "fake_vit", "--methods", "fake_merge", "--options", "k=3",
                           "--rounds", "1", "--out", out)
    assert code == 0, err
    bench = load_results(out)["benchmarks"]
    assert [b["extra_info"]["preset"] for b in bench] == ["baseline", "custom"]
    assert bench[1]["extra_info"]["options"] == {"k": 3}
    assert "--options k=3" in bench[1]["extra_info"]["command"]


def test_bench_runs_and_builds_the_leaderboard(fake_plugin, capsys, tmp_path):
    board = tmp_path / "board" / "README.md"
    code, out, err = run_cli(capsys, "bench", "--task", "fake_vit", "--methods", "fake_merge", "--presets", "k8",
                             "--rounds", "1", "--out", tmp_path / "results", "-o", board)
    assert code == 0, err
    assert (tmp_path / "results" / "fake_vit-embedded-cpu.json").exists()
    text = board.read_text()
    assert "| fake_merge " in text and "k8" in text and "k2" not in text
    assert "Published results (not measured by us)" in text


# --- interruption ----------------------------------------------------------------------------------------------


@dataclass
class InterrupterOptions:
    explode: bool = option(False, valid="bool", check=is_bool, doc="raise KeyboardInterrupt in the forward pass")


class Interrupter(Method):
    """A method whose ``explode`` preset interrupts the run (Ctrl-C) in the middle of its evaluation, once."""

    options = {"timm_vit": InterrupterOptions}
    presets = {"timm_vit": {"first": {}, "second": {"explode": True}, "third": {}}}
    exploded = 0

    def install(self, patch) -> None:
        if self.options.explode and not Interrupter.exploded:

            def boom(module, args):
                Interrupter.exploded += 1
                raise KeyboardInterrupt

            patch.add_hook(patch.adapter.root.register_forward_pre_hook(boom))


@pytest.fixture
def interrupter(fake_plugin, monkeypatch):
    monkeypatch.setattr(Interrupter, "exploded", 0)
    method_registry.register("interrupter")(Interrupter)


def test_interrupted_run_keeps_finished_benchmarks_and_resumes(interrupter, capsys, tmp_path):
    path = tmp_path / "run.json"
    argv = ["run", "--task", "fake_vit", "--methods", "interrupter", "--rounds", "1", "--out", path]
    code, out, err = run_cli(capsys, *argv)
    assert code == 130
    assert f"interrupted; 2 finished benchmarks kept in {path}" in err
    assert "Traceback" not in err
    kept = load_results(path)["benchmarks"]
    assert [b["name"] for b in kept] == ["test_method[fake_vit-baseline]", "test_method[fake_vit-interrupter-first]"]
    assert not [f for f in os.listdir(tmp_path) if f != "run.json"]  # no temporary files left behind

    code, out, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert "2 benchmarks already in" in out
    done = load_results(path)["benchmarks"]
    assert [b["extra_info"]["preset"] for b in done] == ["baseline", "first", "second", "third"]
    assert done[:2] == kept  # the finished ones are kept as they were


def test_interrupt_leaves_the_model_unpatched(interrupter, tmp_path):
    run = TaskRun("fake_vit", rounds=1)
    report = run_task(run, plan_cases("fake_vit", "interrupter"), tmp_path / "r.json", log=lambda _: None)
    assert report.interrupted and report.finished == ["fake_vit-baseline", "fake_vit-interrupter-first"]
    assert tokred.get_patch(run.task.model) is None
    assert not run.task.model._forward_pre_hooks


# --- selection helpers -----------------------------------------------------------------------------------------


def test_selection_over_several_tasks(fake_plugin):
    from tokred.bench.harness import SelectionError, parse_assignments, plan_all

    # a preset that exists for one family selects the tasks of that family only
    planned = plan_all(["fake_vit", "text_to_image"], "tome", "r8")
    assert list(planned) == ["fake_vit"]
    assert [c.id for c in planned["fake_vit"]] == ["fake_vit-baseline", "fake_vit-tome-r8"]
    # bare and qualified preset names, and 'default' (a method's default options)
    ids = [c.id for c in plan_all(["fake_vit"], "tome,fake_merge", "k2,tome:r13,default")["fake_vit"]]
    assert ids == ["fake_vit-baseline", "fake_vit-tome-r13", "fake_vit-tome-default",
                   "fake_vit-fake_merge-k2", "fake_vit-fake_merge-default"]
    with pytest.raises(SelectionError, match="unknown preset 'r99'"):
        plan_all(["fake_vit", "text_to_image"], None, "r99")
    assert parse_assignments(["r=(16, -1)", "name=deit", "flag=True", "n=3"]) == {
        "r": (16, -1), "name": "deit", "flag": True, "n": 3,
    }  # fmt: skip


def test_missing_weights_is_one_line_and_setup_is_not_retried(fake_plugin, monkeypatch, capsys, tmp_path):
    import tokred_fake_plugin

    calls = []

    def setup(self):
        calls.append(1)
        raise FileNotFoundError("weights for 'fake' not found in /nowhere")

    monkeypatch.setattr(tokred_fake_plugin.FakeVitTask, "setup", setup)
    code, _, err = run_cli(capsys, "run", "--task", "fake_vit", "--out", tmp_path)
    assert_one_line_error(code, err)
    assert "weights for 'fake' not found in /nowhere" in err

    run = TaskRun("fake_vit")
    for _ in range(2):
        with pytest.raises((FileNotFoundError, RuntimeError), match="not found in /nowhere"):
            run.run_case(plan_cases("fake_vit")[0])
    assert len(calls) == 2  # once for the CLI run, once for this TaskRun: a failed setup is not repeated


# --- results files: nothing lost, nothing silently wrong ---------------------------------------------------------

FAKE_RUN = ["run", "--task", "fake_vit", "--methods", "fake_merge", "--rounds", "1"]


def names_and_presets(path):
    return [(b["extra_info"]["preset"], b["extra_info"]["case_key"]["settings"].get("num_images"))
            for b in load_results(path)["benchmarks"]]


@pytest.mark.parametrize("content", ["results", "unrelated", "not json"])
def test_existing_output_is_refused_before_setup(setup_calls, capsys, tmp_path, content):
    path = tmp_path / "run.json"
    if content == "results":
        assert run_cli(capsys, *FAKE_RUN, "--presets", "k2", "--out", path)[0] == 0
        setup_calls.clear()
    else:
        path.write_text('{"hello": [1, 2, 3]}\n' if content == "unrelated" else "my notes, not JSON\n")
    before = path.read_bytes()
    code, _, err = run_cli(capsys, *FAKE_RUN, "--out", path)
    assert_one_line_error(code, err)
    assert str(path) in err and "--force" in err
    if content == "results":
        assert "already holds 2 benchmarks" in err and "--resume" in err
    else:
        assert "is not a results file" in err
    assert path.read_bytes() == before and not setup_calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no lock, backup or temporary file left

    if content != "results":  # --resume cannot keep what is not a results file
        code, _, err = run_cli(capsys, *FAKE_RUN, "--out", path, "--resume")
        assert_one_line_error(code, err)
        assert "--resume" in err and "--force replaces it" in err
        assert path.read_bytes() == before and not setup_calls


def test_force_replaces_the_file_and_keeps_a_backup(setup_calls, capsys, tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"hello": 1}\n')
    code, _, err = run_cli(capsys, *FAKE_RUN, "--presets", "k2", "--out", path, "--force")
    assert code == 0, err
    assert [b["extra_info"]["preset"] for b in load_results(path)["benchmarks"]] == ["baseline", "k2"]
    assert (tmp_path / "run.json.bak").read_text() == '{"hello": 1}\n'
    code, _, err = run_cli(capsys, *FAKE_RUN, "--out", path, "--force", "--resume")
    assert_one_line_error(code, err)
    assert "not allowed with argument" in err


def test_force_keeps_the_old_file_when_nothing_finishes(interrupter, capsys, tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"hello": 1}\n')
    code, _, err = run_cli(capsys, "run", "--task", "fake_vit", "--methods", "interrupter", "--presets", "second",
                           "--rounds", "1", "--out", path, "--force", "--set", "num_images=8")
    # the baseline finished (the file was replaced, the old one kept), then Ctrl-C
    assert code == 130
    assert (tmp_path / "run.json.bak").read_text() == '{"hello": 1}\n'
    assert [b["extra_info"]["preset"] for b in load_results(path)["benchmarks"]] == ["baseline"]


def test_resume_matches_the_whole_case_identity(setup_calls, capsys, tmp_path):
    path = tmp_path / "run.json"
    assert run_cli(capsys, *FAKE_RUN, "--presets", "k2", "--set", "num_images=8", "--out", path)[0] == 0
    first = names_and_presets(path)
    assert first == [("baseline", 8), ("k2", 8)]
    key = load_results(path)["benchmarks"][1]["extra_info"]["case_key"]
    assert key == {"task": "fake_vit", "size": "embedded", "device": "cpu", "dtype": "float32",
                   "method": "fake_merge", "preset": "k2", "options": {"k": 2}, "settings": {"num_images": 8}}

    # the same selection with other task settings: nothing matches, every case runs again, both kept
    code, out, err = run_cli(capsys, *FAKE_RUN, "--presets", "k2", "--set", "num_images=16", "--out", path,
                             "--resume")
    assert code == 0, err
    assert "2 benchmarks in" in out and "other settings (settings.num_images 8 -> 16)" in out
    assert names_and_presets(path) == first + [("baseline", 16), ("k2", 16)]

    # the same settings again: everything is there, nothing runs (not even the setup)
    setup_calls.clear()
    code, out, _ = run_cli(capsys, *FAKE_RUN, "--presets", "k2", "--set", "num_images=16", "--out", path,
                           "--resume")
    assert code == 0 and not setup_calls and "2 benchmarks already in" in out
    assert len(load_results(path)["benchmarks"]) == 4

    # other options under the same preset name ("custom") are another case
    code, out, _ = run_cli(capsys, *FAKE_RUN, "--options", "k=3", "--set", "num_images=16", "--out", path,
                           "--resume")
    assert code == 0
    code, out, _ = run_cli(capsys, *FAKE_RUN, "--options", "k=4", "--set", "num_images=16", "--out", path,
                           "--resume")
    assert code == 0 and "options.k 3 -> 4" in out
    customs = [b["extra_info"]["options"] for b in load_results(path)["benchmarks"]
               if b["extra_info"]["preset"] == "custom"]
    assert customs == [{"k": 3}, {"k": 4}]


def test_resume_reruns_rows_without_a_case_identity(setup_calls, capsys, tmp_path):
    path = tmp_path / "run.json"
    assert run_cli(capsys, *FAKE_RUN, "--presets", "k2", "--out", path)[0] == 0
    data = load_results(path)
    for bench in data["benchmarks"]:
        del bench["extra_info"]["case_key"]  # as an older tokred wrote them
    path.write_text(json.dumps(data))
    code, out, err = run_cli(capsys, *FAKE_RUN, "--presets", "k2", "--out", path, "--resume")
    assert code == 0, err
    assert "2 benchmarks in" in out and "have no case identity (written by an older tokred)" in out
    assert [("case_key" in b["extra_info"]) for b in load_results(path)["benchmarks"]] == [False, False, True, True]


def _cli_process(*args, gate):
    command = [sys.executable, str(FIXTURES / "cli_process.py"), "--gate", str(gate)]
    env = dict(os.environ, PYTHONPATH=str(FIXTURES / "fake_plugin"))
    return subprocess.Popen([*command, "--", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for(path, process, timeout=120):
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_two_processes_on_one_output(tmp_path):
    out = tmp_path / "run.json"
    gate = tmp_path / "gate"
    gate.mkdir()
    first = _cli_process(*FAKE_RUN, "--presets", "k2", "--out", out, gate=gate)
    try:
        _wait_for(gate / "ready", first)  # the first run holds the lock and has written nothing yet
        second = subprocess.run(
            [sys.executable, str(FIXTURES / "cli_process.py"), "--", *FAKE_RUN, "--out", str(out), "--resume"],
            capture_output=True, text=True, timeout=120, env=dict(os.environ),
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert f"{out} is being written by another tokred process (pid {first.pid}:" in second.stderr
        (gate / "go").touch()
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert [b["extra_info"]["preset"] for b in load_results(out)["benchmarks"]] == ["baseline", "k2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate", "run.json"]  # the lock file is gone


KILLED_WRITER = """
import os, sys, time
from tokred.bench.results import load_results, write_results

def hanging_fsync(fd):  # the temporary file is filled, not yet renamed over the target
    open(sys.argv[2], "w").close()
    time.sleep(600)

os.fsync = hanging_fsync
data = load_results(sys.argv[1])
data["benchmarks"] = data["benchmarks"][:1]
write_results(sys.argv[1], data)
"""


def test_killed_write_leaves_the_old_file_and_the_next_run_cleans_up(fake_plugin, capsys, tmp_path):
    import signal

    out = tmp_path / "run.json"
    assert run_cli(capsys, *FAKE_RUN, "--presets", "k2", "--out", out)[0] == 0
    before = out.read_bytes()
    flag = tmp_path / "writing"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out), str(flag)], stderr=subprocess.PIPE,
                              text=True)
    try:
        _wait_for(flag, writer)
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(leftovers) == 1 and leftovers[0].startswith(".run.json.")
        writer.send_signal(signal.SIGKILL)
        writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert out.read_bytes() == before  # the last complete version
    assert (tmp_path / leftovers[0]).exists()

    code, out_text, err = run_cli(capsys, *FAKE_RUN, "--out", out, "--resume")
    assert code == 0, err
    assert f"removed 1 temporary file(s) left by an interrupted write: {leftovers[0]}" in out_text
    assert [b["extra_info"]["preset"] for b in load_results(out)["benchmarks"]] == ["baseline", "k2", "k8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "writing"]


def _read_only_folder(tmp_path):
    """A folder this process cannot create files in (root ignores permission bits: /sys is read-only to it)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    if os.path.isdir("/sys") and not os.access("/sys", os.W_OK):  # pragma: no cover - root without /sys rights
        return Path("/sys")
    try:
        open("/sys/.tokred-probe", "w").close()
    except OSError:
        return Path("/sys")
    pytest.skip("no read-only folder available")  # pragma: no cover


@pytest.mark.parametrize("where", ["read-only folder", "folder named .json", "under a file"])
def test_unwritable_output_fails_before_setup(setup_calls, capsys, tmp_path, where):
    if where == "read-only folder":
        out = _read_only_folder(tmp_path) / "run.json"
        expected = "is not writable"
    elif where == "folder named .json":
        out = tmp_path / "run.json"
        out.mkdir()
        expected = "is a folder"
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "results"
        expected = "cannot create the folder"
    code, _, err = run_cli(capsys, *FAKE_RUN, "--out", out)
    assert_one_line_error(code, err)
    assert expected in err and str(out.parent if where == "under a file" else out).split("/")[-1] in err
    assert not setup_calls


def test_bench_checks_the_leaderboard_output_before_running(setup_calls, capsys, tmp_path):
    board = tmp_path / "board"
    board.mkdir()
    code, _, err = run_cli(capsys, "bench", "--task", "fake_vit", "--methods", "fake_merge", "--rounds", "1",
                           "--out", tmp_path / "results", "-o", board)
    assert_one_line_error(code, err)
    assert f"-o {board} is a folder" in err
    assert not setup_calls and not (tmp_path / "results").exists()


@pytest.mark.parametrize("problem", ["folder", "read-only"])
def test_leaderboard_output_that_cannot_be_written(capsys, tmp_path, problem):
    results = FIXTURES / "leaderboard" / "results" / "embedded-cpu.json"
    if problem == "folder":
        target = tmp_path / "board"
        target.mkdir()
        expected = "is a folder; give the markdown file"
    else:
        target = _read_only_folder(tmp_path) / "README.md"
        expected = "is not writable"
    code, _, err = run_cli(capsys, "leaderboard", results, "-o", target)
    assert_one_line_error(code, err)
    assert expected in err
    if problem == "folder":
        assert list(target.iterdir()) == []


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("task_info", "steps=3", "'benchmarks[1].extra_info.task_info': expected an object, got str"),
        ("options_repr", 3, "'benchmarks[1].extra_info.options_repr': expected a string, got int 3"),
        ("speedup", -3, "'benchmarks[1].extra_info.speedup': must be > 0, got -3"),
        ("notes", ["ok", 2], "'benchmarks[1].extra_info.notes[1]': expected a string"),
    ],
)
def test_leaderboard_bad_fields_are_one_line_errors(capsys, tmp_path, field, value, expected):
    data = json.loads((FIXTURES / "leaderboard" / "results" / "embedded-cpu.json").read_text())
    data["benchmarks"][1]["extra_info"][field] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    code, _, err = run_cli(capsys, "leaderboard", bad, "-o", tmp_path / "lb" / "README.md")
    assert_one_line_error(code, err)
    assert str(bad) in err and expected in err
    assert not (tmp_path / "lb").exists()
