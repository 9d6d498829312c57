"""Issue 16: paired quality (a case against the baseline on the same images), strength ladders, the plot's
curves, and the main job keeping the leaderboard sections it did not measure."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tokred.bench.harness import Case, TaskRun, plan_cases
from tokred.bench.paired import (
    mcnemar_exact,
    paired_bootstrap,
    paired_proportion,
    quality_deltas,
)
from tokred.bench.record import CaseRecord, ResultsError
from tokred.bench.stats import mean_ci

FIXTURES = Path(__file__).parent / "fixtures"
GOOD_RESULTS = FIXTURES / "leaderboard" / "results" / "embedded-cpu.json"
ARCH_RESULTS = FIXTURES / "leaderboard" / "results" / "arch-cpu.json"


# --- the paired bootstrap -----------------------------------------------------------------------------------------


def test_paired_bootstrap_finds_a_known_shift_that_marginal_intervals_miss():
    rng = np.random.default_rng(1)
    base = rng.normal(30.0, 5.0, 80)  # images differ a lot from each other...
    case = base - 0.5 + rng.normal(0.0, 0.2, 80)  # ...the method shifts every image by -0.5
    delta, (low, high) = paired_bootstrap(case, base)
    assert delta == pytest.approx(float(np.mean(case - base)))
    assert low < -0.5 < high and high < 0  # the known shift is inside, zero is not
    assert high - low < 0.2
    # the unpaired comparison of the two marginal intervals cannot tell them apart
    (b_lo, b_hi), (c_lo, c_hi) = mean_ci(base), mean_ci(case)
    assert c_lo <= b_hi and b_lo <= c_hi


def test_paired_bootstrap_without_a_shift_holds_zero_and_is_deterministic():
    rng = np.random.default_rng(2)
    base = rng.normal(0.0, 1.0, 60)
    case = base + rng.normal(0.0, 0.1, 60)
    delta, (low, high) = paired_bootstrap(case, base)
    assert low <= 0.0 <= high and low <= delta <= high
    assert paired_bootstrap(case, base) == (delta, (low, high))
    assert paired_bootstrap(base, base) == (0.0, (0.0, 0.0))
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap([1.0, 2.0], [1.0])


# --- McNemar ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("b", "c", "p"), [
    (0, 0, 1.0),
    (1, 9, 2 * (1 + 10) / 1024),  # 0.021484375
    (9, 1, 2 * (1 + 10) / 1024),
    (3, 0, 0.25),
    (0, 6, 2 / 64),
    (2, 8, 2 * (1 + 10 + 45) / 1024),  # 0.109375
    (5, 5, 1.0),
    (0, 5, 0.0625),
])  # fmt: skip
def test_mcnemar_exact_known_values(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_refuses_what_is_not_a_count():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="count"):
            mcnemar_exact(bad, 3)


def test_paired_proportion_known_values():
    # 80 images: 3 won, 9 lost. Bonett-Price: p_b = 4/82, p_c = 10/82, d = -6/82, se = sqrt((14/82 - d^2) / 82)
    case = [1] * 3 + [0] * 9 + [1] * 60 + [0] * 8
    base = [0] * 3 + [1] * 9 + [1] * 60 + [0] * 8
    delta, (low, high), p = paired_proportion(case, base)
    d = -6 / 82
    se = ((14 / 82 - d * d) / 82) ** 0.5
    assert delta == pytest.approx(-7.5)
    assert (low, high) == pytest.approx((100 * (d - 1.959964 * se), 100 * (d + 1.959964 * se)), abs=1e-4)
    assert p == pytest.approx(2 * (1 + 12 + 66 + 220) / 4096)  # 0.146: not separated, and the interval holds 0
    assert low < 0 < high
    # every discordant pair one way: the interval reaches beyond the observed difference (unconditional)
    delta, (low, high), p = paired_proportion([0] * 16 + [1] * 344, [1] * 16 + [1] * 344)
    assert delta == pytest.approx(-100 * 16 / 360) and low < delta < high < 0 and p == pytest.approx(2 / 2**16)
    # no discordant pair: no difference, and an interval as wide as 3 images allow
    delta, (low, high), p = paired_proportion([1, 0, 1], [1, 0, 1])
    assert delta == 0.0 and p == 1.0 and low == pytest.approx(-high) and high > 40


@pytest.mark.parametrize(("b", "c"), [(b, c) for b in range(0, 13, 2) for c in range(0, 13, 3)])
def test_paired_proportion_interval_excludes_zero_only_where_mcnemar_rejects(b, c):
    same = 50
    case = [1] * b + [0] * c + [1] * same + [0] * 7
    base = [0] * b + [1] * c + [1] * same + [0] * 7
    delta, (low, high), p = paired_proportion(case, base)
    n = len(case)
    assert delta == pytest.approx(100.0 * (b - c) / n)
    assert low <= delta <= high
    assert p == pytest.approx(mcnemar_exact(b, c))
    if low > 0 or high < 0:
        assert p < 0.05
    if p < 0.01:  # clear rejections are separated by the interval too
        assert low > 0 or high < 0


def test_quality_deltas_pairs_each_metric_its_own_way():
    base = {"top1": [1, 1, 0, 1] * 10, "score": [0.5, 0.7, 0.9, 0.1] * 10}
    case = {"top1": [0, 1, 0, 1] * 10, "score": [0.4, 0.6, 0.8, 0.0] * 10, "only_case": [1.0] * 40}
    deltas, pvalues = quality_deltas(case, base, {"top1"})
    assert set(deltas) == {"top1", "score"} and set(pvalues) == {"top1"}
    assert deltas["top1"][0] == pytest.approx(-25.0) and deltas["top1"][2] < 0  # 10 of 40 lost, none won
    assert pvalues["top1"] == pytest.approx(2 / 1024)
    assert deltas["score"] == pytest.approx([-0.1, -0.1, -0.1])


# --- the harness records the paired differences -------------------------------------------------------------------


def test_harness_records_quality_delta_against_the_baseline():
    run = TaskRun("vit_classification", "embedded", task_kwargs={"num_images": 60, "threads": 1}, rounds=1)
    run.setup()
    base = run.run_case(Case("vit_classification", "baseline", "baseline"))
    case = run.run_case(Case("vit_classification", "tome", "r16-decreasing", {"r": (16, -1)}, order=2))
    base_info, info = base.extra_info, case.extra_info
    assert "quality_delta" not in base_info and len(base_info["quality_per_image"]["top1"]) == 60
    assert set(info["quality_delta"]) == {"top1", "top5", "agreement"}
    assert set(info["quality_delta_p"]) == {"top1", "top5", "agreement"}
    per = info["quality_per_image"]
    expected = 100.0 * (np.mean(per["top1"]) - np.mean(base_info["quality_per_image"]["top1"]))
    assert info["quality_delta"]["top1"][0] == pytest.approx(expected)
    # agreement is paired with the unreduced model's agreement with itself, 100%
    assert info["quality_delta"]["agreement"][0] == pytest.approx(info["quality"]["agreement"] - 100.0)
    assert info["preset_order"] == 2 and info["tokred"] >= 4
    record = CaseRecord.from_extra_info(info)  # the schema checks it
    assert record.quality_delta == info["quality_delta"]
    bad = copy.deepcopy(info)
    bad["quality_delta"]["top1"] = [5.0, 6.0, 7.0]
    with pytest.raises(ResultsError, match="does not contain the difference"):
        CaseRecord.from_extra_info(bad)


# --- ladders ------------------------------------------------------------------------------------------------------


def test_ladders_and_the_main_jobs_ends():
    every = plan_cases("text_to_image", "tome,deepcache,cat_pruning", family="diffusers_unet")
    tome = [c for c in every if c.method == "tome"]
    assert [c.preset for c in tome] == ["ratio0.3", "ratio0.5", "ratio0.6", "ratio0.75"]
    assert [c.order for c in tome] == [0, 1, 2, 3]
    ends = plan_cases("text_to_image", "tome,deepcache,cat_pruning", family="diffusers_unet", ladder="ends")
    assert sorted((c.method, c.preset, c.order or 0) for c in ends) == [
        ("baseline", "baseline", 0), ("cat_pruning", "alpha0.1", 2), ("cat_pruning", "alpha0.5", 0),
        ("deepcache", "interval2", 0), ("deepcache", "interval5", 2), ("tome", "ratio0.3", 0),
        ("tome", "ratio0.75", 3),
    ]  # fmt: skip
    # an explicit preset selection is run as given, whatever the ladder
    chosen = plan_cases("text_to_image", "tome", "ratio0.5", family="diffusers_unet", ladder="ends")
    assert [c.preset for c in chosen] == ["baseline", "ratio0.5"] and chosen[1].order == 1


VIT_LADDER_ENDS = {  # each ViT method's mildest and strongest preset: what the main job runs
    "tome": ("r8", "r16-decreasing"), "ca_tome": ("threshold0.9", "threshold0.5"), "tofu": ("r8", "r16"),
    "evit": ("keep0.9", "keep0.3"), "pitome": ("r8", "r16-decreasing"), "mctf": ("r8", "r24-start0"),
}


def test_the_main_job_runs_the_ends_of_the_vit_ladders():
    methods = ",".join(VIT_LADDER_ENDS)
    ends = plan_cases("vit_classification", methods, ladder="ends")
    picked = {m: tuple(c.preset for c in ends if c.method == m) for m in VIT_LADDER_ENDS}
    assert picked == VIT_LADDER_ENDS
    every = plan_cases("vit_classification", "evit,pitome,mctf")
    assert [c.preset for c in every if c.method == "evit"] == ["keep0.9", "keep0.7", "keep0.5", "keep0.3"]
    assert [c.preset for c in every if c.method == "pitome"] == ["r8", "r13", "r16", "r16-decreasing"]
    assert [c.preset for c in every if c.method == "mctf"] == ["r8", "r12", "r16", "r24-start0"]


def test_the_strongest_vit_presets_separate_from_the_baseline_on_the_embedded_vit():
    """Issue 16: on the main job's images (the embedded digits ViT, 360 test images), each method's strongest
    preset loses top-1 with a paired interval that excludes 0, and its mildest ties with the baseline (CA-ToMe's
    mildest, threshold 0.9, already merges more than half of the digits ViT's 64 patches: it does not tie)."""
    import tokred
    from tokred.bench.task import get_task
    from tokred.registry import get_method

    task = get_task("vit_classification")(size="embedded", progress=False)
    task.setup()
    base = task.record_reference().per_image["top1"]
    assert len(base) == 360
    for method, (mild, strong) in VIT_LADDER_ENDS.items():
        presets = get_method(method).presets["timm_vit"]
        for preset in (mild, strong):
            with tokred.apply(task.model, method, **presets[preset]):
                top1 = task.evaluate().per_image["top1"]
            delta, (low, high), _ = paired_proportion(top1, base)
            if preset == strong:
                assert high < 0, f"{method} {preset}: top-1 {delta:+.2f} [{low:+.2f}, {high:+.2f}] holds 0"
            elif method != "ca_tome":
                assert low <= 0 <= high, f"{method} {preset}: top-1 {delta:+.2f} [{low:+.2f}, {high:+.2f}]"


# --- the plot's curves and the marks on paired intervals ----------------------------------------------------------


def _paired_results(tmp_path: Path) -> Path:
    """The fixture's ViT section made schema 4: ToMe's presets with ladder places that differ from their speed
    order, and paired differences (r8 ties with the baseline, r13 is separated from it)."""
    data = json.loads(GOOD_RESULTS.read_text())
    keep = []
    for bench in data["benchmarks"]:
        extra = bench["extra_info"]
        if extra.get("task") != "vit_classification" or extra["method"] not in ("baseline", "tome"):
            continue
        extra.update(tokred=4, workload=extra["size"], unit="batch of 16 images")
        extra["metrics"][0]["primary"] = True
        order = {"r4": 0, "r8": 1, "r13": 2, "r16": 3}.get(extra["preset"])
        if order is not None:
            extra["preset_order"] = order
        if extra["preset"] == "r8":
            extra["quality_delta"] = {"top1": [-1.0, -3.0, 1.0]}
            extra["speedup"], extra["speedup_ci"] = 2.9, [2.8, 3.0]  # faster than r16 on purpose
        elif extra["preset"] == "r13":
            extra["quality_delta"] = {"top1": [-3.0, -5.0, -1.0]}
        keep.append(bench)
    data["benchmarks"] = keep
    path = tmp_path / "paired-cpu.json"
    path.write_text(json.dumps(data))
    return path


def test_curves_follow_the_ladder_not_the_speed(tmp_path):
    from tokred.leaderboard.plot import curves, plot_data
    from tokred.leaderboard.sections import load_sections

    (section,) = load_sections([str(_paired_results(tmp_path))])
    assert [(m, [r.preset for r in rows]) for m, rows in curves(section)] == [("tome", ["r4", "r8", "r13", "r16"])]
    data = plot_data(section)
    assert data["metric"] == "top1" and data["baseline"] == 80.0
    (curve,) = data["curves"]
    assert [p["preset"] for p in curve["points"]] == ["r4", "r8", "r13", "r16"]
    r8 = curve["points"][1]
    assert r8["x"] == 2.9 and r8["y_interval"] == pytest.approx((80.0 - 3.0, 80.0 + 1.0))  # baseline + Δ interval


def test_marks_on_quality_use_the_paired_intervals(tmp_path):
    from tokred.leaderboard.generate import cell, section_notes
    from tokred.leaderboard.sections import load_sections

    (section,) = load_sections([str(_paired_results(tmp_path))])
    rows = {r.preset: r for r in section.rows}
    # the baseline is exact in a paired column; r13's paired interval excludes 0, r8's holds it
    assert rows["baseline"].estimates["top1"].interval == (80.0, 80.0)
    assert rows["r13"].estimates["top1"].interval == pytest.approx((75.0, 79.0))
    assert rows["r8"].estimates["top1"].interval == pytest.approx((77.0, 81.0))
    assert rows["r8"].marks.get("top1") == "tied" and "top1" not in rows["r13"].marks
    assert "Δ −3.00 [−5.00, −1.00]" in cell(rows["r13"], "top1")
    assert cell(rows["baseline"], "top1").startswith("80.00 [76.00, 83.60]")  # its own interval is shown
    assert any(n.startswith("Primary quality metric (Pareto front): `top1`") for n in section_notes(section))


def test_plot_is_drawn_with_curves(tmp_path):
    from tokred.leaderboard.plot import plot
    from tokred.leaderboard.sections import load_sections

    (section,) = load_sections([str(_paired_results(tmp_path))])
    out = tmp_path / "plot.png"
    assert plot(section, str(out))
    assert out.read_bytes().startswith(b"\x89PNG")


# --- the main job keeps what it did not measure -------------------------------------------------------------------


def test_bench_keeps_a_published_arch_section_it_did_not_run(fake_plugin, capsys, tmp_path):
    from tokred.bench.cli import main
    from tokred.leaderboard.generate import build, sources_of

    board = tmp_path / "board"
    (board / "results").mkdir(parents=True)
    shutil.copy(ARCH_RESULTS, board / "results" / ARCH_RESULTS.name)
    build([str(board / "results" / ARCH_RESULTS.name)], str(board / "README.md"), plots=False)
    before = (board / "README.md").read_text()
    arch_titles = [line for line in before.splitlines() if line.startswith("## ") and "arch" in line]
    assert arch_titles
    code = main(["bench", "--task", "fake_vit", "--methods", "fake_merge", "--rounds", "1", "--set", "threads=1",
                 "--out", str(tmp_path / "results"), "-o", str(board / "README.md")])
    assert code == 0, capsys.readouterr().err
    after = (board / "README.md").read_text()
    for title in arch_titles:  # the arch section survives, beside the new one
        assert title in after
    assert "## fake_vit" in after
    assert sources_of(after)["sources"] == sorted(["results/arch-cpu.json", "results/fake_vit-embedded-cpu.json"])
    assert (board / "results" / ARCH_RESULTS.name).read_bytes() == ARCH_RESULTS.read_bytes()


# --- the evaluated images' batches ------------------------------------------------------------------------------


def test_eval_batch_size_sets_the_quality_batches_not_the_timed_one():
    from tokred.bench.task import get_task

    cls = get_task("text_to_image")
    task = cls(size="embedded", num_images=5, batch_size=2, eval_batch_size=4, progress=False)
    assert task._batches(5) == [[0, 1, 2, 3], [4]] and task.batch_size == 2
    assert task.describe()["eval_batch_size"] == 4
    assert "eval_batch_size" not in cls(size="embedded", num_images=5, batch_size=2, progress=False).describe()
    assert cls(size="embedded", batch_size=3, progress=False)._batches(4) == [[0, 1, 2], [3]]
    with pytest.raises(ValueError, match="eval_batch_size must be an int >= 1 or None, got 0"):
        cls(size="embedded", eval_batch_size=0)
