"""Contention (tokred.bench.contention): the contended decision on the other processes' CPU (injected /proc/stat
readings), its load-average fallback, the monitor around timed calls, torch's thread count per case, and the
CLI's start-up warning."""

from __future__ import annotations

import io
import itertools
import os
import time

import pytest
import torch

from tokred.bench import contention
from tokred.bench.contention import (
    CpuReading,
    Monitor,
    OthersCpu,
    assess,
    loaded_warning,
    parse_proc_stat,
    read_cpu,
    torch_threads,
    warn_if_loaded,
)


def test_quiet_machine_is_not_contended():
    verdict = assess([0.3, 0.9, 1.1], cpu_seconds=9.8, wall_seconds=10.0, threads=1, cores=2)
    assert not verdict.contended and verdict.reasons == ()
    assert verdict.cpu_utilisation == pytest.approx(0.98)


def test_load_above_the_cores_is_contended_where_others_cpu_is_not_measured():
    verdict = assess([1.2, 2.6], cpu_seconds=9.9, wall_seconds=10.0, threads=1, cores=2)
    assert verdict.contended and verdict.reasons == ("load average 2.60 > 2 cores",)
    assert not assess([2.0], 9.9, 10.0, 1, 2).contended  # equal is not more
    assert not assess([2.12], 19.8, 10.0, 2, 2).contended  # kernel threads beside a case on every core
    assert assess([2.3], 19.8, 10.0, 2, 2).contended  # beyond the tolerance


def test_cpu_time_short_of_the_threads_is_contended():
    # two threads that got 1.2 CPU seconds per wall second: 60% of what they would use on their own cores
    verdict = assess([1.0], cpu_seconds=12.0, wall_seconds=10.0, threads=2, cores=2)
    assert verdict.contended and verdict.cpu_utilisation == pytest.approx(0.6)
    assert "CPU time 60% of 2 threads per wall second" in verdict.reasons[0]
    # on a GPU the process waits for the device: its CPU time is recorded but not judged
    gpu = assess([1.0], cpu_seconds=2.0, wall_seconds=10.0, threads=2, cores=2, check_cpu=False)
    assert not gpu.contended and gpu.cpu_utilisation == pytest.approx(0.1)
    both = assess([3.5], cpu_seconds=4.0, wall_seconds=10.0, threads=1, cores=2)
    assert len(both.reasons) == 2


def test_no_samples_no_cpu_time():
    verdict = assess([], cpu_seconds=None, wall_seconds=0.0, threads=1, cores=2)
    assert not verdict.contended and verdict.cpu_utilisation is None



def two_timed_calls(monitor: Monitor) -> dict:
    """Run ``monitor`` over two (empty) timed calls, sampling after each, as the harness does; its info."""
    monitor.start()
    for _ in range(2):
        with monitor.call():
            pass
        monitor.sample()
    monitor.stop()
    return monitor.info()


def test_monitor_with_stubbed_loadavg_and_clocks(monkeypatch):
    loads = iter([(0.5, 0.4, 0.3), (1.5, 0.9, 0.5), (2.7, 1.2, 0.6), (2.9, 1.3, 0.7)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
    cpu = itertools.count(0.0, 0.5)  # half a CPU second per reading ...
    wall = itertools.count(0.0, 1.0)  # ... per wall second: a single thread that got half a core
    monkeypatch.setattr(time, "process_time", lambda: next(cpu))
    monkeypatch.setattr(time, "perf_counter", lambda: next(wall))
    monitor = Monitor(threads=1, cores=2, read=lambda: None)  # no /proc/stat: the load average decides
    info = two_timed_calls(monitor)
    assert info["loadavg_before"] == [0.5, 0.4, 0.3] and info["loadavg_after"] == [2.9, 1.3, 0.7]
    assert info["cpu_count"] == 2 and info["cpu_utilisation"] == pytest.approx(0.5)
    assert info["contended"] is True
    assert info["contention"][0] == "load average 2.90 > 2 cores"
    assert "CPU time 50% of 1 thread" in info["contention"][1]
    assert info["others_cpu"] is None


# --- the other processes' CPU (/proc/stat) -------------------------------------------------------------------------

STAT = """cpu  {user} 20 {system} 900000 500 7 3 {steal} 40 0
cpu0 100 10 50 450000 250 3 1 0 20 0
cpu1 200 10 60 450000 250 4 2 0 20 0
intr 123 4 5
ctxt 99999
procs_running {running}
procs_blocked 0
"""


def stat(user: int, system: int, steal: int = 0, running: int = 1) -> str:
    return STAT.format(user=user, system=system, steal=steal, running=running)


def test_proc_stat_is_parsed_into_busy_seconds_and_runnable_tasks():
    # user + nice + system + irq + softirq + steal, not idle or iowait (guest is already inside user)
    busy, running = parse_proc_stat(stat(1000, 300, steal=10, running=3), ticks=100)
    assert busy == pytest.approx((1000 + 20 + 300 + 7 + 3 + 10) / 100) and running == 3
    # a process confined to some cores counts only theirs (others elsewhere on the machine do not contend)
    assert parse_proc_stat(stat(1000, 300), ticks=100, cpus={1}) == (pytest.approx((200 + 10 + 60 + 4 + 2) / 100), 1)
    assert parse_proc_stat(stat(1000, 300), ticks=100, cpus={0, 1})[0] == pytest.approx((164 + 276) / 100)
    assert parse_proc_stat(stat(1000, 300), ticks=100, cpus={5})[0] == pytest.approx(13.3)  # no line: the machine
    assert parse_proc_stat("cpu0 1 2 3 4 5 6 7 8\n", ticks=100) is None  # no aggregate line
    assert parse_proc_stat("cpu 1 2 x 4 5 6 7 8\n", ticks=100) is None
    assert parse_proc_stat("cpu 1 2 3 4 5 6 7 8\n", ticks=100) == (pytest.approx((1 + 2 + 3 + 6 + 7 + 8) / 100), None)


def test_read_cpu_from_a_file_and_its_fallback(tmp_path):
    path = tmp_path / "stat"
    path.write_text(stat(500, 100, running=2))
    reading = read_cpu(str(path), ticks=100, cpus=None)  # this process's cores: cpu0 and cpu1 are read if allowed
    assert reading.procs_running == 2 and reading.own_s >= 0
    assert read_cpu(str(path), ticks=100, cpus=[0, 1]).busy_s == pytest.approx(4.4)
    assert read_cpu(str(tmp_path / "missing")) is None  # not Linux: no reading, no error
    path.write_text("nothing here\n")
    assert read_cpu(str(path)) is None


def reading(busy: float, own: float, wall: float, running: int | None = None) -> CpuReading:
    return CpuReading(busy_s=busy, own_s=own, procs_running=running, wall_s=wall)


def test_others_cpu_between_two_readings():
    others = OthersCpu.between(reading(100.0, 5.0, 10.0, 2), reading(104.2, 7.0, 12.0, 3), cores=2, ticks=100,
                               running=[4, 1])
    assert others.busy_s == pytest.approx(4.2) and others.own_s == pytest.approx(2.0)
    assert others.others_s == pytest.approx(2.2) and others.others_cores == pytest.approx(1.1)
    assert others.window_s == pytest.approx(2.0) and others.resolution_s == pytest.approx(0.04)
    assert others.procs_running_max == 4
    pooled = others + OthersCpu(1.0, 1.0, 1.0, 0.04, None)
    assert pooled.others_s == pytest.approx(2.2) and pooled.window_s == pytest.approx(3.0)
    assert pooled.resolution_s == pytest.approx(0.08) and pooled.procs_running_max == 4
    assert OthersCpu.from_json(pooled.to_json()) == pooled
    # the two counts tick differently: a machine that seems to have run less than this process ran nobody else
    assert OthersCpu(1.0, 1.02, 1.0, 0.02).others_s == 0.0


def test_a_quiet_machine_under_a_high_load_average_is_not_contended():
    """The false positive of the load-average rule: a 2-thread case on 2 cores (its worker processes having just
    built their models) reads a load average of 2.5, while nobody else ran."""
    quiet = OthersCpu(busy_s=20.1, own_s=19.9, window_s=10.0, resolution_s=0.04)
    verdict = assess([2.5, 2.4], cpu_seconds=19.8, wall_seconds=10.0, threads=2, cores=2, others=quiet)
    assert not verdict.contended and verdict.reasons == ()


def test_other_processes_beyond_the_idle_cores_are_contended():
    # 2 threads on 2 cores: a neighbour that took 0.6 of a core is contention, whatever the load average says
    busy = OthersCpu(busy_s=20.0, own_s=14.0, window_s=10.0, resolution_s=0.04)
    verdict = assess([0.5], cpu_seconds=14.0, wall_seconds=10.0, threads=2, cores=2, others=busy)
    assert verdict.contended
    assert verdict.reasons[0] == "other processes used 0.60 cores (> 0.25: the 2 cores less this case's 2, plus 0.25)"
    # 1 thread on 2 cores: a neighbour on the other core is below the limit (1.25 cores) ...
    beside = OthersCpu(busy_s=19.9, own_s=9.9, window_s=10.0, resolution_s=0.04)
    assert not assess([], 9.9, 10.0, threads=1, cores=2, others=beside).contended
    # ... two neighbours are not
    crowded = OthersCpu(busy_s=20.0, own_s=6.0, window_s=10.0, resolution_s=0.04)
    assert assess([], 6.0, 10.0, threads=1, cores=2, others=crowded).contended
    # on a GPU the case needs one launching thread, whatever its torch threads
    assert not assess([], 1.0, 10.0, threads=2, cores=2, check_cpu=False, others=beside).contended
    assert assess([], 1.0, 10.0, threads=2, cores=2, check_cpu=False, others=crowded).contended


def test_clock_ticks_are_allowed_for_on_short_windows():
    # 0.1 s window: 0.04 s of others is 0.4 cores, but within the 2 ticks per core that the readings may be off
    short = OthersCpu(busy_s=0.24, own_s=0.2, window_s=0.1, resolution_s=0.04)
    assert not assess([], 0.2, 0.1, threads=2, cores=2, others=short).contended
    assert assess([], 0.2, 0.1, threads=2, cores=2, others=OthersCpu(0.3, 0.2, 0.1, 0.04)).contended
    assert not assess([9.0], 0.0, 0.0, threads=2, cores=2, others=OthersCpu(0.0, 0.0, 0.0, 0.04)).contended


def test_monitor_with_injected_proc_stat_readings(monkeypatch):
    """Readings at start, after each of 2 rounds, and at stop; the load average (3.5) no longer decides."""
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 3.0, 2.0))
    cpu, wall = itertools.count(0.0, 1.0), itertools.count(0.0, 0.5)  # 2 threads that got their 2 cores
    monkeypatch.setattr(time, "process_time", lambda: next(cpu))
    monkeypatch.setattr(time, "perf_counter", lambda: next(wall))
    readings = iter([reading(50.0, 1.0, 0.0, 2), reading(0.0, 0.0, 0.0, 5), reading(0.0, 0.0, 0.0, 2),
                     reading(54.05, 5.0, 2.0, 2)])
    monitor = Monitor(threads=2, cores=2, read=lambda: next(readings))
    info = two_timed_calls(monitor)
    assert info["contended"] is False and info["contention"] == []
    others = info["others_cpu"]
    assert others["source"] == "/proc/stat" and others["limit_cores"] == pytest.approx(0.25)
    assert others["busy_s"] == pytest.approx(4.05) and others["own_s"] == pytest.approx(4.0)
    assert others["others_s"] == pytest.approx(0.05) and others["others_cores"] == pytest.approx(0.025)
    assert others["window_s"] == pytest.approx(2.0) and others["procs_running_max"] == 5
    # the same window with a neighbour that took a whole core
    readings = iter([reading(50.0, 1.0, 0.0), reading(56.0, 5.0, 2.0)])
    monitor = Monitor(threads=2, cores=2, read=lambda: next(readings))
    monitor.start()
    monitor.stop()
    assert monitor.info()["contended"] is True and monitor.info()["others_cpu"]["others_cores"] == pytest.approx(1.0)


def test_worker_passes_pool_their_others_cpu():
    from tokred.bench.workers import _pooled_monitor

    def out(others):
        return {"load_samples": [3.0], "cpu_seconds": 1.0, "wall_seconds": 1.0, "loadavg_before": None,
                "loadavg_after": None, "threads": 1, "others_cpu": others}

    a, b = OthersCpu(2.0, 1.0, 1.0, 0.04, 2), OthersCpu(3.0, 1.0, 1.0, 0.04, 3)
    monitor = _pooled_monitor([out(a.to_json()), out(b.to_json())], threads=1, check_cpu=True)
    assert monitor.others == a + b and monitor.others.others_cores == pytest.approx(1.5)
    assert monitor.assessment().contended  # 1.5 cores of others beside 1 thread on 2 cores
    # a pass that could not measure: no pooled figure, the load average decides
    monitor = _pooled_monitor([out(a.to_json()), out(None)], threads=1, check_cpu=True)
    assert monitor.others is None and monitor.assessment().reasons == ("load average 3.00 > 2 cores",)


def test_cpu_count_is_the_affinity_mask():
    assert contention.cpu_count() == len(os.sched_getaffinity(0))


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None) as n:
        assert n == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match=r"threads must be an int >= 1 \(torch threads per process\), got 0"):
        contention.check_threads(0)


def test_start_up_warning(monkeypatch):
    monkeypatch.setenv(contention.WARNING_ENV, "1")
    # 2 cores, 1 thread needed: one busy neighbour leaves a core free; two do not
    assert loaded_warning(1, load=(1.0, 1.0, 1.0), cores=2) is None
    message = loaded_warning(1, load=(2.1, 1.5, 1.0), cores=2)
    assert message.startswith("tokred: warning: the machine is already loaded (1-minute load average 2.10 on 2")
    assert "\n" not in message
    assert loaded_warning(2, load=(1.0, 0.5, 0.2), cores=2) is not None
    assert loaded_warning(2, load=(0.6, 0.5, 0.2), cores=2) is None  # background noise
    monkeypatch.setenv(contention.WARNING_ENV, "0")
    assert loaded_warning(1, load=(9.0, 9.0, 9.0), cores=2) is None


def test_start_up_warning_reads_the_other_processes_cpu(monkeypatch):
    """The start-up check judges what the other processes use now (the rule the timed rounds are judged by), not
    the load average, which still shows a run that ended a minute ago."""
    monkeypatch.setenv(contention.WARNING_ENV, "1")
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.5, 1.0))  # a run just ended: the load average remembers it

    def sampled(others_cores):
        return contention.OthersCpu(busy_s=others_cores + 0.02, own_s=0.02, window_s=1.0, resolution_s=0.02)

    monkeypatch.setattr(contention, "sample_others", lambda window_s=1.0: sampled(0.05))
    assert loaded_warning(2, cores=2) is None
    assert loaded_warning(1, cores=2) is None
    monkeypatch.setattr(contention, "sample_others", lambda window_s=1.0: sampled(1.0))  # one busy neighbour
    message = loaded_warning(2, cores=2)
    assert message.startswith("tokred: warning: the machine is already loaded (other processes are using 1.00 of 2")
    assert loaded_warning(1, cores=2) is None  # it leaves a core idle
    monkeypatch.setattr(contention, "sample_others", lambda window_s=1.0: sampled(1.6))
    assert loaded_warning(1, cores=2) is not None
    # no /proc/stat: the load average decides
    monkeypatch.setattr(contention, "sample_others", lambda window_s=1.0: None)
    assert "1-minute load average 1.90" in loaded_warning(2, cores=2)


def test_sample_others_measures_a_window():
    others = contention.sample_others(0.05)
    if others is None:
        pytest.skip("no /proc/stat")
    assert 0.04 <= others.window_s < 5 and others.others_cores is not None and others.others_cores >= 0


def test_warn_if_loaded_prints_one_line(monkeypatch):
    monkeypatch.setenv(contention.WARNING_ENV, "1")
    monkeypatch.setattr(contention, "sample_others", lambda window_s=1.0: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 6.0, 5.0))
    stream = io.StringIO()
    assert warn_if_loaded([1, None], stream=stream)
    assert stream.getvalue().count("\n") == 1 and "already loaded" in stream.getvalue()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    stream = io.StringIO()
    assert warn_if_loaded([1], stream=stream) is None and stream.getvalue() == ""
