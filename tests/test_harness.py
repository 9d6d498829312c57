"""The harness (tokred.bench.harness) on a tiny task defined here: every results-schema key written with the right
type, paired timing of the real workload, thread count, contention, settings, and the baseline row's rules."""

from __future__ import annotations

import json
import os

import pytest
import torch

import tokred
from tokred.bench import contention, harness
from tokred.bench.harness import HARNESS_SETTINGS, SelectionError, TaskRun, plan_cases
from tokred.bench.record import CaseRecord
from tokred.bench.results import SCHEMA_VERSION, stats_dict
from tokred.bench.task import Metric, Quality, Task, check_int
from tokred.bench.task import tasks as task_registry
from tokred.tasks.quality import proportion

SCHEMA_KEYS = {
    # schema 1
    "tokred", "task", "family", "size", "model", "device", "device_name", "dtype", "versions", "command", "metrics",
    "task_info", "method", "preset", "options", "options_repr", "quality", "speed", "latency_ms",
    "baseline_latency_ms", "throughput_per_s", "s_per_image", "items_per_call", "gflops", "peak_mem_mb",
    "baseline_quality",
    # schema 2
    "speedup", "speedup_ci", "round_ratios", "rounds", "warmup_rounds", "threads", "num_threads", "cpu_count",
    "loadavg_before", "loadavg_after", "cpu_utilisation", "contended", "contention", "baseline_gflops",
    "flops_ideal_speedup", "efficiency", "quality_ci", "quality_n", "notes",
}  # fmt: skip


class TinyVitTask(Task):
    """A tiny random timm ViT on random images; records which variant every workload call ran under."""

    summary = "test task"
    family = "timm_vit"
    metrics = (
        Metric("top1", "higher", "%"),
        Metric("agreement", "higher", "%", reference=True),
        Metric("gflops", "lower", "GFLOPs", "speed"),
    )

    def __init__(self, size="embedded", device="cpu", dtype="float32", *, num_images=24, batch_size=8,
                 progress=True):
        super().__init__(size=size, device=device, dtype=dtype)
        self.num_images = check_int("num_images", num_images, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.calls: list[tuple[bool, int]] = []

    def setup(self):
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        self.model = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                       num_classes=10).eval()
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(self.num_images, 3, 32, 32, generator=gen)
        self.labels = torch.randint(0, 10, (self.num_images,), generator=gen)

    @torch.no_grad()
    def _predict(self):
        return torch.cat([self.model(x).argmax(-1) for x in self.images.split(self.batch_size)])

    def _score(self, preds):
        out = Quality()
        out.add("top1", *proportion(preds == self.labels))
        return out

    def record_reference(self):
        self.reference = self._predict()
        return self._score(self.reference)

    def evaluate(self):
        preds = self._predict()
        out = self._score(preds)
        out.add("agreement", *proportion(preds == self.reference))
        return out

    def workload(self):
        batch = self.images[: self.batch_size]

        def run():
            self.calls.append((tokred.get_patch(self.model) is not None, torch.get_num_threads()))
            with torch.no_grad():
                return self.model(batch)

        return run

    def measure_speed(self):
        from tokred.bench.measure import flops_and_memory

        batch = self.images[: self.batch_size]
        out = flops_and_memory(lambda: self.model(batch), "cpu", len(batch), memory=False)
        return {**out, "batch_size": float(len(batch)), "peak_mem_mb": 1.0}

    def default_threads(self):
        return 1

    def describe(self):
        return {**super().describe(), "model": "tiny-vit", "batch_size": self.batch_size}


@pytest.fixture
def tiny_task(monkeypatch):
    task_registry.names()
    monkeypatch.setattr(task_registry, "_items", dict(task_registry._items))
    task_registry.register("tiny_vit_task")(TinyVitTask)
    return "tiny_vit_task"


def test_every_schema_key_with_its_type(tiny_task):
    run = TaskRun(tiny_task, rounds=3, task_kwargs={"num_images": 16})
    base, tome = (run.run_case(c) for c in plan_cases(tiny_task, "tome", "r8"))
    for result in (base, tome):
        info = result.extra_info
        assert SCHEMA_KEYS <= set(info), SCHEMA_KEYS - set(info)
        json.dumps(info, allow_nan=False)  # plain JSON
        assert info["tokred"] == SCHEMA_VERSION
        assert info["rounds"] == 3 == len(info["round_ratios"]) and info["warmup_rounds"] == 1
        assert info["threads"] == info["num_threads"] == 1
        assert info["cpu_count"] == len(os.sched_getaffinity(0))
        assert len(info["loadavg_before"]) == 3 and len(info["loadavg_after"]) == 3
        assert isinstance(info["contended"], bool) and isinstance(info["contention"], list)
        assert info["cpu_utilisation"] > 0
        assert isinstance(info["notes"], list)
        assert info["quality_n"]["top1"] == 16 and 0 <= info["quality_ci"]["top1"][0] <= info["quality"]["top1"]
        assert result.benchmark_entry()["stats"]["rounds"] == 3
    b, t = base.extra_info, tome.extra_info
    # the baseline row: speedup 1 by definition, no fidelity to itself
    assert b["speedup"] == 1.0 and b["speedup_ci"] == [1.0, 1.0] and b["round_ratios"] == [1.0] * 3
    assert b["flops_ideal_speedup"] == 1.0 and b["efficiency"] == 1.0
    assert "agreement" not in b["quality"] and "agreement" not in b["quality_ci"] and "agreement" not in b["quality_n"]
    assert "tokens" not in b
    # the method row: the median of its per-round ratios, inside its interval; FLOPs-ideal and efficiency
    ratios = sorted(t["round_ratios"])
    assert t["speedup"] == pytest.approx(ratios[1])
    assert t["speedup_ci"][0] <= t["speedup"] <= t["speedup_ci"][1]
    assert t["baseline_gflops"] == pytest.approx(b["gflops"]) and t["gflops"] < b["gflops"]
    assert t["flops_ideal_speedup"] == pytest.approx(b["gflops"] / t["gflops"])
    assert t["efficiency"] == pytest.approx(t["speedup"] / t["flops_ideal_speedup"])
    assert 0 <= t["quality"]["agreement"] <= 100 and t["quality_n"]["agreement"] == 16
    lo, hi = t["quality_ci"]["agreement"]
    assert lo <= t["quality"]["agreement"] <= hi
    # the stats block is that of the method's timed calls
    assert t["latency_ms"] == pytest.approx(stats_dict(tome.times)["median"] * 1000)
    if hasattr(tokred.Patch, "token_counts"):  # the core's accessor (guarded until it lands)
        assert t["tokens"] and all({"tokens", "attn", "kv", "mlp"} <= set(v) for v in t["tokens"].values())


def test_timing_is_paired_alternating_at_the_tasks_threads(tiny_task):
    run = TaskRun(tiny_task, rounds=4, warmup_rounds=1)
    run.setup()
    task = run.task
    before = torch.get_num_threads()
    task.calls.clear()
    run.run_case(plan_cases(tiny_task, "tome", "r8")[1])
    # only the timing loop calls the workload (evaluate and measure_speed call the model directly): the warm-up
    # round (baseline, method), then rounds (b, m), (m, b), (b, m), (m, b)
    assert [patched for patched, _ in task.calls] == [False, True] + [False, True, True, False] * 2
    assert {n for _, n in task.calls} == {1}  # the task's default_threads
    assert torch.get_num_threads() == before  # restored after the case
    assert tokred.get_patch(task.model) is None


def test_contended_case_with_stubbed_load(tiny_task, monkeypatch):
    """Where /proc/stat cannot be read, the load average decides (the fallback)."""
    monkeypatch.setattr(os, "getloadavg", lambda: (17.0, 12.0, 9.0))
    monkeypatch.setattr(contention, "read_cpu", lambda: None)
    run = TaskRun(tiny_task, rounds=2)
    info = run.run_case(plan_cases(tiny_task)[0]).extra_info
    assert info["contended"] is True
    assert info["contention"][0] == f"load average 17.00 > {len(os.sched_getaffinity(0))} cores"
    assert info["loadavg_before"] == [17.0, 12.0, 9.0] and "others_cpu" not in info


def test_contended_case_with_injected_proc_stat(tiny_task, monkeypatch):
    """Other processes took 3 cores' worth of CPU over the rounds: contended, whatever the load average; the raw
    figures are recorded."""
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    clock = iter(range(1000))

    def busy() -> contention.CpuReading:
        t = float(next(clock))
        return contention.CpuReading(busy_s=3.0 * t, own_s=0.0, procs_running=4, wall_s=t)

    monkeypatch.setattr(contention, "read_cpu", busy)
    run = TaskRun(tiny_task, rounds=2)
    info = run.run_case(plan_cases(tiny_task)[0]).extra_info
    assert info["contended"] is True and info["contention"][0].startswith("other processes used 3.00 cores (> ")
    others = info["others_cpu"]
    assert others["source"] == "/proc/stat" and others["others_cores"] == pytest.approx(3.0)
    assert others["procs_running_max"] == 4 and others["limit_cores"] >= contention.OTHERS_TOLERANCE
    CaseRecord.from_extra_info(info)  # the schema checks it


def test_adaptive_rounds_within_the_budget(tiny_task):
    run = TaskRun(tiny_task, task_kwargs={"budget_s": 0.5, "max_rounds": 30})
    info = run.run_case(plan_cases(tiny_task)[0]).extra_info
    assert 5 <= info["rounds"] <= 30


def test_harness_settings_from_set_and_their_errors(tiny_task):
    run = TaskRun(tiny_task, task_kwargs={"threads": 2, "budget_s": 3.0, "min_rounds": 6, "num_images": 8})
    run.build()
    assert run.threads == 2 and run.timing.budget_s == 3.0 and run.timing.min_rounds == 6
    assert run.task_kwargs == {"num_images": 8, "progress": False}  # harness settings are not task arguments
    assert "--set threads=2" in run.command
    for bad, message in [
        ({"threads": 0}, "threads must be an int >= 1"),
        ({"min_rounds": 0}, "min_rounds must be an int >= 1"),
        ({"budget_s": -1}, "budget_s must be > 0 seconds"),
        ({"warmup_rounds": -1}, "warmup_rounds must be an int >= 0"),
    ]:
        with pytest.raises(SelectionError, match=message):
            TaskRun(tiny_task, task_kwargs=bad)
    with pytest.raises(SelectionError, match="rounds must be an int >= 1"):
        TaskRun(tiny_task, rounds=0)
    with pytest.raises(SelectionError, match="harness settings: " + ", ".join(HARNESS_SETTINGS)):
        TaskRun(tiny_task, task_kwargs={"num_imgs": 3}).build()


def test_main_job_profile_sizes():
    """The main job's settings: enough images that the quality intervals are not a 20-image ranking, and the
    minimum of five paired rounds."""
    t2i = harness.profile_settings("text_to_image", "embedded", "default")
    assert t2i["task"]["num_images"] >= 50 and t2i["min_rounds"] >= 5 and t2i["warmup_rounds"] >= 1
    vit = harness.profile_settings("vit_classification", "embedded", "default")
    assert "num_images" not in vit["task"]  # the whole test split
    from tokred.bench.task import get_task, list_tasks

    for task in list_tasks():
        for size in get_task(task).sizes():
            for profile in harness.PROFILE_NAMES:
                assert set(get_task(task).profile(size, profile)) - {"task"} <= set(HARNESS_SETTINGS)
