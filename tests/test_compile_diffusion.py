"""Every diffusion method under ``torch.compile`` (issue 20): one graph, bounded recompilation, eager's output.

For each method and family the method's ``compile_support`` says how it compiles, and these tests hold it to that:

* ``"fullgraph"``: ``torch.compile(denoiser, fullgraph=True)`` runs a classifier-free-guided generation (batch 2,
  tensor timesteps walking down, the method's state advancing: steps, caches, random destinations) with the same
  outputs as eager (1e-5 relative), no graph break, and at most :data:`COMPILE_BOUND` compiled frames, counted by
  dynamo's ``CompileCounter`` backend (which runs the captured graphs as they are: no code generation, fast);
  one generation per family runs 20 steps, so a count that grows with the steps cannot pass;
* ``"island: ..."`` / ``"no: ..."``: ``fullgraph=True`` refuses the model, as documented: a graph break, or (pab) a
  recompilation per step up to dynamo's limit.

The denoisers and the generation loop are in ``compile_cases.py`` (shared with ``benchmarks/compile_matrix.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compile_cases import CASES, METHODS, generate, max_relative_difference, small_sd15  # noqa: E402

import tokred  # noqa: E402
from tokred.registry import get_method  # noqa: E402

pytest.importorskip("diffusers")

# Frames compiled over a whole generation, at most: one graph per distinct decision a method makes before a call
# (DeepCache: the first full call, the reusing calls, the later full calls; ToDo: downsampling or not), never one
# per step.
COMPILE_BOUND = 4
RTOL = 1e-5


def support(method: str, family: str) -> str | None:
    return get_method(method).compile_support_for(family)


def cells(kind: str) -> list[tuple[str, str]]:
    out = []
    for case_name, make in CASES.items():
        family = make().family
        for method in METHODS:
            if all(family in get_method(m).options for m in method.split("+")):
                value = support(method, family) or ""
                if value.split(":")[0] == kind:
                    out.append((case_name, method))
    return out


# The cells the default run checks (compiling a tiny U-Net still takes seconds per graph, so not all of them):
# every fullgraph method and every family at least once, one 20-step generation per family (a count that grew with
# the steps would pass 4 but not 20) and every composition kind. TOKRED_COMPILE_ALL=1 runs every cell (what
# benchmarks/compile_matrix.py tabulates).
DEFAULT = {
    ("sd15", "tome"): 20, ("sd15", "deepcache+todo"): 4, ("sdxl", "todo"): 20, ("sd3", "tome"): 20,
    ("sd3", "todo"): 4, ("pixart", "tome"): 20, ("flux", "todo"): 20, ("flux", "tome"): 4,
    ("sd15", "cat_pruning"): 20, ("pixart", "cat_pruning"): 20,
}
EVERY_CELL = os.environ.get("TOKRED_COMPILE_ALL") == "1"


def selected(cell: tuple[str, str]):
    if cell in DEFAULT or EVERY_CELL:
        return cell
    return pytest.param(*cell, marks=pytest.mark.skip(reason="set TOKRED_COMPILE_ALL=1 to check every cell"))


def compiled_generation(case_name: str, method: str, steps: int, fullgraph: bool = True):
    """(eager outputs, compiled outputs, compiled frames, graph breaks) of one generation on fresh models."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # SD1.5's layout with one layer per block unless every cell is checked: half the tracing, the same code paths
    case = small_sd15() if case_name == "sd15" and not EVERY_CELL else CASES[case_name]()
    eager_model = case.build()
    tokred.apply(eager_model, method, **METHODS[method])
    eager = generate(eager_model, case, steps)
    model = case.build()
    tokred.apply(model, method, **METHODS[method])
    counter = torch._dynamo.testing.CompileCounter()
    compiled = generate(torch.compile(model, backend=counter, fullgraph=fullgraph), case, steps)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return case, eager, compiled, counter.frame_count, breaks


@pytest.mark.parametrize("case_name,method", [selected(c) for c in cells("fullgraph")], ids=lambda v: v)
def test_fullgraph_generation_matches_eager_with_bounded_compilation(case_name, method):
    steps = DEFAULT.get((case_name, method), 4)
    case, eager, compiled, frames, breaks = compiled_generation(case_name, method, steps)
    assert breaks == 0
    assert 1 <= frames <= COMPILE_BOUND, f"{frames} compilations over {steps} steps"
    assert max_relative_difference(eager, compiled) <= RTOL
    # the method acts (its outputs are not the unpatched model's), so matching eager means something; over the
    # whole generation: CAT computes its first t0 calls in full
    baseline = generate(case.build(), case, steps)
    assert max_relative_difference(baseline, eager) > 1e-4


def test_a_step_read_inside_the_compiled_forward_fails_the_bound(monkeypatch):
    """The check can fail: a planner that reads ``call.step`` in the compiled forward (what every planner did
    while the adapters built ``BlockCall`` from the step itself) recompiles at every step, up to dynamo's limit."""
    todo = get_method("todo")
    planner = todo.planner

    def reading_the_step(self, state):
        inner = planner(self, state)
        return lambda call, x: inner(call, x) if call.step >= 0 else None

    monkeypatch.setattr(todo, "planner", reading_the_step)
    # dynamo's limit lowered from 8 to COMPILE_BOUND: the same failure, sooner
    with torch._dynamo.config.patch(recompile_limit=COMPILE_BOUND), pytest.raises(
        torch._dynamo.exc.FailOnRecompileLimitHit
    ):
        compiled_generation("pixart", "todo", 10)


@pytest.mark.parametrize(
    "case_name,method", [c if c[0] == "pixart" or EVERY_CELL else selected(c) for c in cells("island") + cells("no")],
    ids=lambda v: v,
)
def test_documented_islands_and_refusals_break_the_graph_under_fullgraph(case_name, method):
    """As documented: a graph break (an island, or code dynamo cannot trace) or, where the method keeps a per-step
    Python count in the forward (pab), a recompilation per step until dynamo's limit."""
    family = CASES[case_name]().family
    assert support(method, family)  # stated
    with torch._dynamo.config.patch(recompile_limit=COMPILE_BOUND), pytest.raises(
        (torch._dynamo.exc.Unsupported, torch._dynamo.exc.FailOnRecompileLimitHit)
    ):
        compiled_generation(case_name, method, 10)
