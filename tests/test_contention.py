"""Contention (tokred.bench.contention): the contended decision with the load average and CPU time stubbed, the
monitor around timed calls, torch's thread count per case, and the CLI's start-up warning."""

from __future__ import annotations

import io
import itertools
import os
import time

import pytest
import torch

from tokred.bench import contention
from tokred.bench.contention import Monitor, assess, loaded_warning, torch_threads, warn_if_loaded


def test_quiet_machine_is_not_contended():
    verdict = assess([0.3, 0.9, 1.1], cpu_seconds=9.8, wall_seconds=10.0, threads=1, cores=2)
    assert not verdict.contended and verdict.reasons == ()
    assert verdict.cpu_utilisation == pytest.approx(0.98)


def test_load_above_the_cores_is_contended():
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


def test_monitor_with_stubbed_loadavg_and_clocks(monkeypatch):
    loads = iter([(0.5, 0.4, 0.3), (1.5, 0.9, 0.5), (2.7, 1.2, 0.6), (2.9, 1.3, 0.7)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
    cpu = itertools.count(0.0, 0.5)  # half a CPU second per reading ...
    wall = itertools.count(0.0, 1.0)  # ... per wall second: a single thread that got half a core
    monkeypatch.setattr(time, "process_time", lambda: next(cpu))
    monkeypatch.setattr(time, "perf_counter", lambda: next(wall))
    monitor = Monitor(threads=1, cores=2)
    monitor.start()
    for _ in range(2):
        with monitor.call():
            pass
        monitor.sample()
    monitor.stop()
    info = monitor.info()
    assert info["loadavg_before"] == [0.5, 0.4, 0.3] and info["loadavg_after"] == [2.9, 1.3, 0.7]
    assert info["cpu_count"] == 2 and info["cpu_utilisation"] == pytest.approx(0.5)
    assert info["contended"] is True
    assert info["contention"][0] == "load average 2.90 > 2 cores"
    assert "CPU time 50% of 1 thread" in info["contention"][1]


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


def test_warn_if_loaded_prints_one_line(monkeypatch):
    monkeypatch.setenv(contention.WARNING_ENV, "1")
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 6.0, 5.0))
    stream = io.StringIO()
    assert warn_if_loaded([1, None], stream=stream)
    assert stream.getvalue().count("\n") == 1 and "already loaded" in stream.getvalue()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    stream = io.StringIO()
    assert warn_if_loaded([1], stream=stream) is None and stream.getvalue() == ""
