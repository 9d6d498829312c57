"""Every diffusion method under ``torch.compile`` (issue 20): one graph, bounded recompilation, eager's output.

For each method and family the method's ``compile_support`` says how it compiles, and these tests hold it to that:

* ``"fullgraph"``: ``torch.compile(denoiser, fullgraph=True)`` runs a classifier-free-guided generation (batch 2,
  tensor timesteps walking down, the method's state advancing: steps, caches, random destinations) with the same
  outputs as eager (1e-5 relative), no graph break, and at most :data:`COMPILE_BOUND` compiled frames, counted by
  dynamo's ``CompileCounter`` backend (which runs the captured graphs as they are: no code generation, fast);
  one generation per family runs 20 steps, so a count that grows with the steps cannot pass;
* ``"island: ..."`` / ``"no: ..."``: ``fullgraph=True`` refuses the model, as documented: a graph break, or a
  recompilation per step up to dynamo's limit; and without ``fullgraph`` the generation compiles to eager's outputs
  (1e-5 relative), compiling no frame after step 20 of a 40-step generation (the islands bounded, not one per
  step).

The denoisers and the generation loop are in ``compile_cases.py`` (shared with ``benchmarks/compile_matrix.py``).
"""

from __future__ import annotations

import dataclasses
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


# Every method on every family it supports is checked by default (a test per method and family): 4 steps, and 20
# for the cells below (one or more per family and every method with a step schedule: a count that grew with the
# steps would pass 4 but not 20). TOKRED_COMPILE_ALL=1 builds SD1.5 with its full layout (two layers per block)
# instead of one layer per block: the cells benchmarks/compile_matrix.py tabulates.
DEFAULT = {
    ("sd15", "tome"): 20, ("sd15", "deepcache+todo"): 4, ("sdxl", "todo"): 20, ("sd3", "tome"): 20,
    ("sd3", "todo"): 4, ("pixart", "tome"): 20, ("flux", "todo"): 20, ("flux", "tome"): 4,
    ("pixart", "pab"): 20,
    # CA-ToMe: the first call matches (empty cache), then reuses, then recomputes on config_3's steps 8, 11, 13 and 20
    ("sd15", "ca_tome"): 20, ("pixart", "ca_tome"): 20,
    # CAT pruning: one graph per phase of its schedule (the reference call, the clustering call, the pruned calls)
    ("sd15", "cat_pruning"): 20, ("pixart", "cat_pruning"): 20,
}
EVERY_CELL = os.environ.get("TOKRED_COMPILE_ALL") == "1"


def eager_run_and_fresh_model(case_name: str, method: str, steps: int):
    """(case, eager outputs of a generation with the method, a fresh model with the method applied), dynamo reset."""
    torch._dynamo.reset()
    # SD1.5's layout with one layer per block unless every cell is checked: half the tracing, the same code paths
    case = small_sd15() if case_name == "sd15" and not EVERY_CELL else CASES[case_name]()
    eager_model = case.build()
    tokred.apply(eager_model, method, **METHODS[method])
    eager = generate(eager_model, case, steps)
    model = case.build()
    tokred.apply(model, method, **METHODS[method])
    return case, eager, model


def compiled_generation(case_name: str, method: str, steps: int, fullgraph: bool = True):
    """(eager outputs, compiled outputs, compiled frames, graph breaks) of one generation on fresh models."""
    torch._dynamo.utils.counters.clear()
    case, eager, model = eager_run_and_fresh_model(case_name, method, steps)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = generate(torch.compile(model, backend=counter, fullgraph=fullgraph), case, steps)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return case, eager, compiled, counter.frame_count, breaks


@pytest.mark.parametrize("case_name,method", cells("fullgraph"), ids=lambda v: v)
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
    "case_name,method", cells("island") + cells("no"),
    ids=lambda v: v,
)
def test_documented_islands_and_refusals_break_the_graph_under_fullgraph(case_name, method):
    """As documented: a graph break (an island, or code dynamo cannot trace) or, where the method reads a per-step
    Python value in the forward, a recompilation per step until dynamo's limit."""
    family = CASES[case_name]().family
    assert support(method, family)  # stated
    with torch._dynamo.config.patch(recompile_limit=COMPILE_BOUND), pytest.raises(
        (torch._dynamo.exc.Unsupported, torch._dynamo.exc.FailOnRecompileLimitHit)
    ):
        compiled_generation(case_name, method, 10)


# dynamo's recompile limit while the islands are counted: above the frames a 40-step generation could compile, so a
# recompilation per step shows as frames compiled late in the generation (at dynamo's default limit, 8, the count
# would stop at the limit and look bounded)
UNLIMITED_RECOMPILES = 128


def frames_by_step(case_name: str, method: str, steps: int):
    """(eager outputs, compiled outputs, frames compiled by the end of each step) of one generation on fresh models,
    compiled without fullgraph."""
    case, eager, model = eager_run_and_fresh_model(case_name, method, steps)
    counter, frames = torch._dynamo.testing.CompileCounter(), []

    def counted_call(m, i, t):
        out = case.call(m, i, t)
        frames.append(counter.frame_count)
        return out

    with torch._dynamo.config.patch(recompile_limit=UNLIMITED_RECOMPILES):
        compiled = generate(torch.compile(model, backend=counter), dataclasses.replace(case, call=counted_call), steps)
    return eager, compiled, frames


@pytest.mark.parametrize(
    "case_name,method", cells("island") + cells("no"),
    ids=lambda v: v,
)
def test_islands_and_refusals_compile_without_fullgraph_to_eager_outputs_with_bounded_compilation(case_name, method):
    """Where fullgraph is refused, ``torch.compile`` without it still runs a 40-step generation as eager does, and
    its islands cost a fixed number of compiled frames: none is compiled after step 20 (a recompilation per step
    would compile one at every step).

    Steps 20 to 40 of one generation rather than a 10-step generation against a 20-step one: where a data-dependent
    choice picks the graph (first-block caching's skip), a short generation need not meet every outcome its graphs
    cover (SD3's first_block_cache+todo compiles 6 frames over a 10-step generation, 7 over 20 or 40 steps), and one
    generation traces once."""
    eager, compiled, frames = frames_by_step(case_name, method, 40)
    assert max_relative_difference(eager, compiled) <= RTOL
    assert frames[-1] == frames[19], f"{frames[19]} compilations by step 20, {frames[-1]} by step 40"


def test_a_decision_made_inside_the_compiled_forward_fails_the_island_bound(monkeypatch):
    """The bound check can fail: pyramid attention broadcast with diffusers' own decision (inside the attention's
    forward, from the hook's iteration count and the timestep: what tokred ran before it moved the decision to a
    pre-hook) compiles a frame at every step, also late in the generation."""
    from diffusers.hooks.pyramid_attention_broadcast import PyramidAttentionBroadcastHook

    from tokred.methods import diffusers_caches

    decided = diffusers_caches._decided_broadcast_hook()

    class DecidingInside(decided):
        def new_forward(self, module, *args, **kwargs):
            return PyramidAttentionBroadcastHook.new_forward(self, module, *args, **kwargs)

    monkeypatch.setattr(diffusers_caches, "_decided_broadcast_hook", lambda: DecidingInside)
    eager, compiled, frames = frames_by_step("pixart", "pab", 4)
    assert max_relative_difference(eager, compiled) <= RTOL
    assert frames[3] > frames[1]


def test_a_compiled_threshold_count_of_zero_merges_nothing_on_the_grid(monkeypatch):
    """CA-ToMe's compiled grid merge takes its count at run time: a count of 0 (eager: no merge at all) is a merge of 0
    pairs, which reorders the tokens for the sublayer and puts them back after it; cached, the same tensors give the
    same merge again. The path runs here outside dynamo, with the compile-time branch forced."""
    from tokred.merge import grid_destinations, grid_matching, grid_merge_of, threshold_grid_matching

    x = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))
    a_idx, b_idx = grid_destinations(8, 8, 2, 2, None, torch.device("cpu"))
    assert grid_matching(x, a_idx, b_idx, threshold=1.5) is None  # eager: nothing reaches 1.5
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch, "_check", lambda *args, **kwargs: None)
    none = grid_merge_of(threshold_grid_matching(x, a_idx, b_idx, 1.5))
    assert none.r == 0 and not torch.equal(none(x), x)  # reordered ...
    assert torch.equal(none.unmerge(none(x)), x)  # ... and restored
    matching = threshold_grid_matching(x, a_idx, b_idx, -1.0)  # every source reaches -1: all 48 merge
    merge, again = grid_merge_of(matching), grid_merge_of(matching)
    assert merge(x).shape[1] == 64 - 48 and torch.equal(merge(x), again(x))
    monkeypatch.undo()
    assert torch.equal(merge(x), grid_matching(x, a_idx, b_idx, threshold=-1.0)(x))  # eager's merge


@pytest.mark.parametrize("case_name,method", [("sd15", "tome"), ("pixart", "todo")], ids=lambda v: v)
def test_a_paused_patch_compiles_with_fullgraph_to_the_unpatched_model(case_name, method):
    """The compiled benchmarks time the baseline with the method's patch paused (``Patch.pause``) in the same
    compiled module: a paused replaced forward runs the class's own forward, which dynamo traces under
    ``fullgraph=True`` (it could not trace the ``type(module).forward`` that reached it: "Dynamo does not know how to
    trace method `forward` of class `type`", every SD1.5 compiled case skipped), and gives the unpatched model's
    outputs; resumed, the method's."""
    torch._dynamo.reset()
    case = small_sd15() if case_name == "sd15" else CASES[case_name]()
    unpatched = generate(case.build(), case, 2)
    eager_model = case.build()
    tokred.apply(eager_model, method, **METHODS[method])
    eager = generate(eager_model, case, 2)
    model = case.build()
    patch = tokred.apply(model, method, **METHODS[method])
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with patch.paused():
        paused = generate(compiled, case, 2)
    assert max_relative_difference(unpatched, paused) <= RTOL
    assert max_relative_difference(eager, generate(compiled, case, 2)) <= RTOL
    assert counter.frame_count <= COMPILE_BOUND
