"""Issue 16: every results file's non-baseline cases carry ``quality_delta`` (results schema 6), the harness
writes it (empty, with the reason, where nothing can be paired), and ``tokred migrate-results`` fills it into
files written before: paired with the baseline from the stored per-image values, else the reason."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from tokred.bench.cli import main
from tokred.bench.paired_migration import (
    NO_BASELINE,
    NO_PER_IMAGE,
    NO_QUALITY,
    fill_quality_delta,
    migrate_file,
    unpaired_reason,
)
from tokred.bench.results import load_results, tokred_benchmarks

REPO = Path(__file__).parent.parent
COMMITTED = sorted((REPO / "leaderboard" / "results").glob("*.json"))
FIXTURES = Path(__file__).parent / "fixtures" / "leaderboard" / "results"
VIT = REPO / "leaderboard" / "results" / "vit_classification-embedded-cpu.json"
T2I = REPO / "leaderboard" / "results" / "text_to_image-embedded-cpu.json"
ARCH = REPO / "leaderboard" / "results" / "vit_classification-arch-cpu-deit_s.json"


def cases(data: dict) -> list[dict]:
    return [b["extra_info"] for b in tokred_benchmarks(data) if b["extra_info"]["method"] != "baseline"]


def without_deltas(path: Path) -> dict:
    data = json.loads(path.read_text())
    for extra in cases(data):
        for key in ("quality_delta", "quality_delta_p", "quality_delta_reason"):
            extra.pop(key, None)
    return data


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_every_committed_results_file_carries_quality_delta(path):
    data = load_results(path)
    assert cases(data), f"{path.name} has no case but the baseline"
    for extra in cases(data):
        where = f"{path.name}: {extra['method']} {extra['preset']}"
        assert "quality_delta" in extra, f"{where} has no quality_delta (run tokred migrate-results)"
        if not extra["quality_delta"]:
            assert extra["quality_delta_reason"], where
        for metric, (delta, low, high) in extra["quality_delta"].items():
            assert low <= delta <= high, f"{where}: {metric}"


@pytest.mark.parametrize("path", [VIT, T2I], ids=["vit", "text_to_image"])
def test_migration_recomputes_the_harness_deltas_from_the_stored_per_image_values(path):
    """Stripped of their deltas, the committed embedded files get back exactly what the harness wrote: the same
    pairing (hits with McNemar, scores with the bootstrap, agreement and SSIM against the model's own 100% and
    1), from the per-image values alone."""
    written = json.loads(path.read_text())
    data = without_deltas(path)
    changes = fill_quality_delta(data)
    assert len(changes) == len(cases(written))
    for got, want in zip(cases(data), cases(written), strict=True):
        assert got["quality_delta"] == want["quality_delta"]
        assert got.get("quality_delta_p") == want.get("quality_delta_p")
        assert "quality_delta_reason" not in got
    assert fill_quality_delta(data) == []  # a second pass changes nothing


def test_migration_gives_the_reason_where_nothing_can_be_paired():
    arch = without_deltas(ARCH)
    fill_quality_delta(arch)
    assert {e["quality_delta_reason"] for e in cases(arch)} == {
        "quality not measured: random weights (size arch, speed only)"}
    assert all(e["quality_delta"] == {} and "quality_delta_p" not in e for e in cases(arch))
    # schema 2: quality, but no per-image values to pair
    old = json.loads((FIXTURES / "embedded-cpu.json").read_text())
    fill_quality_delta(old)
    reasons = {e["quality_delta_reason"] for e in cases(old) if e.get("quality")}
    assert reasons == {"no per-image quality values to pair: written with results schema 2, before paired "
                       "comparisons"}
    assert {e["tokred"] for e in cases(old)} == {2}  # a case keeps the schema it was written with
    # per-image values, but no baseline of the same section in the file
    vit = without_deltas(VIT)
    vit["benchmarks"] = [b for b in vit["benchmarks"] if b["extra_info"]["method"] != "baseline"]
    fill_quality_delta(vit)
    assert {e["quality_delta_reason"] for e in cases(vit)} == {NO_BASELINE}


def test_a_case_is_paired_only_with_the_baseline_of_its_own_section():
    data = without_deltas(VIT)
    other = copy.deepcopy(next(b for b in data["benchmarks"] if b["extra_info"]["method"] == "baseline"))
    other["extra_info"]["task_info"] = dict(other["extra_info"]["task_info"], num_images=7)  # another section
    other["extra_info"]["quality_per_image"] = {k: [0] * len(v) for k, v in
                                                other["extra_info"]["quality_per_image"].items()}
    data["benchmarks"].insert(0, other)
    fill_quality_delta(data)
    written = json.loads(VIT.read_text())
    assert [e["quality_delta"] for e in cases(data)] == [e["quality_delta"] for e in cases(written)]


def test_unpaired_reasons():
    assert unpaired_reason(random_weights=True, size="arch", has_quality=False, has_per_image=False) == \
        "quality not measured: random weights (size arch, speed only)"
    assert unpaired_reason(random_weights=False, size="full", has_quality=False, has_per_image=False) == NO_QUALITY
    assert unpaired_reason(random_weights=False, size="full", has_quality=True, has_per_image=False) == NO_PER_IMAGE
    assert unpaired_reason(random_weights=False, size="full", has_quality=True, has_per_image=True) == NO_BASELINE


def test_migrate_results_command(tmp_path, capsys):
    path = tmp_path / ARCH.name
    data = without_deltas(ARCH)
    path.write_text(json.dumps(data, indent=2) + "\n")
    before = path.read_text()
    assert main(["migrate-results", "--check", str(path)]) == 1  # reports, changes nothing
    assert path.read_text() == before and "would add quality_delta to 5 cases" in capsys.readouterr().out
    assert main(["migrate-results", str(path)]) == 0
    assert "added quality_delta to 5 cases" in capsys.readouterr().out
    assert all(e["quality_delta"] == {} for e in cases(load_results(path)))
    assert main(["migrate-results", "--check", str(path)]) == 0
    assert "up to date" in capsys.readouterr().out
    # an up-to-date file is not rewritten
    shutil.copy(VIT, tmp_path / VIT.name)
    assert migrate_file(tmp_path / VIT.name) == [] and (tmp_path / VIT.name).read_bytes() == VIT.read_bytes()
    # a file that is not a results file: one line, no traceback
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    assert main(["migrate-results", str(bad)]) == 2
    assert "tokred: error:" in capsys.readouterr().err
