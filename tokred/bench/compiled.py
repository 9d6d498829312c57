"""Compiled benchmarks (``tokred run --compile``, ``pytest --tokred-compile``): the timed module under
``torch.compile``, the baseline's as every method's.

What a user of a compiled pipeline compares is the method compiled against the baseline compiled, so with a
:class:`CompileSettings` the harness, for each case (the baseline row and every method, each timed on its own):

1. applies the method first (the baseline row: no patch), then compiles the task's timed module in place
   (:meth:`tokred.bench.task.Task.compile_target`: the denoiser of a diffusion workload, the ViT of a
   classification one) with ``module.compile(backend=..., mode=..., fullgraph=...)``: the module stays the
   object the method patched, so the adapter and the patch see it as before;
2. runs *compile warm-up rounds*, exactly the rounds the timed ones will be (a baseline call with the patch
   paused and a method call, the stateful workload advanced after each: a cache's whole cycle, the steps of a
   step-dependent method), until a whole round compiles nothing new (at most :data:`MAX_COMPILE_ROUNDS`);
3. times the usual paired rounds (warm-up rounds first, as in eager runs), and counts what compiled during them
   (``timed_compilations``: 0 when the warm-up covered every call);
4. undoes the compile (``torch._dynamo.reset()``: the next case compiles afresh, its compile time is its own).

In a method's case the baseline calls run with the patch *paused* (:meth:`tokred.Patch.pause`), stateless
workloads included (eager runs remove and re-apply the patch there): the compiled code of both states then stays
in dynamo's cache (a guard on the patch's ``active`` flag chooses), where re-applying would make new objects and
recompile every round. The paused patch's compiled graph is the unpatched model's.

Recorded per case (``compile`` in the results): ``backend``, ``mode``, ``fullgraph``, ``compile_s`` (the time
dynamo and the backend spent compiling, from ``torch._dynamo.utils.compilation_time_metrics``; where that is
missing, the warm-up calls that compiled less as many steady calls), ``warmup_s`` (wall time of the compile
warm-up rounds), ``compile_rounds``, ``compilations`` (frames compiled: the first call's and every recompile),
``recompiles`` (compilations after the first call), ``graphs``, ``graph_breaks`` (with ``fullgraph`` off; with
it on a break is an error), ``timed_compilations``, and, with worker processes, ``process_compile_s`` (each
pass's). A case that fails to compile (``fullgraph`` and a graph break, a backend error) is skipped with the
reason (:class:`CompileFailed`), and the run goes on.

The inductor cache: inductor keeps compiled kernels and graphs on disk (``torch._inductor.config.fx_graph_cache``,
on by default, in ``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_<user>``). A later case or worker
process that compiles an identical graph finds it there, so its ``compile_s`` may be much smaller than the first
one's; dynamo's tracing is redone every time. ``fx_graph_cache`` is recorded with each case.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_BACKEND = "inductor"
# compile warm-up rounds before a case is given up as still compiling (its rounds are then timed anyway, and
# ``steady`` is recorded False)
MAX_COMPILE_ROUNDS = 8


@dataclass(frozen=True)
class CompileSettings:
    """How the timed module is compiled: ``torch.compile(backend=backend, mode=mode, fullgraph=fullgraph)``."""

    backend: str = DEFAULT_BACKEND
    mode: str = "default"
    fullgraph: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"compile backend must be a backend name, got {self.backend!r}")
        if self.mode not in MODES:
            raise ValueError(f"unknown compile mode {self.mode!r}; valid: {', '.join(MODES)}")
        if not isinstance(self.fullgraph, bool):
            raise ValueError(f"compile fullgraph must be True or False, got {self.fullgraph!r}")

    def check_backend(self) -> CompileSettings:
        """``self`` if torch knows the backend; a ValueError naming the valid backends otherwise."""
        import torch

        valid = sorted(set(torch._dynamo.list_backends(exclude_tags=())) | {"eager", "aot_eager", "inductor"})
        if self.backend not in valid:
            raise ValueError(f"unknown compile backend {self.backend!r}; valid: {', '.join(valid)}")
        return self

    @property
    def label(self) -> str:
        """``compiled (inductor)``, ``compiled (inductor, max-autotune, graph breaks allowed)``."""
        parts = [self.backend]
        if self.mode != "default":
            parts.append(self.mode)
        if not self.fullgraph:
            parts.append("graph breaks allowed")
        return f"compiled ({', '.join(parts)})"

    @property
    def suffix(self) -> str:
        """The results file's name suffix: ``-compiled-inductor`` (``-max-autotune``, ``-breaks``)."""
        out = f"-compiled-{self.backend}"
        if self.mode != "default":
            out += f"-{self.mode}"
        return out + ("" if self.fullgraph else "-breaks")

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "mode": self.mode, "fullgraph": self.fullgraph}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> CompileSettings | None:
        return None if values is None else cls(**values)


def label_of(compile_info: dict[str, Any] | None) -> str:
    """The section label of a result's ``compile`` record ("" for an eager result)."""
    if not compile_info:
        return ""
    return CompileSettings(str(compile_info.get("backend", DEFAULT_BACKEND)), str(compile_info.get("mode", "default")),
                           bool(compile_info.get("fullgraph", True))).label


class CompileFailed(Exception):
    """A case whose module failed to compile (a graph break under ``fullgraph``, a backend error); the harness
    skips the case with this reason (a :class:`tokred.bench.harness.CaseSkipped`)."""


def compile_module(module: Any, settings: CompileSettings) -> None:
    """Compile ``module`` in place (``nn.Module.compile``: calls of the module run the compiled code; the object,
    its submodules and the patch on them stay as they are)."""
    kwargs: dict[str, Any] = {"backend": settings.backend, "fullgraph": settings.fullgraph}
    if settings.mode != "default":
        kwargs["mode"] = settings.mode
    module.compile(**kwargs)


def uncompile_module(module: Any) -> None:
    """Undo :func:`compile_module` and forget dynamo's compiled code (the next case compiles afresh)."""
    import torch

    if module is not None and getattr(module, "_compiled_call_impl", None) is not None:
        module._compiled_call_impl = None
    torch._dynamo.reset()


class Watch:
    """Dynamo's counters since the watch started: frames compiled, their compile time, graphs, graph breaks."""

    def __init__(self) -> None:
        self.start = self.snapshot()

    @staticmethod
    def snapshot() -> dict[str, float]:
        from torch._dynamo.utils import compilation_time_metrics, counters

        inner = compilation_time_metrics.get("_compile.compile_inner", [])
        return {
            "compilations": float(len(inner)),
            "compile_s": float(sum(inner)),
            "graphs": float(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": float(sum(counters["graph_break"].values())),
        }

    def delta(self) -> dict[str, float]:
        now = self.snapshot()
        return {k: now[k] - self.start[k] for k in now}


def fx_graph_cache() -> bool | None:
    """Whether inductor's on-disk graph cache is on (None where torch has no such setting)."""
    try:
        import torch._inductor.config as config

        return bool(config.fx_graph_cache)
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        return None


def warm_up(round_once: Callable[[Callable[[Callable[[], Any]], float]], None],
            max_rounds: int = MAX_COMPILE_ROUNDS) -> dict[str, Any]:
    """Compile warm-up: ``round_once(call_timer)`` runs one round exactly as a timed round would (the caller's
    paired round with its switches), timing each call with ``call_timer``; rounds go on until one compiles nothing
    new, at most ``max_rounds``. What compiled, and how long it took. A call that fails to compile raises
    :class:`CompileFailed` with the reason."""
    watch = Watch()
    calls: list[tuple[float, int]] = []  # (wall time, frames it compiled)

    def timer(fn: Callable[[], Any]) -> float:
        before = Watch.snapshot()["compilations"]
        start = time.perf_counter()
        try:
            fn()
        except Exception as err:
            raise CompileFailed(compile_error(err)) from err
        took = time.perf_counter() - start
        calls.append((took, int(Watch.snapshot()["compilations"] - before)))
        return took

    start = time.perf_counter()
    rounds, steady = 0, False
    while rounds < max_rounds:
        before = len(calls)
        round_once(timer)
        rounds += 1
        if len(calls) > before and not any(n for _, n in calls[before:]):
            steady = True
            break
    warmup_s = time.perf_counter() - start
    delta = watch.delta()
    compile_s = delta["compile_s"]
    if compile_s <= 0:  # no dynamo timing: the compiling calls less as many steady ones
        steady_calls = [t for t, n in calls if not n]
        typical = min(steady_calls) if steady_calls else 0.0
        compile_s = max(0.0, sum(t - typical for t, n in calls if n))
    compilations = int(delta["compilations"])
    return {
        "compile_s": compile_s,
        "warmup_s": warmup_s,
        "compile_rounds": rounds,
        "compilations": compilations,
        "recompiles": max(0, compilations - (calls[0][1] if calls else 0)),
        "graphs": int(delta["graphs"]),
        "graph_breaks": int(delta["graph_breaks"]),
        "steady": steady,
    }


def compile_error(err: BaseException) -> str:
    """The first two lines of a compile error, with its type (dynamo's messages run to pages of advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    head = " ".join(lines[:2])  # dynamo's first line is terse ("Unsupported method call"); the second says what
    if len(head) > 300:
        head = head[:297] + "..."
    return f"{type(err).__name__}: {head}" if head else type(err).__name__


def from_options(compile: bool, backend: str | None = None, mode: str | None = None,
                 fullgraph: bool | None = None, prefix: str = "--") -> CompileSettings | None:
    """The compile settings of the command line's options (``--compile``, ``--compile-backend``,
    ``--compile-mode``, ``--[no-]compile-fullgraph``; ``prefix`` ``--tokred-`` names the pytest plugin's), None
    without ``--compile``; a ValueError naming the option for a setting without ``--compile`` or a bad value."""
    if not compile:
        given = [f"{prefix}compile-{name}" for name, value in (("backend", backend), ("mode", mode),
                                                                 ("fullgraph", fullgraph)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} set(s) how to compile, but nothing is compiled without "
                             f"{prefix}compile; add {prefix}compile or drop {', '.join(given)}")
        return None
    try:
        settings = CompileSettings(backend or DEFAULT_BACKEND, mode or "default", True if fullgraph is None else
                                   fullgraph)
        return settings.check_backend()
    except ValueError as err:
        raise ValueError(f"{prefix}compile: {err}") from None
