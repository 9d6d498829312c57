"""The leaderboard generator and the results-file reader.

``fixtures/leaderboard_results.json`` (made by ``fixtures/make_results_fixtures.py``) holds two sections with
known answers: for vit_classification the Pareto front of speedup against top1 is baseline, tome r8 and tome r13
(ca_tome is slower and worse than r8; other_method is as fast as r13 but worse); for text_to_image, where fid is
lower-better, ca_tome beats the baseline on both axes, so the front is ca_tome and tome ratio0.5.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tokred.bench.results import ResultsError, load_results, validate, write_results
from tokred.leaderboard.generate import build, load_sections

FIXTURES = Path(__file__).parent / "fixtures"
RESULTS = FIXTURES / "leaderboard_results.json"


def section_tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """{section title: [row as {header: cell}]} for the pipe tables under each ``## `` heading."""
    out: dict[str, list[dict[str, str]]] = {}
    for block in markdown.split("\n## ")[1:]:
        title, _, body = block.partition("\n")
        lines = [line for line in body.splitlines() if line.startswith("|")]
        if not lines:
            continue
        split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]  # noqa: E731
        headers = split(lines[0])
        out[title.strip()] = [dict(zip(headers, split(line), strict=True)) for line in lines[2:]]
    return out


@pytest.fixture
def board(tmp_path):
    out = tmp_path / "board" / "README.md"
    build([str(RESULTS)], str(out), command="tokred leaderboard fixture.json")
    return out


def test_rows_bold_and_pareto_marks(board):
    text = board.read_text()
    tables = section_tables(text)
    vit = tables["vit_classification · embedded · Test CPU 9000 · float32"]
    t2i = tables["text_to_image · embedded · Test CPU 9000 · float32"]

    # baseline first at 1.00x, then by speedup; the benchmark without tokred extra_info is not a row
    assert [(r["method"], r["preset"]) for r in vit] == [
        ("baseline", "—"), ("other_method", "a\\|b"), ("tome", "r13"), ("tome", "r8"), ("ca_tome", "threshold0.9"),
    ]  # fmt: skip
    assert vit[0]["speedup × ↑"] == "1.00×" and vit[0]["options"] == "—"
    assert set(vit[0]) >= {"throughput (img/s) ↑", "GFLOPs/image ↓", "peak memory (MB) ↓", "top1 (%) ↑",
                           "top5 (%) ↑", "agreement (%) ↑"}
    assert vit[3]["options"] == "r=8" and vit[1]["options"] == "mode='a\\|b'"

    # Pareto front: speedup vs top1 (higher is better)
    assert {r["method"] + " " + r["preset"] for r in vit if r["Pareto"] == "★"} == {"baseline —", "tome r13",
                                                                                   "tome r8"}
    # bold = best per column, ties all bold; direction from each metric
    bold = lambda rows, col: {r["method"] + " " + r["preset"] for r in rows if r[col].startswith("**")}  # noqa: E731
    assert bold(vit, "speedup × ↑") == {"other_method a\\|b", "tome r13"}
    assert vit[2]["speedup × ↑"] == "**2.00×**"
    assert bold(vit, "throughput (img/s) ↑") == {"tome r13"}
    assert bold(vit, "GFLOPs/image ↓") == {"tome r13"}
    assert bold(vit, "peak memory (MB) ↓") == {"tome r13"}
    assert bold(vit, "top1 (%) ↑") == {"baseline —"}
    assert bold(vit, "top5 (%) ↑") == {"ca_tome threshold0.9"}

    # diffusion: seconds per image instead of throughput, fid lower-better
    assert "s/image ↓" in t2i[0] and "throughput (img/s) ↑" not in t2i[0]
    assert [r["method"] for r in t2i] == ["baseline", "tome", "ca_tome"]
    assert {r["method"] for r in t2i if r["Pareto"] == "★"} == {"tome", "ca_tome"}
    assert bold(t2i, "fid ↓") == {"ca_tome config_3"} and t2i[2]["fid ↓"] == "**9.50**"
    assert bold(t2i, "s/image ↓") == {"tome ratio0.5"}
    assert bold(t2i, "class_accuracy (%) ↑") == {"ca_tome config_3"}


def test_headers_plots_and_published_table(board):
    text = board.read_text()
    vit_part = text.split("## vit_classification")[1].split("\n## ")[0]
    for fragment in ("**Device**: `cpu` — Test CPU 9000 (2 threads)", "**dtype**: float32",
                     "torch 2.14.1, diffusers 0.42.1, timm 1.0.31", "**Date**: 2025-06-01",
                     "**Reproduce**: `tokred run --task vit_classification --size embedded --device cpu`"):
        assert fragment in vit_part
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert len(images) == 2
    for image in images:
        data = (board.parent / image).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    # published numbers: only in their own, labelled, last table
    measured, published = text.split("## Published results (not measured by us)")
    assert "ToMe for SD" in published and "1.87×" in published
    assert "ToMe for SD" not in measured and "facebookresearch" not in measured
    assert published.count("\n## ") == 0


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
        vit = next(s for s in sections if s.task == "vit_classification")
        r8 = [r for r in vit.rows if r.preset == "r8"]
        assert len(r8) == 1 and r8[0].values["top1"] == 79.5


# --- results files -------------------------------------------------------------------------------------------


def test_malformed_file_names_file_and_field():
    with pytest.raises(ResultsError) as err:
        load_results(FIXTURES / "malformed_results.json")
    message = str(err.value)
    assert message.startswith(str(FIXTURES / "malformed_results.json"))
    assert "'benchmarks[2].extra_info.speedup'" in message and "expected a number" in message


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("benchmarks"), "'benchmarks': missing"),
        (lambda d: d["benchmarks"][0]["stats"].pop("median"), "'benchmarks[0].stats.median': missing"),
        (lambda d: d["benchmarks"][1]["extra_info"].pop("quality"), "'benchmarks[1].extra_info.quality': missing"),
        (lambda d: d["benchmarks"][1]["extra_info"]["quality"].update(top1="high"),
         "'benchmarks[1].extra_info.quality.top1': expected a number"),
        (lambda d: d["benchmarks"][0]["extra_info"]["metrics"][0].update(better="up"),
         "'benchmarks[0].extra_info.metrics[0].better': expected 'higher' or 'lower'"),
        (lambda d: d["benchmarks"][2].update(name=3), "'benchmarks[2].name': expected a string"),
    ],
)
def test_validation_errors_name_the_field(mutate, field):
    data = json.loads(RESULTS.read_text())
    mutate(data)
    with pytest.raises(ResultsError, match=re.escape(f"x.json: field {field}")):
        validate(data, "x.json")


def test_unreadable_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"benchmarks": [}')
    with pytest.raises(ResultsError, match=r"bad\.json: not valid JSON \(line 1 column 17"):
        load_results(bad)
    with pytest.raises(ResultsError, match=r"missing\.json: no such results file"):
        load_results(tmp_path / "missing.json")
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

    def broken_dump(*args, **kwargs):
        raise KeyboardInterrupt  # interrupted in the middle of writing

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(KeyboardInterrupt):
        write_results(path, {"benchmarks": []})
    assert path.read_text() == before  # the previous complete file is still there
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # and no temporary file is left
