"""The tokred pytest plugin, run through ``pytester`` on a tiny task.

The task (``fake_vit``, a tiny random timm ViT) and a method (``fake_merge``) come from an out-of-tree plugin
(``fixtures/fake_plugin``) found only through its entry points: the benchmarks are parametrized over them without
any edit to the benchmark file.
"""

from __future__ import annotations

import json

import pytest

from tokred.bench.results import load_results

pytest_plugins = ["pytester"]



def test_parametrized_over_registry_and_presets(bench_dir):
    result = bench_dir.runpytest_inprocess("--collect-only", "-q", "--tokred-task=fake_vit")
    ids = [line.split("[", 1)[1].rstrip("]") for line in result.outlines if line.startswith("test_methods.py::")]
    assert ids[0] == "fake_vit-baseline"
    # the out-of-tree method and the built-in ones with each of their timm_vit presets; nothing for other families
    assert {"fake_vit-fake_merge-k2", "fake_vit-fake_merge-k8", "fake_vit-tome-r8", "fake_vit-tome-r13",
            "fake_vit-tome-r16-decreasing", "fake_vit-ca_tome-threshold0.9", "fake_vit-evit-keep0.7",
            "fake_vit-tofu-r13", "fake_vit-pitome-r13", "fake_vit-mctf-r16",
            "fake_vit-zero_tprune-r12"} <= set(ids)
    assert not [i for i in ids if "cat_pruning" in i]


def test_a_composition_is_collected_by_its_name(bench_dir):
    """--tokred-methods takes a composition by name, in any order of its members (issue 17)."""
    result = bench_dir.runpytest_inprocess("--collect-only", "-q", "--tokred-task=text_to_image",
                                           "--tokred-methods=tome+deepcache,todo")
    ids = [line.split("[", 1)[1].rstrip("]") for line in result.outlines if line.startswith("test_methods.py::")]
    assert "text_to_image-deepcache+tome-interval3+ratio0.5" in ids and "text_to_image-todo-factor2" in ids
    assert not [i for i in ids if "tome+deepcache" in i]


def test_benchmark_json_and_extra_info(bench_dir):
    result = bench_dir.runpytest_inprocess(
        "--benchmark-only", "--benchmark-json=out.json", "--tokred-task=fake_vit", "--tokred-methods=fake_merge",
        "--tokred-rounds=2", "--tokred-set=threads=1",
    )  # fmt: skip
    result.assert_outcomes(passed=3)
    data = load_results(bench_dir.path / "out.json")  # validates the tokred fields too
    assert set(data) >= {"machine_info", "commit_info", "benchmarks", "datetime", "version"}
    by_id = {b["param"]: b for b in data["benchmarks"]}
    assert set(by_id) == {"fake_vit-baseline", "fake_vit-fake_merge-k2", "fake_vit-fake_merge-k8"}
    base, k8 = by_id["fake_vit-baseline"], by_id["fake_vit-fake_merge-k8"]
    assert k8["stats"]["rounds"] == 2 and k8["group"] == "fake_vit"
    info = k8["extra_info"]
    assert info["task"] == "fake_vit" and info["method"] == "fake_merge" and info["preset"] == "k8"
    assert info["options"] == {"k": 8}
    assert info["model"] == "tiny-random-vit" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert set(info["versions"]) >= {"torch", "diffusers", "timm", "tokred"} and info["versions"]["torch"]
    assert set(info["quality"]) >= {"top1", "agreement"} and 0 <= info["quality"]["agreement"] <= 100
    # merging 8 pairs in each of the 2 blocks of 65 tokens removes FLOPs
    assert info["gflops"] < base["extra_info"]["gflops"]
    assert info["flops_ideal_speedup"] == pytest.approx(base["extra_info"]["gflops"] / info["gflops"])
    assert info["peak_mem_mb"] is not None
    # the baseline does not report agreement with itself
    assert "agreement" not in base["extra_info"]["quality"] and "top1" in base["extra_info"]["quality"]
    # the same paired statistics as `tokred run`: the median of the per-round ratios, with its interval
    assert base["extra_info"]["speedup"] == 1.0 and base["extra_info"]["speedup_ci"] == [1.0, 1.0]
    assert len(info["round_ratios"]) == info["rounds"] == 2 and info["warmup_rounds"] == 1
    assert info["speedup"] == pytest.approx(sum(info["round_ratios"]) / 2)
    assert info["speedup_ci"][0] <= info["speedup"] <= info["speedup_ci"][1]
    assert info["threads"] == 1 and isinstance(info["contended"], bool) and len(info["loadavg_before"]) == 3
    # pytest-benchmark's statistics are the method's timed calls (warm-up excluded)
    assert info["latency_ms"] == pytest.approx(k8["stats"]["median"] * 1000, rel=1e-9)
    assert len(k8["stats"]["data"]) == 2


def test_adaptive_rounds_in_the_plugin(bench_dir):
    result = bench_dir.runpytest_inprocess(
        "--benchmark-only", "--benchmark-json=out.json", "--tokred-task=fake_vit", "--tokred-methods=fake_merge",
        "--tokred-presets=k8", "--tokred-set=threads=1", "--tokred-set=budget_s=0.5", "--tokred-set=max_rounds=12",
    )  # fmt: skip
    result.assert_outcomes(passed=2)
    for bench in load_results(bench_dir.path / "out.json")["benchmarks"]:
        rounds = bench["extra_info"]["rounds"]
        assert 5 <= rounds <= 12 and bench["stats"]["rounds"] == rounds


def test_benchmark_skip(bench_dir):
    result = bench_dir.runpytest_inprocess("--benchmark-skip", "--tokred-task=fake_vit")
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped", 0) >= 3 and not outcomes.get("passed") and not outcomes.get("failed")


def test_autosave_then_compare(bench_dir):
    args = ("--benchmark-only", "--tokred-task=fake_vit", "--tokred-methods=fake_merge", "--tokred-presets=k2",
            "--tokred-rounds=1", "--benchmark-storage=file://bench-store")
    bench_dir.runpytest_inprocess(*args, "--benchmark-autosave").assert_outcomes(passed=2)
    saved = list((bench_dir.path / "bench-store").rglob("*.json"))
    assert len(saved) == 1
    assert json.loads(saved[0].read_text())["benchmarks"][1]["extra_info"]["preset"] == "k2"
    result = bench_dir.runpytest_inprocess(*args, "--benchmark-compare")
    result.assert_outcomes(passed=2)
    assert any("Comparing against benchmarks from" in line for line in result.outlines + result.errlines)


@pytest.mark.parametrize(
    "option, expected",
    [
        ("--tokred-methods=nope", ["unknown method 'nope'", "fake_merge", "tome"]),
        ("--tokred-task=nope", ["unknown task 'nope'", "fake_vit", "vit_classification"]),
        ("--tokred-presets=r99", ["unknown preset 'r99'", "k2", "r8"]),
    ],
)
def test_bad_selection_is_a_usage_error(bench_dir, option, expected):
    result = bench_dir.runpytest_inprocess("--benchmark-only", option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = "\n".join(result.errlines + result.outlines)
    for fragment in expected:
        assert fragment in text


def test_sweeps_are_parametrized_per_architecture_and_resolution(bench_dir):
    """--tokred-set architecture=sd15,sd3 --tokred-set resolution=(256, 512): one run per combination, each with its
    own model family's methods, the combination in the test id."""
    result = bench_dir.runpytest_inprocess(
        "--collect-only", "-q", "--tokred-task=text_to_image", "--tokred-size=arch", "--tokred-presets=default",
        "--tokred-set=architecture=sd15,sd3", "--tokred-set=resolution=(256, 512)",
    )  # fmt: skip
    ids = [line.split("[", 1)[1].rstrip("]") for line in result.outlines if line.startswith("test_methods.py::")]
    variants = sorted({"-".join(i.split("-")[:2]) for i in ids})
    assert variants == ["text_to_image@sd15-256", "text_to_image@sd15-512", "text_to_image@sd3-256",
                        "text_to_image@sd3-512"]
    assert "text_to_image@sd3-512-cat_pruning-default" in ids and "text_to_image@sd15-256-baseline" in ids


def test_unknown_size_is_a_usage_error(bench_dir):
    result = bench_dir.runpytest_inprocess("--collect-only", "--tokred-task=text_to_image", "--tokred-size=huge")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert any("unknown size 'huge'" in line and "embedded, arch, full" in line for line in result.errlines)
