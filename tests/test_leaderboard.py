"""The leaderboard generator, its noise-respecting marks, and the results-file reader.

``fixtures/leaderboard/results/*.json`` (made by ``fixtures/make_results_fixtures.py``, whose docstring lists
the known answers) hold a vit_classification section, two text_to_image sections that differ in their number
of steps, a ``--size arch`` section and a schema-1 file; ``fixtures/leaderboard/README.md`` is the leaderboard
built from them, which the generator must reproduce byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest

from tokred.bench.files import OutputError
from tokred.bench.results import ResultsError, load_results, validate, write_results
from tokred.leaderboard.generate import build, load_sections, sources_of
from tokred.leaderboard.ranking import Estimate, dominates, pareto_front, rank_column

FIXTURES = Path(__file__).parent / "fixtures"
BOARD = FIXTURES / "leaderboard"
RESULTS = BOARD / "results" / "embedded-cpu.json"
ALL_RESULTS = sorted((BOARD / "results").glob("*.json"))
REPO = Path(__file__).parent.parent

VIT = "vit_classification · embedded · Test CPU 9000 · float32"
T2I = "text_to_image · embedded · Test CPU 9000 · float32 · num_inference_steps=20"
T2I_3 = "text_to_image · embedded · Test CPU 9000 · float32 · num_inference_steps=3"
ARCH = "text_to_image · arch · Test CPU 9000 · float32"
OLD = "vit_classification · embedded · Old CPU 1000 · float32"


def section_blocks(markdown: str) -> dict[str, str]:
    return {block.partition("\n")[0].strip(): block for block in markdown.split("\n## ")[1:]}


def section_tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """{section title: [row as {header: cell}]} for the pipe tables under each ``## `` heading."""
    out: dict[str, list[dict[str, str]]] = {}
    for title, block in section_blocks(markdown).items():
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if not lines:
            continue
        split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]  # noqa: E731
        headers = split(lines[0])
        out[title] = [dict(zip(headers, split(line), strict=True)) for line in lines[2:]]
    return out


def label(row: dict[str, str]) -> str:
    return row["method"] + " " + row["preset"]


def bold(rows, column):
    return {label(r) for r in rows if r[column].startswith("**")}


def tied(rows, column):
    return {label(r) for r in rows if r[column].endswith(" ≈")}


def starred(rows):
    return {label(r) for r in rows if r["Pareto"] == "★"}


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    out = tmp_path_factory.mktemp("lb") / "board" / "README.md"
    build([str(p) for p in ALL_RESULTS], str(out))
    return out


@pytest.fixture(scope="module")
def tables(board):
    return section_tables(board.read_text())


# --- the tie logic ---------------------------------------------------------------------------------------------


def E(value, low=None, high=None):  # noqa: N802
    return Estimate(value, None if low is None else (low, high))


@pytest.mark.parametrize(
    "values, direction, bold_keys, tied_keys, all_tied",
    [
        # separated best: bold
        ({"a": E(2.0, 1.9, 2.1), "b": E(1.5, 1.4, 1.6), "c": E(1.0, 1.0, 1.0)}, "higher", {"a"}, set(), False),
        # the best overlaps one other: no bold, both tied, the separated third unmarked
        ({"a": E(2.0, 1.8, 2.2), "b": E(1.9, 1.7, 2.1), "c": E(1.0, 0.9, 1.1)}, "higher", set(), {"a", "b"}, False),
        # touching ends overlap (closed intervals)
        ({"a": E(2.0, 1.6, 2.2), "b": E(1.4, 1.2, 1.6)}, "higher", set(), {"a", "b"}, True),
        # overlap with a non-best row only does not matter: b overlaps c, a is separated from both
        ({"a": E(3.0, 2.9, 3.1), "b": E(2.0, 1.5, 2.5), "c": E(1.8, 1.4, 2.2)}, "higher", {"a"}, set(), False),
        # lower is better
        ({"a": E(9.5, 8.6, 10.5), "b": E(12.0, 10.9, 13.3)}, "lower", {"a"}, set(), False),
        ({"a": E(9.5, 8.6, 10.5), "b": E(10.0, 9.0, 11.2), "c": E(12.0, 10.9, 13.3)}, "lower", set(), {"a", "b"},
         False),
        # exact values: equal ones tie, unequal ones are separated
        ({"a": Estimate.exact(2.3), "b": Estimate.exact(2.3), "c": Estimate.exact(3.0)}, "lower", set(), {"a", "b"},
         False),
        ({"a": Estimate.exact(2.3), "b": Estimate.exact(2.4)}, "lower", {"a"}, set(), False),
        # a value without an interval: the column is not ranked
        ({"a": E(2.0, 1.9, 2.1), "b": E(1.0)}, "higher", set(), set(), False),
        # a single competitor is not "best" of anything
        ({"a": E(2.0, 1.9, 2.1)}, "higher", set(), set(), False),
    ],
)
def test_rank_column(values, direction, bold_keys, tied_keys, all_tied):
    marks = rank_column(values, direction)
    assert set(marks.bold) == bold_keys and set(marks.tied) == tied_keys and marks.all_tied == all_tied


def test_rank_column_marks_only_eligible_rows():
    values = {"contended": E(5.0, 4.9, 5.1), "a": E(2.0, 1.9, 2.1), "b": E(1.0, 0.9, 1.1)}
    # the ineligible best still competes: nobody is bold (a is not the best)
    assert rank_column(values, "higher", eligible=["a", "b"]).bold == frozenset()
    values["contended"] = E(2.05, 1.95, 2.15)
    marks = rank_column(values, "higher", eligible=["a", "b"])
    assert marks.tied == {"a"} and not marks.bold


@pytest.mark.parametrize(
    "points, quality_direction, front",
    [
        # b separately faster with quality as good: a dominated
        ({"a": (E(1.0, 0.9, 1.1), E(80, 76, 84)), "b": (E(1.5, 1.4, 1.6), E(80, 76, 84))}, "higher", {"b"}),
        # b separately faster, a's quality edge within the noise: a keeps its star (b is not as good on quality)
        ({"a": (E(1.0, 0.9, 1.1), E(81, 77, 85)), "b": (E(1.5, 1.4, 1.6), E(80, 76, 84))}, "higher", {"a", "b"}),
        # speeds overlap, qualities overlap: neither dominates, whatever the point values
        ({"a": (E(1.0, 0.9, 1.2), E(81, 77, 85)), "b": (E(1.1, 1.0, 1.3), E(82, 78, 86))}, "higher", {"a", "b"}),
        # separately better quality, speed as good: dominates (lower-is-better quality)
        ({"a": (E(1.2, 1.1, 1.3), E(12.0, 10.9, 13.3)), "b": (E(1.2, 1.0, 1.4), E(9.5, 8.6, 10.5))}, "lower",
         {"b"}),
        # separated on both axes in opposite directions: a trade-off, both on the front
        ({"a": (E(2.0, 1.9, 2.1), E(70, 66, 74)), "b": (E(1.0, 1.0, 1.0), E(80, 76, 84))}, "higher", {"a", "b"}),
        # a point without intervals is neither starred nor able to dominate
        ({"a": (E(1.0, 0.9, 1.1), E(80, 76, 84)), "b": (E(3.0), E(90))}, "higher", {"a"}),
    ],
)
def test_pareto_front(points, quality_direction, front):
    assert set(pareto_front(points, ("higher", quality_direction))) == front


def test_pareto_front_is_never_empty():
    rng = random.Random(0)
    for _ in range(3000):
        points = {}
        for i in range(rng.randint(1, 6)):
            s, q, ws, wq = rng.uniform(0.5, 3), rng.uniform(0, 100), rng.uniform(0, 1), rng.uniform(0, 30)
            points[i] = (E(s, s - ws, s + ws), E(q, q - wq, q + wq))
        front = pareto_front(points, ("higher", "higher"))
        assert front
        for k in front:  # and the front is exactly the undominated points
            assert not any(dominates(points[j], points[k], ("higher", "higher")) for j in points if j != k)


# --- the fixture leaderboard -------------------------------------------------------------------------------------


def test_sections_split_by_settings(tables):
    assert list(tables) == [ARCH, T2I, T2I_3, OLD, VIT, "Published results (not measured by us)"]
    assert [label(r) for r in tables[T2I_3]] == ["baseline —", "tome ratio0.5"]
    sections = {s.title: s for s in load_sections([str(p) for p in ALL_RESULTS])}
    assert sections[T2I].settings["num_inference_steps"] == 20
    assert sections[T2I_3].settings["num_inference_steps"] == 3


def test_vit_marks(tables):
    vit = tables[VIT]
    # baseline first, then by speedup; the benchmark without tokred extra_info is not a row
    assert [label(r) for r in vit] == ["baseline —", "tome r16", "other_method a\\|b", "tome r13", "tome r8",
                                       "ca_tome threshold0.9", "tome r4"]
    assert vit[0]["speedup × ↑"] == "1.00×" and vit[0]["options"] == "—" and vit[0]["agreement (%) ↑"] == "—"
    r13 = next(r for r in vit if label(r) == "tome r13")
    assert r13["speedup × ↑"] == "2.00× [1.90, 2.10] ≈"
    assert r13["FLOPs-ideal ×"] == "2.00×" and r13["efficiency"] == "100%"
    assert r13["top1 (%) ↑"] == "77.00 [72.40, 81.00] ≈"
    # speedup: r13 and other_method tie; the contended r16 (2.60x) does not compete
    assert bold(vit, "speedup × ↑") == set() and tied(vit, "speedup × ↑") == {"tome r13", "other_method a\\|b"}
    # top1: the baseline is best but overlaps four others
    assert bold(vit, "top1 (%) ↑") == set()
    assert tied(vit, "top1 (%) ↑") == {"baseline —", "tome r4", "tome r8", "tome r13", "ca_tome threshold0.9"}
    assert bold(vit, "top5 (%) ↑") == {"ca_tome threshold0.9"} and tied(vit, "top5 (%) ↑") == set()
    assert tied(vit, "agreement (%) ↑") == {"tome r4", "tome r8", "ca_tome threshold0.9"}
    # exact columns: equal GFLOPs tie; the contended row has the lowest memory, so nobody is bold
    assert tied(vit, "GFLOPs/image ↓") == {"tome r13", "other_method a\\|b"} and bold(vit, "GFLOPs/image ↓") == set()
    assert bold(vit, "peak memory (MB) ↓") == set() and tied(vit, "peak memory (MB) ↓") == set()
    # throughput is not ranked
    assert not bold(vit, "throughput (img/s)") and not tied(vit, "throughput (img/s)")
    assert starred(vit) == {"baseline —", "tome r8", "tome r13", "ca_tome threshold0.9"}


def test_contended_rows_are_never_marked_and_are_listed(board, tables):
    r16 = next(r for r in tables[VIT] if label(r) == "tome r16")
    assert r16["Pareto"] == "⚠ contended"
    assert not any(v.startswith("**") or v.endswith("≈") for v in r16.values())
    text = section_blocks(board.read_text())[VIT]
    assert ("⚠ contended (1 of 7 rows; not ranked): tome r16: load average 3.4 > 2 cores, CPU utilisation 0.45 of "
            "2 threads.") in text


def test_contended_best_everywhere_gets_no_marks(tmp_path):
    """A contended row that would be best in every column and on the front carries no mark at all."""
    data = json.loads(RESULTS.read_text())
    vit = [b for b in data["benchmarks"] if b.get("group") == "vit_classification"]
    info = next(b for b in vit if b["extra_info"]["preset"] == "r16")["extra_info"]
    info.update(speedup=5.0, speedup_ci=[4.9, 5.1], gflops=0.5, peak_mem_mb=1.0)
    info["quality"].update(top1=99.0, top5=99.9, agreement=99.9)
    info["quality_ci"].update(top1=[98.9, 99.1], top5=[99.8, 100.0], agreement=[99.8, 100.0])
    data["benchmarks"] = vit
    path = tmp_path / "contended.json"
    path.write_text(json.dumps(data))
    build([str(path)], str(tmp_path / "b" / "README.md"), plots=False)
    rows = section_tables((tmp_path / "b" / "README.md").read_text())[VIT]
    r16 = next(r for r in rows if label(r) == "tome r16")
    assert r16["Pareto"] == "⚠ contended"
    assert not any(v.startswith("**") or v.endswith("≈") for v in r16.values())
    # its speedup does not compete, so the best of the others is marked; its quality does, so nobody is bold there
    assert tied(rows, "speedup × ↑") == {"tome r13", "other_method a\\|b"}
    assert bold(rows, "top1 (%) ↑") == set() and tied(rows, "top1 (%) ↑") == set()
    # nor does it take part in the Pareto front
    assert starred(rows) == {"baseline —", "tome r8", "tome r13", "ca_tome threshold0.9"}


def test_text_to_image_marks(board, tables):
    t2i = tables[T2I]
    assert "s/image" in t2i[0] and "throughput (img/s)" not in t2i[0]
    assert [label(r) for r in t2i] == ["baseline —", "tome ratio0.5", "ca_tome config_3", "tome ratio0.0"]
    assert bold(t2i, "speedup × ↑") == {"tome ratio0.5"}
    assert t2i[1]["speedup × ↑"] == "**1.60× [1.55, 1.66]**"
    assert tied(t2i, "fid ↓") == {"ca_tome config_3", "baseline —", "tome ratio0.0"}
    # the baseline reports no fidelity to itself; the cap constant is shown but not ranked
    assert t2i[0]["psnr (dB) ↑"] == "—" and t2i[0]["ssim ↑"] == "—"
    assert t2i[3]["psnr (dB) ↑"] == "100.0 (cap)"
    assert bold(t2i, "psnr (dB) ↑") == {"ca_tome config_3"}
    assert starred(t2i) == {"tome ratio0.5", "ca_tome config_3"}
    # columns where everything ties carry no marks and are named
    assert tied(t2i, "kid ↓") == set() and tied(t2i, "class_accuracy (%) ↑") == set()
    text = section_blocks(board.read_text())[T2I]
    assert ("Not separable (every row's interval overlaps the best's, so nothing is marked): kid, "
            "class_accuracy.") in text
    assert "Note: embedded digits U-Net: small enough that per-call overhead bounds the speedup" in text
    assert text.count("Note: ") == 1  # the same note of several rows is printed once


def test_arch_section_is_speed_only_with_tokens_and_notes(board, tables):
    arch = tables[ARCH]
    assert not any(key.startswith(("fid", "kid", "psnr")) for key in arch[0])
    assert [label(r) for r in arch] == ["baseline —", "tome ratio0.5", "cat_pruning alpha0.5", "ca_tome config_3"]
    assert arch[0]["tokens per block"] == "—"
    assert arch[1]["tokens per block"] == "q 2048 · kv 2048 · mlp 4096 of 4096 (2/7 blocks)"
    assert arch[2]["tokens per block"] == "q 2600 · kv 4096 · mlp 2600 of 4096 (2/7 blocks)"
    assert arch[1]["FLOPs-ideal ×"] == "1.54×" and arch[1]["efficiency"] == "94%"
    assert arch[1]["speedup × ↑"] == "**1.45× [1.41, 1.49]**"
    text = section_blocks(board.read_text())[ARCH]
    assert "Speed only: the real architecture with random weights (`--size arch`)" in text
    assert "Note: CA-ToMe's merge count depends on trained features" in text
    assert not starred(arch) and "![" not in text  # no quality: no front, no plot


def test_schema_1_files_render_without_marks(board, tables):
    old = tables[OLD]
    assert [label(r) for r in old] == ["baseline —", "tome r8"]
    assert old[1]["speedup × ↑"] == "1.40×" and old[1]["top1 (%) ↑"] == "79.00"
    assert old[1]["FLOPs-ideal ×"] == "1.53×"  # derived from the baseline row's GFLOPs
    assert not starred(old)
    assert not any(v.startswith("**") or v.endswith("≈") for r in old for v in r.values())
    assert "results of schema 1" in section_blocks(board.read_text())[OLD]


def test_headers_plots_copies_and_published_table(board):
    text = board.read_text()
    vit_part = section_blocks(text)[VIT]
    for fragment in ("**Device**: `cpu` — Test CPU 9000 (2 threads of 2 cores)", "**dtype**: float32",
                     "torch 2.14.1, diffusers 0.42.1, timm 1.0.31", "**Date**: 2025-06-01",
                     "**Settings**: batch_size=64, num_images=360",
                     "**Reproduce**: `tokred run --task vit_classification --size embedded --device cpu`",
                     "**Results**: [`results/embedded-cpu.json`](results/embedded-cpu.json)"):
        assert fragment in vit_part
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert len(images) == 4
    for image in images:
        data = (board.parent / image).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    # every results file read is copied, byte for byte, beside the markdown
    for path in ALL_RESULTS:
        assert (board.parent / "results" / path.name).read_bytes() == path.read_bytes()
    assert sources_of(text) == {"sources": [f"results/{p.name}" for p in ALL_RESULTS], "published": True}
    # published numbers: only in their own, labelled table
    measured, published = text.split("## Published results (not measured by us)")
    assert "ToMe for SD" in published and "1.87×" in published
    assert "ToMe for SD" not in measured and "facebookresearch" not in measured
    assert published.count("\n## ") == 0


def test_plots_are_deterministic(board, tmp_path):
    again = tmp_path / "README.md"
    build([str(p) for p in ALL_RESULTS], str(again))
    for png in sorted(board.parent.glob("*.png")):
        assert (tmp_path / png.name).read_bytes() == png.read_bytes()


# --- reproducible: the markdown is rebuilt from the results beside it, byte for byte --------------------------


def rebuild(markdown: Path, out: Path) -> str:
    """Regenerate ``markdown`` from the results files it names (relative to its folder) into ``out``."""
    recorded = sources_of(markdown.read_text(encoding="utf-8"))
    assert recorded is not None, f"{markdown} does not say what it was built from"
    paths = [str(markdown.parent / source) for source in recorded["sources"]]
    for path in paths:
        assert os.path.exists(path), f"{markdown} was built from {path}, which is not committed"
    build(paths, str(out), published=recorded["published"], plots=False)
    return out.read_text(encoding="utf-8")


def test_fixture_leaderboard_is_reproduced_byte_for_byte(tmp_path):
    assert rebuild(BOARD / "README.md", tmp_path / "README.md") == (BOARD / "README.md").read_text(encoding="utf-8")


def test_committed_leaderboard_is_reproduced_byte_for_byte(tmp_path):
    """leaderboard/README.md must be exactly what the generator makes of the results JSON committed beside it
    (rebuild it with the command on its last line after changing either)."""
    committed = REPO / "leaderboard" / "README.md"
    assert rebuild(committed, tmp_path / "README.md") == committed.read_text(encoding="utf-8")


def test_rebuild_from_the_copies_in_place(tmp_path):
    folder = tmp_path / "board"
    build([str(p) for p in ALL_RESULTS], str(folder / "README.md"), plots=False)
    first = (folder / "README.md").read_text()
    # what the markdown's last line says: run in its folder on the copies (copying onto themselves is skipped)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        build([f"results/{p.name}" for p in ALL_RESULTS], "README.md", plots=False)
    finally:
        os.chdir(cwd)
    assert (folder / "README.md").read_text() == first
    # the input order does not matter
    build([str(p) for p in reversed(ALL_RESULTS)], str(tmp_path / "other" / "README.md"), plots=False)
    assert (tmp_path / "other" / "README.md").read_text() == first


def test_a_changed_result_changes_the_markdown(tmp_path):
    folder = tmp_path / "board"
    build([str(RESULTS)], str(folder / "README.md"), plots=False)
    data = json.loads(RESULTS.read_text())
    data["benchmarks"][2]["extra_info"]["quality"]["top1"] = 78.5
    (folder / "results" / "embedded-cpu.json").write_text(json.dumps(data))
    assert rebuild(folder / "README.md", tmp_path / "again.md") != (folder / "README.md").read_text()


def test_copies_with_one_name_from_two_files_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(RESULTS, tmp_path / "a" / "r.json")
    shutil.copy(BOARD / "results" / "arch-cpu.json", tmp_path / "b" / "r.json")
    with pytest.raises(OutputError, match="two results files are named r.json"):
        build([str(tmp_path / "a" / "r.json"), str(tmp_path / "b" / "r.json")], str(tmp_path / "lb" / "README.md"))
    assert not (tmp_path / "lb").exists()


def test_stale_temporary_files_are_removed(tmp_path):
    folder = tmp_path / "board"
    folder.mkdir()
    stale = [folder / "README.md.tmp", folder / ".README.md.k2j4_x9.tmp"]
    for path in stale:
        path.write_text("half a file")
    keep = folder / ".README.md.bak.abc.tmp"  # another file's temporary
    keep.write_text("x")
    build([str(RESULTS)], str(folder / "README.md"), plots=False)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert not list(folder.glob(".*.lock"))


def test_later_results_replace_earlier_ones(tmp_path):
    data = json.loads(RESULTS.read_text())
    newer = json.loads(RESULTS.read_text())
    newer["datetime"] = "2025-07-01T00:00:00+00:00"
    newer["benchmarks"] = [b for b in newer["benchmarks"] if b.get("param") == "vit_classification-tome-r8"]
    newer["benchmarks"][0]["extra_info"]["quality"]["top1"] = 79.5
    write_results(tmp_path / "old.json", data)
    write_results(tmp_path / "new.json", newer)
    for order in (["old.json", "new.json"], ["new.json", "old.json"]):
        sections = load_sections([str(tmp_path / name) for name in order])
        vit = next(s for s in sections if s.title == VIT)
        r8 = [r for r in vit.rows if r.preset == "r8"]
        assert len(r8) == 1 and r8[0].values["top1"] == 79.5


# --- results files -------------------------------------------------------------------------------------------


def test_malformed_file_names_file_and_field():
    with pytest.raises(ResultsError) as err:
        load_results(FIXTURES / "malformed_results.json")
    message = str(err.value)
    assert message.startswith(str(FIXTURES / "malformed_results.json"))
    assert "'benchmarks[2].extra_info.speedup'" in message and "expected a number" in message


def _set(path, value):
    def mutate(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


X = ("benchmarks", 1, "extra_info")  # tome r4 (vit), a schema-2 row
T = ("benchmarks", 9, "extra_info")  # tome ratio0.5 (text_to_image)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("benchmarks"), "'benchmarks': missing"),
        (lambda d: d["benchmarks"][0]["stats"].pop("median"), "'benchmarks[0].stats.median': missing"),
        (lambda d: d["benchmarks"][1]["extra_info"].pop("quality"), "'benchmarks[1].extra_info.quality': missing"),
        (_set((*X, "quality", "top1"), "high"), "'benchmarks[1].extra_info.quality.top1': expected a number"),
        (_set(("benchmarks", 0, "extra_info", "metrics", 0, "better"), "up"),
         "'benchmarks[0].extra_info.metrics[0].better': expected 'higher' or 'lower'"),
        (_set(("benchmarks", 2, "name"), 3), "'benchmarks[2].name': expected a string"),
        # ranges
        (_set((*X, "speedup"), -3), "'benchmarks[1].extra_info.speedup': must be > 0, got -3"),
        (_set((*X, "speedup"), 0), "'benchmarks[1].extra_info.speedup': must be > 0, got 0"),
        (_set((*X, "speedup_ci"), [0.0, 1.2]), "'benchmarks[1].extra_info.speedup_ci[0]': must be > 0"),
        (_set((*X, "speedup_ci"), [1.2, 1.0]), "'benchmarks[1].extra_info.speedup_ci': low 1.2 is above high 1"),
        (_set((*X, "speedup_ci"), [1.2, 1.3]),
         "'benchmarks[1].extra_info.speedup_ci': [1.2, 1.3] does not contain the speedup 1.1"),
        (_set((*X, "speedup_ci"), [1.0]), "'benchmarks[1].extra_info.speedup_ci': expected [low, high]"),
        (_set((*X, "round_ratios"), [1.1, -1.0]), "'benchmarks[1].extra_info.round_ratios[1]': must be > 0"),
        (_set((*X, "gflops"), -1.0), "'benchmarks[1].extra_info.gflops': must be >= 0, got -1"),
        (_set((*X, "peak_mem_mb"), -0.5), "'benchmarks[1].extra_info.peak_mem_mb': must be >= 0"),
        (_set((*X, "flops_ideal_speedup"), 0.0), "'benchmarks[1].extra_info.flops_ideal_speedup': must be > 0"),
        (_set((*X, "quality", "top1"), 100.5), "'benchmarks[1].extra_info.quality.top1': must be <= 100"),
        (_set((*X, "quality", "agreement"), -1.0), "'benchmarks[1].extra_info.quality.agreement': must be >= 0"),
        (_set((*X, "quality_ci", "top1"), [70.0, 101.0]), "'benchmarks[1].extra_info.quality_ci.top1[1]': must be <="),
        (_set((*X, "quality_ci", "fid"), [1.0, 2.0]),
         "'benchmarks[1].extra_info.quality_ci.fid': an interval for 'fid', which is not in quality"),
        (_set((*T, "quality", "fid"), -1e308), "'benchmarks[9].extra_info.quality.fid': must be >= 0, got -1e+308"),
        (_set((*T, "quality", "ssim"), 1.5), "'benchmarks[9].extra_info.quality.ssim': must be <= 1"),
        (_set((*T, "quality", "kid"), float("nan")), "'benchmarks[9].extra_info.quality.kid': expected a finite"),
        (_set((*T, "quality", "psnr"), float("inf")),
         "'benchmarks[9].extra_info.quality.psnr': expected a finite number, got inf"),
        (_set((*T, "quality_n", "fid"), 2.5), "'benchmarks[9].extra_info.quality_n.fid': expected an integer"),
        # types
        (_set((*X, "task_info"), ["steps", 3]), "'benchmarks[1].extra_info.task_info': expected an object, got list"),
        (_set((*X, "options_repr"), None), "'benchmarks[1].extra_info.options_repr': expected a string, got null"),
        (_set((*X, "notes"), "one note"), "'benchmarks[1].extra_info.notes': expected a list"),
        (_set((*X, "contended"), "yes"), "'benchmarks[1].extra_info.contended': expected true or false"),
        (_set((*X, "contention"), [3]), "'benchmarks[1].extra_info.contention[0]': expected a string"),
        (_set((*X, "loadavg_after"), [1.0, 2.0]), "'benchmarks[1].extra_info.loadavg_after': expected [1 min"),
        (_set((*X, "threads"), 0), "'benchmarks[1].extra_info.threads': must be >= 1"),
        (_set((*X, "rounds"), 2.5), "'benchmarks[1].extra_info.rounds': expected an integer"),
        (_set((*X, "cpu_utilisation"), -0.1), "'benchmarks[1].extra_info.cpu_utilisation': must be >= 0"),
        (_set((*X, "tokens"), {"blocks.0": {"tokens": 65, "attn": -1, "kv": 65, "mlp": 60}}),
         "'benchmarks[1].extra_info.tokens.blocks.0.attn': must be >= 0"),
        (_set((*X, "tokred"), 99), "'benchmarks[1].extra_info.tokred': schema version 99 is newer"),
    ],
)
def test_validation_errors_name_the_field(mutate, field):
    data = json.loads(RESULTS.read_text())
    mutate(data)
    with pytest.raises(ResultsError, match=re.escape(f"x.json: field {field}")):
        validate(data, "x.json")


def test_schema_1_and_kid_below_zero_are_valid():
    validate(json.loads((BOARD / "results" / "schema1-cpu.json").read_text()), "old.json")
    data = json.loads(RESULTS.read_text())
    data["benchmarks"][9]["extra_info"]["quality"]["kid"] = -0.7  # the unbiased estimate of two close sets
    data["benchmarks"][9]["extra_info"]["quality_ci"]["kid"] = [-0.9, 0.2]
    validate(data, "x.json")


def test_unreadable_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"benchmarks": [}')
    with pytest.raises(ResultsError, match=r"bad\.json: not valid JSON \(line 1 column 17"):
        load_results(bad)
    with pytest.raises(ResultsError, match=r"missing\.json: no such results file"):
        load_results(tmp_path / "missing.json")
    with pytest.raises(ResultsError, match=r"is a folder, not a results file"):
        load_results(tmp_path)
    other = tmp_path / "other.json"
    data = json.loads(RESULTS.read_text())
    data["benchmarks"] = [b for b in data["benchmarks"] if "tokred" not in b["extra_info"]]
    write_results(other, data)
    with pytest.raises(ResultsError, match="no tokred benchmarks"):
        load_sections([str(other)])


def test_write_results_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    shutil.copy(RESULTS, path)
    before = path.read_text()

    def interrupted_fsync(fd):
        raise KeyboardInterrupt  # interrupted with the temporary file written, before the rename

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        write_results(path, {"benchmarks": []})
    assert path.read_text() == before  # the previous complete file is still there
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # and no temporary (or lock) file is left
