"""torch.compile after tokred.apply (issue 20): the inference-mode regression first.

``torch.compile(vit)`` after ``tokred.apply(vit, "tome")`` failed under ``torch.no_grad()`` and
``torch.inference_mode()`` with ``TorchRuntimeError`` from the one-buffer weighted merge's ``gather(..., out=)`` on
a strided view; while compiling, the merge now takes an out-of-place twin of the same arithmetic
(``BipartiteMerge._weighted_mean_functional``). ``aot_eager`` exercises dynamo's tracing (where it failed) without
a C++ toolchain, so this stays fast.
"""

from __future__ import annotations

import pytest
import torch

import tokred
from tokred.merge import alternate_matching

timm = pytest.importorskip("timm")


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3).eval()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("method,options", [("tome", {"r": 4}), ("ca_tome", {})])
def test_a_patched_vit_compiles_for_inference_and_matches_eager(mode, method, options):
    torch._dynamo.reset()
    model = tiny_vit()
    tokred.apply(model, method, **options)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)  # a graph break raises
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_size", [False, True])
@pytest.mark.parametrize("protected", [1, 2])
def test_the_compile_path_of_the_weighted_merge_is_the_eager_arithmetic(monkeypatch, with_size, protected):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 8, generator=g)
    size = torch.randint(1, 4, (3, 17, 1), generator=g).float() if with_size else None
    merge = alternate_matching(x, 5, num_protected=protected)
    eager, eager_size = merge.weighted_mean(x, size)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    twin, twin_size = merge.weighted_mean(x, size)
    assert torch.equal(twin_size, eager_size)
    assert torch.allclose(twin, eager, rtol=0, atol=1e-6)
    weights = torch.ones_like(x[..., :1]) if size is None else size  # ToMe's formula: merge(x * s) / merge(s)
    assert torch.allclose(twin, merge(x * weights, mode="sum") / merge(weights, mode="sum"), atol=1e-6)
