"""Process replication (tokred.bench.workers, stats.process_speedup) and the timing floor (min_time_s): the pooled
interval on synthetic per-process ratios, the floor with a stub clock, the passes over a scripted pool, the
results record's fields and their migration, option checks, and one real spawn of timing workers on the embedded
ViT."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tokred.bench import stats
from tokred.bench.contention import Monitor
from tokred.bench.harness import SelectionError, TaskRun
from tokred.bench.record import CaseRecord, ResultsError, migrate
from tokred.bench.runner import summary_line
from tokred.bench.timing import Timings, TimingSettings, time_paired
from tokred.bench.workers import WorkerError, WorkerPool, fixed_shares, next_pass, time_replicated

pytest_plugins = ["pytester"]

BOARD = Path(__file__).parent / "fixtures" / "leaderboard" / "results"


# --- the pooled interval -------------------------------------------------------------------------------------------


def synthetic(rng, true=1.6, between=0.05, within=0.01, processes=3, rounds=10):
    """Per-process ratios: each process shifted by its own log-normal factor (sd ``between``), each round by a
    smaller one (sd ``within``)."""
    return [list(true * math.exp(rng.normal(0, between)) * np.exp(rng.normal(0, within, rounds)))
            for _ in range(processes)]


def test_process_interval_covers_the_between_process_spread():
    """Processes disagree by ~5% while each one's rounds agree to ~1%: the per-process interval covers the true
    speedup (the mean over processes) about 95% of the time; the interval of the pooled rounds, as if one
    process, does not."""
    rng = np.random.default_rng(1)
    trials, covered, covered_pooled = 200, 0, 0
    for _ in range(trials):
        groups = synthetic(rng)
        est = stats.process_speedup(groups, resamples=400)
        covered += est.ci[0] <= 1.6 <= est.ci[1]
        pooled = stats.speedup([r for g in groups for r in g], resamples=400)
        covered_pooled += pooled.ci[0] <= 1.6 <= pooled.ci[1]
        assert est.ci[0] <= est.value <= est.ci[1] and len(est.process_medians) == 3
    assert covered / trials >= 0.9, covered / trials
    assert covered_pooled / trials <= 0.6, covered_pooled / trials


def test_process_interval_is_never_narrower_than_the_rounds_allow():
    """Three processes that agree by chance: the interval is still at least the pooled rounds' bootstrap."""
    groups = [[1.5, 1.7, 1.6, 1.55], [1.6, 1.52, 1.68, 1.61], [1.58, 1.62, 1.6, 1.57]]
    est = stats.process_speedup(groups)
    boot = stats.median_ci([r for g in groups for r in g])
    assert est.ci[0] <= boot[0] and est.ci[1] >= boot[1]
    medians = [float(np.median(g)) for g in groups]
    assert est.process_medians == tuple(medians)
    assert est.value == pytest.approx(math.exp(np.mean(np.log(medians))))


def test_one_process_reproduces_the_single_process_speedup():
    ratios = [1.31, 1.28, 1.35, 1.3, 1.29, 1.33]
    one = stats.process_speedup([ratios])
    old = stats.speedup(ratios)
    assert (one.value, one.ci, one.ratios, one.process_medians) == (old.value, old.ci, old.ratios, ())
    # empty processes are left out
    assert stats.process_speedup([[], ratios]).ci == old.ci
    with pytest.raises(ValueError, match="no timed rounds"):
        stats.process_speedup([[], []])


def test_t_quantile_known_values():
    assert stats._t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert stats._t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)


# --- the timing floor ----------------------------------------------------------------------------------------------


class StubCalls:
    """A stub clock: every method call takes ``method_s``, every baseline call ``baseline_s`` (scripted, no
    sleeping); the budget's clock advances by both."""

    def __init__(self, method_s=0.1, baseline_s=0.2):
        self.method_s, self.baseline_s = method_s, baseline_s
        self.now = 0.0
        self.variant = "method"

    def clock(self):
        return self.now

    def use_baseline(self):
        self.variant = "baseline"

    def use_method(self):
        self.variant = "method"

    def call_timer(self, fn):
        t = self.baseline_s if self.variant == "baseline" else self.method_s
        self.now += t
        return t


def run_stub(stub, **settings):
    return time_paired(lambda: None, TimingSettings(**settings), Monitor(threads=1), baseline=lambda: None,
                       use_baseline=stub.use_baseline, use_method=stub.use_method, clock=stub.clock,
                       call_timer=stub.call_timer)


def test_timing_floor_with_a_stub_clock():
    """Constant ratios converge at the minimum of 5 rounds, unless the floor asks for more seconds of method calls:
    2 s of 0.1 s calls is 20 rounds, even past max_rounds and the budget."""
    assert run_stub(StubCalls()).rounds == 5
    timed = run_stub(StubCalls(), min_time_s=2.0, max_rounds=8, budget_s=0.5)
    assert timed.rounds == 20 and timed.method_time_s == pytest.approx(2.0)
    assert timed.speedup().value == pytest.approx(2.0) and timed.stop == stats.CONVERGED
    # a floor already reached by the minimum rounds changes nothing
    assert run_stub(StubCalls(method_s=1.0), min_time_s=2.0).rounds == 5
    # fixed rounds (--rounds) are fixed: no floor
    assert run_stub(StubCalls(), min_time_s=2.0, rounds=3).rounds == 3


def test_timing_floor_in_the_stop_rule_and_its_checks():
    rule = stats.StopRule(min_rounds=2, min_time_s=10.0)
    tight = [1.5, 1.5, 1.5]
    assert stats.stop_reason(tight, 1.0, rule, method_time_s=9.9) is None
    assert stats.stop_reason(tight, 1.0, rule, method_time_s=10.0) == stats.CONVERGED
    assert stats.stop_reason(tight, 1.0, rule) == stats.CONVERGED  # not counted: no floor
    for bad in (-1.0, float("nan"), "10", True):
        with pytest.raises(ValueError, match="min_time_s must be a finite number of seconds >= 0"):
            TimingSettings(min_time_s=bad)


# --- passes over a scripted pool -----------------------------------------------------------------------------------


class ScriptedPool:
    """A pool whose worker ``i`` times the method at ``method_s[i]`` and the baseline at 2x that (plus a little
    per-round noise), with no processes; it records what it was asked."""

    def __init__(self, method_s):
        self.method_s = list(method_s)
        self.size = len(method_s)
        self.asked: list[tuple[int, int, int]] = []
        self.rng = np.random.default_rng(0)

    def time(self, i, case, settings):
        k = settings.rounds
        self.asked.append((i, k, settings.warmup_rounds))
        m = [self.method_s[i] * (1 + 0.001 * self.rng.standard_normal()) for _ in range(k)]
        b = [2.0 * self.method_s[0] * (1 + 0.001 * self.rng.standard_normal()) for _ in range(k)]
        return {"method_times": m, "baseline_times": b, "tokens": {"0": {"tokens": 5.0}}, "load_samples": [0.5],
                "cpu_seconds": sum(m), "wall_seconds": sum(m), "loadavg_before": [0.5, 0.5, 0.5],
                "loadavg_after": [0.6, 0.5, 0.5], "threads": 1}


class Case:
    id = "t-tome-r8"


def test_replicated_rounds_reach_the_floor_summed_over_processes():
    pool = ScriptedPool([0.05, 0.055, 0.0525])  # the processes disagree by 10%
    settings = TimingSettings(min_rounds=5, min_time_s=3.0, budget_s=1000.0, max_rounds=500)
    timings, tokens = time_replicated(pool, Case(), settings, threads=1, check_cpu=True, paired=True)
    assert timings.method_time_s >= 3.0 and timings.processes == 3
    assert len(timings.process_rounds) == 3 and sum(timings.process_rounds) == timings.rounds
    assert pool.asked[:3] == [(0, 2, 1), (1, 2, 1), (2, 2, 1)]  # first pass: max(2, ceil(5 / 3)) each, warmed up
    est = timings.speedup()
    assert est.ci[0] <= min(est.process_medians) <= max(est.process_medians) <= est.ci[1]
    assert tokens == {"0": {"tokens": 5.0}} and timings.monitor.wall_seconds == pytest.approx(timings.method_time_s)
    assert timings.monitor.loadavg_before == (0.5, 0.5, 0.5) and timings.monitor.loadavg_after == (0.6, 0.5, 0.5)


def test_replicated_fixed_rounds_are_shared_out():
    pool = ScriptedPool([0.05, 0.05, 0.05])
    timings, _ = time_replicated(pool, Case(), TimingSettings(rounds=7), threads=1, check_cpu=True, paired=True)
    assert timings.process_rounds == [3, 2, 2] and timings.stop == "fixed"
    timings, _ = time_replicated(pool, Case(), TimingSettings(rounds=1), threads=1, check_cpu=True, paired=True)
    assert timings.process_rounds == [] and timings.rounds == 1  # one process timed: a single-process result
    assert fixed_shares(7, 3) == [3, 2, 2] and fixed_shares(2, 3) == [1, 1]


def test_next_pass_sizes():
    s = TimingSettings(min_time_s=10.0, max_rounds=50, budget_s=100.0)
    assert next_pass(s, 3, 6, 0.6, 1.0) == 32  # 9.4 s of 0.1 s calls left: 94 rounds over 3 processes
    s = TimingSettings(max_rounds=50, budget_s=100.0)
    assert next_pass(s, 3, 12, 1.2, 2.0) == 2  # half as many again
    assert next_pass(s, 3, 48, 4.8, 8.0) == 1  # 2 rounds left of max_rounds
    assert next_pass(TimingSettings(budget_s=10.0), 2, 10, 5.0, 9.0) == 1  # the budget nearly spent


# --- the results record ---------------------------------------------------------------------------------------------


def a_row() -> dict:
    doc = json.loads((BOARD / "embedded-cpu.json").read_text())
    return copy.deepcopy(doc["benchmarks"][1]["extra_info"])


def test_record_fields_and_migration():
    old = a_row()
    assert old["tokred"] < 5 and "processes" not in old
    assert migrate(old)["processes"] == 1 and CaseRecord.from_extra_info(old).processes == 1
    new = dict(old, tokred=5, unit="batch", workload="embedded", architecture=None, resolution=None, processes=3,
               rounds=6, round_ratios=[1.2] * 6, process_speedups=[1.2, 1.25, 1.18], process_rounds=[2, 2, 2],
               process_latency_ms=[50.0, 51.0, 49.0], method_time_s=0.3, min_time_s=6.0)
    record = CaseRecord.from_extra_info(new)
    assert record.process_speedups == [1.2, 1.25, 1.18] and record.to_extra_info()["process_rounds"] == [2, 2, 2]
    with pytest.raises(ResultsError, match="'extra_info.processes': missing"):
        CaseRecord.from_extra_info({k: v for k, v in new.items() if k != "processes"})
    with pytest.raises(ResultsError, match="process_speedups': 2 values for 3 processes"):
        CaseRecord.from_extra_info(dict(new, process_speedups=[1.2, 1.3]))
    with pytest.raises(ResultsError, match="add up to 5, not rounds 6"):
        CaseRecord.from_extra_info(dict(new, process_rounds=[2, 2, 1]))
    with pytest.raises(ResultsError, match="processes': must be >= 1"):
        CaseRecord.from_extra_info(dict(new, processes=0))


# --- options --------------------------------------------------------------------------------------------------------


def test_processes_setting_checks(capsys, monkeypatch):
    from tokred.bench.cli import main

    monkeypatch.delenv("TOKRED_PROCESSES")
    with pytest.raises(SelectionError, match="processes must be an int >= 1"):
        TaskRun("vit_classification", processes=0)
    with pytest.raises(SelectionError, match="processes must be an int >= 1"):
        TaskRun("vit_classification", task_kwargs={"processes": 1.5})
    assert TaskRun("vit_classification", size="arch").processes == 3  # the profile's
    assert TaskRun("vit_classification", size="arch", profile="quick").processes == 1
    monkeypatch.setenv("TOKRED_PROCESSES", "2")  # over the profile's, under what the run is given
    assert TaskRun("vit_classification", size="arch").processes == 2
    assert TaskRun("vit_classification", size="arch", task_kwargs={"processes": 4}).processes == 4
    monkeypatch.setenv("TOKRED_PROCESSES", "many")
    with pytest.raises(SelectionError, match="TOKRED_PROCESSES='many': expected a process count"):
        TaskRun("vit_classification")
    monkeypatch.setenv("TOKRED_PROCESSES", "0")
    with pytest.raises(SelectionError, match="processes must be an int >= 1"):
        TaskRun("vit_classification")
    monkeypatch.delenv("TOKRED_PROCESSES")
    assert main(["run", "--task", "vit_classification", "--processes", "0", "--out", "/nonexistent/x.json"]) == 2
    err = capsys.readouterr().err
    assert "--processes must be an int >= 1" in err and "Traceback" not in err
    assert main(["run", "--task", "vit_classification", "--processes", "2", "--set", "processes=3",
                 "--out", "/nonexistent/x.json"]) == 2
    assert "--processes 2 and --set processes=3 disagree" in capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (("--tokred-processes=0",), "--tokred-processes must be an int >= 1"),
    (("--tokred-processes=2", "--tokred-set=processes=3"), "--tokred-processes=2 and --tokred-set processes=3"),
])
def test_plugin_processes_option_is_checked(bench_dir, args, expected):
    result = bench_dir.runpytest_inprocess("--benchmark-only", "--tokred-task=fake_vit", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert expected in "\n".join(result.errlines + result.outlines)


# --- real workers ---------------------------------------------------------------------------------------------------


def test_workers_spawn_and_time_the_embedded_vit():
    """Two spawned workers each build the embedded ViT and time their share of the rounds; quality and FLOPs come
    from the parent; the record carries the per-process medians."""
    from tokred.bench.harness import Case as HarnessCase

    run = TaskRun("vit_classification", task_kwargs={"num_images": 32, "threads": 1}, rounds=4, processes=2,
                  min_time_s=0.0)
    try:
        run.setup()
        info = run.run_case(HarnessCase("vit_classification", "tome", "r8", {"r": 8}))
        base = run.run_case(HarnessCase("vit_classification", "baseline", "baseline"))
        pids = list(run.pool().pids)
    finally:
        run.release()
    extra = info.extra_info
    assert extra["processes"] == 2 and extra["process_rounds"] == [2, 2] and extra["rounds"] == 4
    assert len(extra["process_speedups"]) == 2 and all(s > 0 for s in extra["process_speedups"])
    assert extra["speedup_ci"][0] <= extra["speedup"] <= extra["speedup_ci"][1]
    assert extra["gflops"] < extra["baseline_gflops"] and "agreement" in extra["quality"]
    assert extra["tokens"] and extra["min_time_s"] == 0.0
    assert base.extra_info["processes"] == 2 and base.extra_info["speedup"] == 1.0
    assert "process_speedups" not in base.extra_info and len(base.extra_info["process_latency_ms"]) == 2
    assert "(2 processes)" in summary_line(extra)
    assert len(set(pids)) == 2 and run._pool is None
    CaseRecord.from_extra_info(extra)  # a valid record


def test_worker_that_fails_to_set_up_is_reported():
    pool = WorkerPool({"task": "vit_classification", "size": "embedded", "task_kwargs": {"num_images": -1},
                       "command": "-", "processes": 1}, 1)
    with pytest.raises(WorkerError, match=r"timing worker 1/1 failed to set up: SelectionError: .*num_images"):
        pool.wait_ready()
    assert not pool.started


def test_timings_split():
    t = Timings([1.0, 2.0, 3.0], [2.0, 2.0, 6.0], 1, "fixed", 1.0, Monitor(threads=1), process_rounds=[1, 2])
    assert t.split([1, 2, 3]) == [[1], [2, 3]] and t.per_process_values() == [[2.0], [1.0, 2.0]]
    assert t.processes == 2 and t.method_time_s == 6.0
