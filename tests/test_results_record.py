"""The one results record (tokred.bench.record.CaseRecord): round trip through a results file, migration of
schema-1 and schema-2 files, errors naming the field, and a rule for every field."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest

from tokred.bench.record import KINDS, SCHEMA_VERSION, CaseRecord, Rule, migrate, rule_of
from tokred.bench.results import ResultsError, load_results, new_results, validate, write_results
from tokred.leaderboard.generate import build, load_sections

BOARD = Path(__file__).parent / "fixtures" / "leaderboard" / "results"
EMBEDDED = BOARD / "embedded-cpu.json"  # schema 2
ARCH = BOARD / "arch-cpu.json"  # schema 2, task_info with a resolution
SCHEMA1 = BOARD / "schema1-cpu.json"


def benchmarks(path: Path) -> list[dict]:
    return json.loads(path.read_text())["benchmarks"]


def current_extra_info() -> dict:
    """A current-schema extra_info: the fixtures' tome r4 row with the schema-3, 4 and 6 fields and an unknown
    key."""
    extra = copy.deepcopy(benchmarks(EMBEDDED)[1]["extra_info"])
    extra.update(tokred=SCHEMA_VERSION, unit="batch of 64 images", workload="embedded", architecture="deit_s",
                 resolution=224, processes=1, quality_delta={"top1": [-1.5, -3.0, -0.25]}, future_key={"kept": [1, 2]})
    return extra


def document(extra_infos: list[dict], template: Path = EMBEDDED) -> dict:
    doc = new_results(machine={"node": "test"}, commit={"id": "0" * 40})
    bench = benchmarks(template)[1]
    doc["benchmarks"] = [{**copy.deepcopy(bench), "extra_info": extra} for extra in extra_infos]
    return doc


# --- (a) round trip ------------------------------------------------------------------------------------------------


def test_record_round_trips_through_a_results_file(tmp_path):
    record = CaseRecord.from_extra_info(current_extra_info())
    assert record.unit == "batch of 64 images" and record.resolution == 224 and record.speedup == 1.10
    assert record.extra == {"future_key": {"kept": [1, 2]}}  # unknown keys are kept, not lost
    path = tmp_path / "r.json"
    write_results(path, document([record.to_extra_info()]))
    data = load_results(path)
    again = CaseRecord.from_extra_info(data["benchmarks"][0]["extra_info"], "benchmarks[0].extra_info", str(path))
    assert again == record
    assert again.to_extra_info() == record.to_extra_info() == current_extra_info()


def test_absent_fields_stay_absent_and_null_fields_are_written():
    extra = current_extra_info()
    for key in ("speedup_ci", "loadavg_before", "tokens"):
        extra.pop(key, None)
    extra["gflops"] = None
    out = CaseRecord.from_extra_info(extra).to_extra_info()
    assert "speedup_ci" not in out and "loadavg_before" not in out and "tokens" not in out
    assert out["gflops"] is None
    validate(document([out]), "x.json")


# --- (b) schema 1 --------------------------------------------------------------------------------------------------


def test_schema_1_file_renders_without_intervals(tmp_path):
    old = benchmarks(SCHEMA1)
    assert {b["extra_info"]["tokred"] for b in old} == {1}
    out = tmp_path / "board" / "README.md"
    (section,) = build([str(SCHEMA1)], str(out), published=False, plots=False)
    assert [r.label for r in section.rows] == ["baseline", "tome r8"]
    assert all(r.record.tokred == 1 and r.record.speedup_ci is None and r.record.quality_ci is None
               for r in section.rows)
    assert all(e.interval is None for r in section.rows for e in r.estimates.values())
    assert not section.has_intervals
    text = out.read_text()
    assert "results of schema 1" in text
    table = [line for line in text.splitlines() if line.startswith("| tome")]
    assert len(table) == 1 and "[" not in table[0] and "**" not in table[0] and "≈" not in table[0]


def test_schema_1_migration_adds_no_intervals():
    extra = benchmarks(SCHEMA1)[1]["extra_info"]
    migrated = migrate(extra)
    assert migrated["tokred"] == 1 and migrated["workload"] == "embedded" and migrated["unit"] == ""
    assert not {"speedup_ci", "quality_ci", "round_ratios", "threads"} & set(migrated)
    record = CaseRecord.from_extra_info(extra)
    assert record.speedup_ci is None and record.torch_threads == 4
    assert "speedup_ci" not in record.to_extra_info()


# --- (c) schema 2 --------------------------------------------------------------------------------------------------


def test_schema_2_file_migrates():
    for bench in benchmarks(EMBEDDED):
        extra = bench["extra_info"]
        if "tokred" not in extra:
            continue
        record = CaseRecord.from_extra_info(extra)
        assert record.tokred == 2 and record.unit == "" and record.workload == record.size == "embedded"
        assert record.architecture is None and record.resolution is None
        assert record.speedup_ci is not None
    arch = CaseRecord.from_extra_info(benchmarks(ARCH)[1]["extra_info"])
    assert arch.workload == "arch" and arch.resolution == 512 and arch.architecture is None
    extra = dict(benchmarks(ARCH)[1]["extra_info"], task_info={"architecture": "sd15", "resolution": "512"})
    migrated = CaseRecord.from_extra_info(extra)
    assert migrated.architecture == "sd15" and migrated.resolution is None  # only a valid resolution is copied
    assert migrate({"tokred": 2, "size": "full", "unit": "denoiser call"})["unit"] == "denoiser call"


def test_schema_3_needs_the_new_fields_and_newer_schemas_refuse():
    extra = current_extra_info()
    extra.pop("workload")
    with pytest.raises(ResultsError, match=re.escape("x.json: field 'extra_info.workload': missing")):
        CaseRecord.from_extra_info(extra, source="x.json")
    extra = dict(current_extra_info(), tokred=SCHEMA_VERSION + 1)
    with pytest.raises(ResultsError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        CaseRecord.from_extra_info(extra)


def test_schema_6_requires_quality_delta_of_every_case_but_the_baseline():
    extra = current_extra_info()
    extra.pop("quality_delta")
    with pytest.raises(ResultsError, match=re.escape("x.json: field 'extra_info.quality_delta': missing: every case "
                                                     "but the baseline carries it from schema 6")):
        CaseRecord.from_extra_info(extra, source="x.json")
    CaseRecord.from_extra_info(dict(extra, tokred=5))  # older schemas: absent is fine
    CaseRecord.from_extra_info(dict(extra, method="baseline", preset="baseline"))  # the baseline has none
    # an empty one says why
    with pytest.raises(ResultsError, match=re.escape("field 'extra_info.quality_delta_reason': missing: "
                                                     "quality_delta is empty and no reason says why")):
        CaseRecord.from_extra_info(dict(extra, quality_delta={}))
    record = CaseRecord.from_extra_info(dict(extra, quality_delta={}, quality_delta_reason="quality not measured"))
    assert record.quality_delta == {} and record.quality_delta_reason == "quality not measured"


def test_others_cpu_is_checked():
    others = {"busy_s": 20.1, "own_s": 19.9, "others_s": 0.2, "window_s": 10.0, "others_cores": 0.02,
              "limit_cores": 0.25, "resolution_s": 0.04, "procs_running_max": 3, "source": "/proc/stat"}
    assert CaseRecord.from_extra_info(dict(current_extra_info(), others_cpu=others)).others_cpu == others
    assert "others_cpu" not in CaseRecord.from_values(dict(current_extra_info(), others_cpu=None)).to_extra_info()
    with pytest.raises(ResultsError, match=re.escape("field 'extra_info.others_cpu.others_s': must be >= 0")):
        CaseRecord.from_extra_info(dict(current_extra_info(), others_cpu=dict(others, others_s=-1.0)))
    with pytest.raises(ResultsError, match=re.escape("field 'extra_info.others_cpu.window_s': missing")):
        CaseRecord.from_extra_info(dict(current_extra_info(), others_cpu={k: v for k, v in others.items()
                                                                          if k != "window_s"}))


# --- (d) errors name the field -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("unit", 3, "'benchmarks[0].extra_info.unit': expected a string, got int 3"),
        ("workload", None, "'benchmarks[0].extra_info.workload': expected a string, got null"),
        ("resolution", "512", "'benchmarks[0].extra_info.resolution': expected an integer, got str"),
        ("resolution", 0, "'benchmarks[0].extra_info.resolution': must be >= 1, got 0"),
        ("architecture", ["sd15"], "'benchmarks[0].extra_info.architecture': expected a string, got list"),
        ("speedup", "fast", "'benchmarks[0].extra_info.speedup': expected a number, got str"),
        ("options", [], "'benchmarks[0].extra_info.options': expected an object, got list"),
    ],
)
def test_wrong_type_names_the_field(key, value, message):
    extra = dict(current_extra_info(), **{key: value})
    with pytest.raises(ResultsError, match=re.escape(f"x.json: field {message}")):
        validate(document([extra]), "x.json")
    with pytest.raises(ResultsError, match=re.escape(f"y.json: field {message}")):
        CaseRecord.from_extra_info(extra, "benchmarks[0].extra_info", "y.json")


def test_nullable_fields_accept_null():
    extra = dict(current_extra_info(), architecture=None, resolution=None, gflops=None, efficiency=None)
    record = CaseRecord.from_extra_info(extra)
    assert record.architecture is None and record.to_extra_info()["resolution"] is None


# --- (e) every field has a rule, and the rule is applied -------------------------------------------------------


def test_every_field_has_a_rule():
    for f in dataclasses.fields(CaseRecord):
        rule = rule_of(f)
        assert isinstance(rule, Rule), f"CaseRecord.{f.name} has no validation rule"
        assert rule.kind in KINDS and rule.doc, f.name
        assert 1 <= rule.since <= SCHEMA_VERSION, f.name
        assert (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING) == rule.required, \
            f"CaseRecord.{f.name}: a required field has no default, an optional one has"
    assert [f.name for f in dataclasses.fields(CaseRecord) if rule_of(f).kind == "extra"] == ["extra"]


def _wrong_value(rule: Rule):
    """A value of the wrong JSON type for ``rule``."""
    return "wrong" if rule.kind in ("dict", "list", "numbers", "strings", "interval", "int", "number", "bool") \
        else {"wrong": 1}


def test_every_field_is_checked():
    """Each field's rule is applied: a wrong type in any field is an error naming that field (a field added
    without a rule, or with a rule the checker ignores, fails here)."""
    for f in dataclasses.fields(CaseRecord):
        rule = rule_of(f)
        if rule.kind == "extra":
            continue
        extra = dict(current_extra_info(), **{f.name: _wrong_value(rule)})
        with pytest.raises(ResultsError, match=re.escape(f"field 'extra_info.{f.name}'")):
            CaseRecord.from_extra_info(extra)
        if rule.required:
            extra.pop(f.name)
            with pytest.raises(ResultsError, match=re.escape(f"field 'extra_info.{f.name}': missing")):
                CaseRecord.from_extra_info(extra)


def test_committed_and_fixture_results_load_as_records():
    paths = sorted(BOARD.glob("*.json")) + sorted((Path(__file__).parent.parent / "leaderboard" / "results")
                                                  .glob("*.json"))
    assert paths
    for path in paths:
        data = load_results(path)
        for bench in data["benchmarks"]:
            extra = bench["extra_info"]
            if "tokred" in extra:
                record = CaseRecord.from_extra_info(extra, source=str(path))
                assert CaseRecord.from_extra_info(record.to_extra_info()) == record


def test_leaderboard_rows_carry_records():
    sections = load_sections([str(EMBEDDED)])
    assert all(isinstance(r.record, CaseRecord) for s in sections for r in s.rows)


# --- the harness writes the record ---------------------------------------------------------------------------------


def test_harness_writes_schema_3(monkeypatch):
    from test_harness import TinyVitTask

    from tokred.bench.harness import TaskRun, plan_cases
    from tokred.bench.runner import summary_line
    from tokred.bench.task import tasks as task_registry

    task_registry.names()
    monkeypatch.setattr(task_registry, "_items", dict(task_registry._items))
    from tokred.bench.workload import TimedCall

    plain = TinyVitTask.workload
    monkeypatch.setattr(TinyVitTask, "workload", lambda self: TimedCall(plain(self), "batch of 8 images"))
    task_registry.register("tiny_record_task")(TinyVitTask)
    run = TaskRun("tiny_record_task", rounds=2, task_kwargs={"num_images": 8})
    base = run.run_case(plan_cases("tiny_record_task", "tome", "r8")[0])
    info = base.extra_info
    assert info["tokred"] == SCHEMA_VERSION and info["unit"] == "batch of 8 images" and info["workload"] == "embedded"
    assert info["architecture"] is None and info["resolution"] is None
    record = CaseRecord.from_extra_info(json.loads(json.dumps(info)))
    assert record.to_extra_info() == info
    validate(document([info]), "harness.json")
    assert summary_line(info).startswith("speedup 1.00x")
