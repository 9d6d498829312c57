"""Every ViT method under ``torch.compile(vit, fullgraph=True)`` (issue 20): one graph, eager's output, few compiles.

For each registered method that supports timm ViTs (read from the registry, so a new method is tested when it is
registered), on a tiny three-block timm ViT: ``fullgraph=True`` compiles (a graph break raises), the compiled
output equals eager within 1e-5 relative on every call, dynamo counts no graph break, and five calls at two batch
sizes compile at most ``MAX_COMPILES`` graphs (the first batch size static, the second one dynamic), so nothing a
method keeps between calls (token counters, plans, sizes) is baked into a guard. ``aot_eager`` runs dynamo's
tracing and AOT autograd's functionalisation, where the ViT paths failed, without a C++ toolchain.

CA-ToMe's merge count comes from a similarity threshold: under compile it is a size known only at run time (an
unbacked SymInt), so counts of 0 and more run through the same graph.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tokred  # noqa: E402
from tokred.registry import get_method, list_methods  # noqa: E402

timm = pytest.importorskip("timm")
import torch._dynamo.testing  # noqa: E402
from tiny_models import tiny_timm_vit  # noqa: E402

FAMILY = "timm_vit"
MAX_COMPILES = 2  # one graph per batch size at most: static for the first, dynamic for the second
RTOL = 1e-5
BATCHES = (2, 2, 2, 3, 3)  # five calls, two batch sizes

# Options that make each method reduce on the tiny ViT (three blocks, 16 patch tokens, random weights); a method
# not listed runs at its defaults. CA-ToMe at 0.4 merges counts that differ between blocks and calls, 0 included:
# over the five calls (per block) 0 1 0, 0 1 0, 0 0 2, 0 1 0, 0 0 0, so the compiled graph's count of 0 (tokens kept
# in their order) and the merges after it are checked against eager.
CASES: dict[str, dict[str, Any]] = {
    "tome": {"r": 4},
    "ca_tome": {"threshold": 0.4},
    "evit": {"drop_loc": (1,), "keep_rate": 0.5},
    "tofu": {"r": 4},
    "pitome": {"r": 4},
    "mctf": {"r": 4},
}


def vit_methods() -> list[str]:
    return [name for name in list_methods() if FAMILY in get_method(name).families()]


def tiny_vit() -> torch.nn.Module:
    return tiny_timm_vit("vit_tiny_patch16_224", img_size=64, patch_size=16, embed_dim=192, depth=3, num_heads=3)


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def reduces(patch: Any) -> bool:
    """Whether some block of the last eager call passed fewer tokens on than it took in."""
    counts = patch.token_counts()
    return any(c.mlp < c.tokens for c in counts.values()) or len({c.tokens for c in counts.values()}) > 1


def relative_difference(compiled: torch.Tensor, eager: torch.Tensor) -> float:
    return float((compiled - eager).abs().max() / eager.abs().max().clamp_min(1e-12))


def compile_and_compare(model: torch.nn.Module, inputs: list[torch.Tensor]) -> tuple[int, float]:
    """Compile ``model`` with ``fullgraph=True`` and run it on each input, beside eager (under the caller's grad
    mode); returns the number of graphs compiled and the largest relative difference. A graph break raises."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    worst = 0.0
    for x in inputs:
        eager = model(x)
        worst = max(worst, relative_difference(compiled(x), eager))
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, f"graph breaks: {breaks}"
    return backend.frame_count, worst


@pytest.mark.parametrize("method", vit_methods())
def test_a_vit_method_compiles_as_one_graph_matches_eager_and_does_not_recompile(method):
    model = tiny_vit()
    patch = tokred.apply(model, method, **CASES.get(method, {}))
    inputs = [images(b, seed) for seed, b in enumerate(BATCHES)]
    with torch.no_grad():
        model(inputs[0])
        assert reduces(patch), patch.token_counts()  # the compiled graph has reductions to get right
        compiles, worst = compile_and_compare(model, inputs)
    assert worst <= RTOL, f"{method}: compiled differs from eager by {worst:.3g} (relative)"
    assert compiles <= MAX_COMPILES, f"{method}: {compiles} compilations over {len(inputs)} calls"


# CA-ToMe's compile is the slowest (its run-time counts); tests/test_compile.py compiles it under inference_mode
@pytest.mark.parametrize("method", [name for name in vit_methods() if name != "ca_tome"])
def test_a_vit_method_compiles_under_inference_mode(method):
    model = tiny_vit()
    tokred.apply(model, method, **CASES.get(method, {}))
    with torch.inference_mode():
        compiles, worst = compile_and_compare(model, [images(2, 0), images(2, 1)])
    assert worst <= RTOL
    assert compiles == 1


@pytest.mark.parametrize("method", vit_methods())
def test_every_vit_method_states_its_compile_support(method):
    # the value the coverage documentation shows; "fullgraph" is what the tests above check
    support = get_method(method).compile_support_for(FAMILY)
    assert support == "fullgraph" or (support or "").startswith(("island: ", "no: ")), (method, support)


# --- the checks above can fail ---------------------------------------------------------------------------------------
class _Breaks(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return x * 2


class _CountsCalls(torch.nn.Module):
    """Keeps a Python int that changes at every call and reads it: a guard on its value, a compile per call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.calls


def test_a_graph_break_fails_the_check():
    with pytest.raises(Exception, match="(?i)graph.?break"):
        compile_and_compare(_Breaks(), [torch.ones(2)])


def test_state_baked_into_guards_exceeds_the_compile_bound():
    compiles, worst = compile_and_compare(_CountsCalls(), [torch.ones(2)] * 4)
    assert compiles > MAX_COMPILES


def test_a_data_dependent_count_of_zero_keeps_the_tokens_in_their_order(monkeypatch):
    # eager returns no merge for a count of 0; the compiled path's 0-pair merge must give the tokens back unchanged
    from tokred.merge import alternate_matching

    x = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(0))
    size = torch.rand(2, 9, 1) + 1
    assert alternate_matching(x, num_protected=1, threshold=1.5) is None  # eager: nothing reaches 1.5
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch, "_check", lambda *args, **kwargs: None)
    merge = alternate_matching(x, num_protected=1, threshold=1.5)
    merged, merged_size = merge.reduce(x, size)
    assert torch.equal(merged, x) and torch.equal(merged_size, size)
    some = alternate_matching(x, num_protected=1, threshold=-1.0)
    assert some.reduce(x, None)[0].shape[1] == 9 - 4


def test_ca_tome_compiles_past_three_merges_with_a_nonzero_token_count():
    """The DeiT-S failure (issue 20): after three run-time merges the token count's expression (a floor division and
    a min per block) could not be proven nonzero, and attention's check for empty sequences stopped the compile with
    a data-dependent guard. Each merge now narrows the tokens to a count of its own (an unbacked size >= 1). Four
    blocks and 65 tokens failed as DeiT-S did (``aot_eager`` runs the same fake-tensor tracing as inductor)."""
    model = tiny_timm_vit("deit_small_patch16_224", img_size=32, patch_size=4, depth=4, embed_dim=48)
    patch = tokred.apply(model, "ca_tome", threshold=0.3)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
        assert len({c.tokens for c in patch.token_counts().values()}) == 4  # blocks 1-3 merge before block 4
        compiles, worst = compile_and_compare(model, [x])
    assert compiles == 1
    assert worst <= RTOL
