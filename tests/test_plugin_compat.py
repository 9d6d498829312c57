"""Plugins written against earlier documented interfaces keep working, with a DeprecationWarning naming the
replacement (the rule of CHANGELOG.md: a removed or renamed public name works for at least one minor version).

* tokred 0.2 (README "Usage": ``patch.state.call["size"]``; the adapters' ``install_merging_blocks`` with
  ``choose(layer_index, metric, num_protected)``, ``DiffusersUNetAdapter.grid(latent_size, n)``,
  ``install_planned_blocks(patch, planner(block, hidden_states))`` and ``SublayerPlan`` / ``BlockPlan`` from
  ``tokred.adapters.diffusers_unet``);
* the README before 0.3 ("Adapters and reduction points": ``TimmViTAdapter.install_merging(patch, choose)`` with
  ``choose(call, metric)``).

Each plugin below is written as its README told, registered like a third-party method, and must compute what
the built-in ``tome`` computes, bit-exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

import tokred
from tokred import Method
from tokred.options import int_at_least, number_in, option


@dataclass
class KOptions:
    r: int = option(3, valid="int >= 0", check=int_at_least(0))


class PluginV02ViT(Method):
    """tokred 0.2: install_merging_blocks, choose(layer_index, metric, num_protected)."""

    options = {"timm_vit": KOptions}

    def install(self, patch) -> None:
        from tokred.merge import alternate_matching

        r = self.options.r

        def choose(index, metric, num_protected):
            return alternate_matching(metric, r, num_protected)

        patch.adapter.install_merging_blocks(patch, choose, prop_attn=True, trace_source=False)


class PluginReadme02ViT(Method):
    """The README before 0.3: install_merging(patch, choose(call, metric))."""

    options = {"timm_vit": KOptions}

    def install(self, patch) -> None:
        from tokred.merge import alternate_matching

        r, p = self.options.r, patch.adapter.num_protected
        patch.adapter.install_merging(patch, lambda call, metric: alternate_matching(metric, r, p))


class PluginCurrentViT(Method):
    """The README's current interface (0.3): install_blocks with BlockPlan(tokens=TokenReduce(...))."""

    options = {"timm_vit": KOptions}

    def install(self, patch) -> None:
        from tokred.merge import alternate_matching
        from tokred.reduction import FULL_BLOCK, BlockPlan, TokenReduce

        r = self.options.r
        patch.adapter.install_blocks(patch, lambda call, x: BlockPlan(tokens=TokenReduce(lambda s:
            alternate_matching(s.keys, r, s.num_protected))) if call.index == 0 else FULL_BLOCK)  # fmt: skip


@dataclass
class RatioOptions:
    ratio: float = option(0.5, valid="0 <= ratio <= 0.75", check=number_in(0.0, 0.75))


class PluginV02UNet(Method):
    """tokred 0.2's U-Net interface: grid(latent_size, n), install_planned_blocks, SublayerPlan/BlockPlan."""

    options = {"diffusers_unet": RatioOptions}

    def install(self, patch) -> None:
        from tokred.adapters.diffusers_unet import FULL_BLOCK, BlockPlan, SublayerPlan
        from tokred.merge import grid_destinations, grid_matching

        adapter, state, ratio = patch.adapter, patch.state, self.options.ratio

        def planner(block, x):
            grid = adapter.grid(state.latent_size, x.shape[1])
            r = int(x.shape[1] * ratio)
            if grid is None or grid[2] != 1 or r <= 0:
                return FULL_BLOCK
            h, w, _ = grid
            a_idx, b_idx = grid_destinations(h, w, 2, 2, None, x.device)
            merge = grid_matching(x, a_idx, b_idx, r=r)
            return BlockPlan(attn=SublayerPlan(merge, merge.unmerge))

        adapter.install_planned_blocks(patch, planner)


@pytest.fixture
def plugins(monkeypatch):
    registry = tokred.registry.methods
    registry.names()
    monkeypatch.setattr(registry, "_items", dict(registry._items))
    for name, cls in (("v02_vit", PluginV02ViT), ("readme02_vit", PluginReadme02ViT), ("v02_unet", PluginV02UNet),
                      ("current_vit", PluginCurrentViT)):  # fmt: skip
        registry.register(name)(cls)


def run_vit(model, method, x, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tokred.apply(model, method, **options) as patch, torch.no_grad():
            out = model(x)
            legacy = patch.state.call if method == "v02_vit" else None
    return out, legacy, [w for w in caught if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("method, replacement", [("v02_vit", "install_blocks"), ("readme02_vit", "install_blocks")])
def test_vit_plugins_of_earlier_versions_work_and_warn(tiny_vit, plugins, method, replacement):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), tokred.apply(tiny_vit, "tome", r=3) as patch:
        expected = tiny_vit(x)
        size = patch.adapter.merged_tokens.size
    out, legacy, deprecations = run_vit(tiny_vit, method, x, r=3)
    assert torch.equal(out, expected)
    assert deprecations and all(replacement in str(w.message) for w in deprecations[:1])
    if legacy is not None:  # tokred 0.2's README: patch.state.call["size"]
        assert torch.equal(legacy["size"], size)
        assert any("merged_tokens" in str(w.message) for w in deprecations)


def test_the_current_interface_warns_nothing(tiny_vit, plugins):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), tokred.apply(tiny_vit, "tome", r=[3], prop_attn=False):  # install_blocks: prop_attn off
        expected = tiny_vit(x)
    out, _, deprecations = run_vit(tiny_vit, "current_vit", x, r=3)
    assert torch.equal(out, expected) and not deprecations


def test_unet_plugin_of_tokred_02_works_and_warns(plugins):
    from tiny_models import tiny_sd_unet

    unet = tiny_sd_unet()
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)

    def denoise():
        with torch.no_grad():
            return [unet(sample, t, encoder_hidden_states=text).sample for t in (900, 500)]

    with tokred.apply(unet, "tome", ratio=0.5, use_rand=False, max_downsample=1):
        expected = denoise()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tokred.apply(unet, "v02_unet", ratio=0.5):
            got = denoise()
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    for old, new in (("SublayerPlan", "tokred.reduction.Sublayer"), ("grid(latent_size, n)", "call.grid"),
                     ("install_planned_blocks", "install_blocks")):  # fmt: skip
        assert any(old in m and new in m for m in messages), (old, messages)


def test_grid_alias_keeps_the_02_rule():
    from tokred.adapters.diffusers_unet import DiffusersUNetAdapter

    with pytest.warns(DeprecationWarning, match="call.grid"):
        assert DiffusersUNetAdapter.grid((64, 64), 64 * 64) == (64, 64, 1)
    with pytest.warns(DeprecationWarning):
        assert DiffusersUNetAdapter.grid((63, 65), 32 * 33) == (32, 33, 2)
    with pytest.warns(DeprecationWarning):
        assert DiffusersUNetAdapter.grid((64, 64), 1000) is None
