"""What the tasks measure besides time: FLOPs and peak memory of one unit of work, the time share of a module.

Wall time is not measured here: :mod:`tokred.bench.timing` times every workload, paired with the baseline, for
``tokred run``, ``tokred bench`` and the pytest plugin alike. Conventions, the same for every task and device:

* **FLOPs** come from :func:`tokred.flops.count_flops` (``FlopCounterMode``, multiply-add = 2 FLOPs, attention
  included on CPU) on one call, and are reported per item (image) in GFLOPs.
* **Peak memory** is the peak of tensor memory allocated *during* one call, above what was allocated when the
  call started (activations and temporaries; the weights and the inputs already resident are not counted).
  On CUDA it is ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` at the start. On CPU, where torch keeps no allocator statistics and the process RSS
  is dominated by the allocator's caching and by other libraries, it is computed from the allocation and free
  events that ``torch.profiler`` records with ``profile_memory=True``: the running sum of allocated bytes in
  time order, and its maximum. Both numbers mean the same thing, so CPU and CUDA results compare (on CPU, a
  block allocated before the call and freed during it is not subtracted; the profiler never saw it allocated).
* :func:`flops_and_memory` takes both from a single call (the FLOP counter allocates no tensors), so a
  task's speed record costs one extra call of its workload, not two.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from tokred.flops import flop_counter

MB = 2**20

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16`` (the names of :data:`tokred.bench.task.DTYPES`)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid dtypes: {', '.join(_DTYPES)}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for a task's ``device`` argument, with a clear error when CUDA is not there.

    Under a multi-process launch (``accelerate launch`` / ``torchrun``), a bare ``"cuda"`` means this
    process's own GPU (``cuda:LOCAL_RANK``).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available; use device='cpu'")
        if dev.index is None and "LOCAL_RANK" in os.environ:
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextmanager
def memory_scope(device: torch.device | str) -> Iterator[dict[str, float]]:
    """``with memory_scope(dev) as rec: ...`` then ``rec["peak_mem_mb"]``: the peak tensor memory (MB) allocated
    during the block above what was allocated at its start (see the module docstring for CUDA and CPU)."""
    dev = torch.device(device)
    record: dict[str, float] = {}
    if dev.type == "cuda":
        synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        yield record
        synchronize(dev)
        record["peak_mem_mb"] = (torch.cuda.max_memory_allocated(dev) - before) / MB
        return
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # kineto's start-up chatter (e.g. no GPU found) is noise here
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
    with _without_profiler_markers():
        prof.__enter__()
    try:
        yield record
    finally:
        with _without_profiler_markers():
            prof.__exit__(None, None, None)
    record["peak_mem_mb"] = _peak_from_events(prof) / MB


def _is_profiler_chatter(line: bytes) -> bool:
    # the start/stop markers, and the notice that blocks allocated before the start are not tracked (the peak is
    # measured above what was allocated at the start, so it loses nothing)
    return line.startswith(b"USDT:") or b"allocated before the profiling started" in line


@contextmanager
def _without_profiler_markers() -> Iterator[None]:
    """Around the profiler's start and stop only: kineto (torch 2.14) writes a ``USDT: ... profiler_start`` /
    ``profiler_stop`` line to the process's stderr each time, whatever its log level, which floods the CLI's
    progress (and a notice about blocks allocated before the start). The C-level stderr goes to a temporary file
    meanwhile; every other line is written back."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().splitlines(keepends=True) if not _is_profiler_chatter(line)]
            if kept:
                os.write(fd, b"".join(kept))


def _peak_from_events(prof: Any) -> int:
    """The maximum running sum of the CPU allocation (+) and free (-) events a memory profile recorded."""
    events = [
        e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"
    ]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def peak_memory_mb(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Peak tensor memory (MB) allocated during one call of ``fn`` above what was allocated at its start."""
    with memory_scope(device) as record:
        fn()
    return record["peak_mem_mb"]


def flops_and_memory(
    fn: Callable[[], Any],
    device: torch.device | str,
    items: int,
    flops: bool = True,
    memory: bool = True,
    modules: dict[str, str] | None = None,
) -> dict[str, float]:
    """FLOPs and peak memory of one call of ``fn`` (under ``torch.no_grad``) that processes ``items`` items.

    Keys: ``gflops`` (per item; with ``flops``), and for each ``key: class name`` of ``modules`` the GFLOPs per
    item inside top-level modules of that class (``{"unet_gflops": "UNet2DConditionModel"}``), ``peak_mem_mb``
    (with ``memory``). Nothing is timed.
    """
    out: dict[str, float] = {}
    if not (flops or memory):
        return out
    counter = flop_counter() if flops else nullcontext()
    scope = memory_scope(device) if memory else nullcontext({})
    with torch.no_grad(), scope as mem, counter:
        fn()
    if flops:
        out["gflops"] = counter.get_total_flops() / items / 1e9
        counts = counter.get_flop_counts()
        for key, name in (modules or {}).items():
            out[key] = sum(counts.get(name, {}).values()) / items / 1e9
    if memory:
        out["peak_mem_mb"] = mem["peak_mem_mb"]
    return out


def module_flops(fn: Callable[[], Any], module_names: tuple[str, ...]) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one call of ``fn`` and the FLOPs inside top-level modules of the given class names
    (``FlopCounterMode`` attributes FLOPs to modules by class name, e.g. ``"UNet2DConditionModel"``)."""
    counter = flop_counter()
    with torch.no_grad(), counter:
        fn()
    counts = counter.get_flop_counts()
    per_module = {name: int(sum(counts.get(name, {}).values())) for name in module_names}
    return int(counter.get_total_flops()), per_module


class ModuleTimer:
    """Accumulates the synchronized wall time spent inside ``module``'s forward calls (hooks).

    Used to report the U-Net's share of a generation's time (a ratio within one call, not a speed). The
    synchronization at every call costs a little, so it runs in its own call, never in a timed one.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device | str) -> None:
        self.module = module
        self.device = device
        self.seconds = 0.0
        self.calls = 0
        self._start: float | None = None
        self._handles: list[Any] = []

    def _before(self, *_: Any, **__: Any) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def _after(self, *_: Any, **__: Any) -> None:
        synchronize(self.device)
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.calls += 1
            self._start = None

    def __enter__(self) -> ModuleTimer:
        self._handles = [
            self.module.register_forward_pre_hook(self._before),
            self.module.register_forward_hook(self._after),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextmanager
def timed(device: torch.device | str):
    """``with timed(dev) as t: ...`` then ``t["seconds"]``: one synchronized wall-time measurement."""
    record = {"seconds": 0.0}
    synchronize(device)
    start = time.perf_counter()
    try:
        yield record
    finally:
        synchronize(device)
        record["seconds"] = time.perf_counter() - start
