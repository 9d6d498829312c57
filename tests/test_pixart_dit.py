"""PixArt-α/Σ and DiT (the ``diffusers_dit`` family): every method's cell on tiny configurations of the real
classes, alone and inside ``PixArtSigmaPipeline`` / ``PixArtAlphaPipeline`` / ``DiTPipeline``."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_dit import (
    TEXT_WIDTH,
    dit_denoise,
    pixart_denoise,
    pixart_prompt,
    tiny_dit_pipeline,
    tiny_dit_transformer,
    tiny_pixart_pipeline,
    tiny_pixart_transformer,
)

import tokred
from tokred.adapters import resolve_adapter
from tokred.errors import InvalidOptionError, UnsupportedModelError

TIMESTEPS = (900, 800, 700, 600)
N = 64  # image tokens of a 16x16 latent on the 2x2 patch grid


def build(model: str):
    return tiny_dit_transformer() if model == "dit" else tiny_pixart_transformer(alpha=model == "alpha")


def run(model_name: str, model: torch.nn.Module, timesteps=TIMESTEPS) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(2, 4, 4, 4, generator=g)
    sample = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear") + 0.1 * torch.randn(
        2, 4, 16, 16, generator=g
    )
    if model_name == "dit":
        return torch.stack(dit_denoise(model, sample, torch.tensor([3, 1000]), timesteps))
    text = torch.randn(2, 6, TEXT_WIDTH, generator=g)
    return torch.stack(pixart_denoise(model, sample, text, timesteps))


MODELS = ("sigma", "alpha", "dit")


@pytest.fixture(scope="module")
def models():
    out = {}
    for name in MODELS:
        model = build(name)
        out[name] = (model, run(name, model))
    return out


# --- the adapter -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_adapter_finds_the_blocks_on_the_patch_grid(models, name):
    model, _ = models[name]
    adapter = resolve_adapter(model)
    assert adapter.family == "diffusers_dit"
    assert [n for n, _ in adapter.blocks] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert adapter.grid((16, 16), N).h == 8 and adapter.grid((16, 16), N + 1) is None
    assert adapter.has_cross_attention == (name != "dit")


def test_pipelines_resolve_to_their_transformer():
    for pipe in (tiny_pixart_pipeline(), tiny_pixart_pipeline(alpha=True), tiny_dit_pipeline()):
        adapter = resolve_adapter(pipe)
        assert adapter.family == "diffusers_dit" and adapter.root is pipe.transformer and adapter.container is pipe


def test_a_block_with_its_own_forward_is_refused():
    from diffusers.models.attention import BasicTransformerBlock

    class Custom(BasicTransformerBlock):
        def forward(self, hidden_states, *args, **kwargs):
            return super().forward(hidden_states, *args, **kwargs)

    model = tiny_pixart_transformer()
    model.transformer_blocks[1].__class__ = Custom
    with pytest.raises(UnsupportedModelError, match="Custom, a BasicTransformerBlock with its own forward"):
        tokred.apply(model, "tome")
    assert tokred.get_patch(model) is None


# --- every method: runs, deterministic, fewer tokens, remove() exact --------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method,options", [
    ("tome", {}), ("tome", {"merge_crossattn": True, "merge_mlp": True}), ("ca_tome", {}),
    ("ca_tome", {"batch_independent": True, "threshold": 0.0}), ("todo", {}), ("todo", {"downsample_method": "area"}),
    ("cat_pruning", {"t0": 2}), ("cat_pruning", {"t0": 2, "alpha": 0.5}),
])  # fmt: skip
def test_cell_runs_deterministically_reduces_and_removes_exactly(models, name, method, options):
    model, baseline = models[name]
    if name == "dit" and options.get("merge_crossattn"):
        options = {k: v for k, v in options.items() if k != "merge_crossattn"}
    patch = tokred.apply(model, method, **options)
    first = run(name, model)
    counts = patch.token_counts()
    second = run(name, model)
    patch.remove()
    assert torch.equal(first, second)
    assert not torch.equal(first, baseline)
    assert torch.equal(run(name, model), baseline)
    assert not [n for n, m in model.named_modules() if "forward" in vars(m)]
    c = counts["transformer_blocks.0"]
    assert c.calls == len(TIMESTEPS) * (2 if options.get("batch_independent") else 1)  # one record per row
    assert (c.cross is None) == (name == "dit")
    if method == "tome":
        assert c.attn == c.kv == N - N // 2
        assert c.mlp == (N - N // 2 if options.get("merge_mlp") else N)
        if name != "dit":
            assert c.cross == (N - N // 2 if options.get("merge_crossattn") else N)
    elif method == "todo":
        assert (c.attn, c.kv, c.mlp) == (N, N // 4, N)
    elif method == "ca_tome":
        assert c.attn < N and c.mlp == N
    elif method == "cat_pruning":
        pruned = int(options["alpha"] * N) if "alpha" in options else int(0.3 * N)
        # calls 1-2 full, 3-4 pruned: the average over the four calls
        assert c.attn == c.mlp == (2 * N + 2 * pruned) / 4 and c.kv == N
        if name != "dit":
            assert c.cross == c.attn


ZERO = {"tome": {"ratio": 0.0}, "ca_tome": {"threshold": 1.0}, "todo": {"downsample_factor": 1},
        "cat_pruning": {"t0": 2, "alpha": 1.0}}  # fmt: skip


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", sorted(ZERO))
def test_zero_strength_is_bit_exact(models, name, method):
    model, baseline = models[name]
    with tokred.apply(model, method, **ZERO[method]):
        assert torch.equal(run(name, model), baseline)


# --- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_deepcache_is_refused_with_its_reason(models, name):
    model, baseline = models[name]
    with pytest.raises(UnsupportedModelError, match="does not support diffusers_dit models \\(U-Net only"):
        tokred.apply(model, "deepcache")
    assert tokred.get_patch(model) is None and torch.equal(run(name, model), baseline)


@pytest.mark.parametrize("method", ["tome", "ca_tome"])
def test_cross_attention_alone_is_refused_on_dit_and_merges_on_pixart(models, method):
    with pytest.raises(InvalidOptionError, match="none of the selected blocks has cross-attention"):
        tokred.apply(models["dit"][0], method, merge_attn=False, merge_crossattn=True)
    model = models["sigma"][0]
    with tokred.apply(model, method, merge_attn=False, merge_crossattn=True, threshold=0.0) if method == "ca_tome" \
            else tokred.apply(model, method, merge_attn=False, merge_crossattn=True) as patch:
        run("sigma", model)
        c = patch.token_counts()["transformer_blocks.0"]
        assert c.cross < N and c.attn == c.kv == c.mlp == N


def test_unknown_options_and_u_net_levels_are_refused(models):
    model = models["sigma"][0]
    with pytest.raises(InvalidOptionError, match="max_downsample"):
        tokred.apply(model, "tome", max_downsample=2)
    with pytest.raises(InvalidOptionError, match="ratio"):
        tokred.apply(model, "tome", ratio=0.9)


@pytest.mark.parametrize("method", ["todo", "cat_pruning"])
def test_fused_projections_are_refused_for_key_value_methods(method):
    model = tiny_pixart_transformer()
    model.fuse_qkv_projections()
    with pytest.raises(UnsupportedModelError, match="separate to_k/to_v"):
        tokred.apply(model, method)
    assert tokred.get_patch(model) is None


def test_cat_pruning_needs_values():
    model = copy.deepcopy(tiny_dit_transformer()).to("meta")
    with pytest.raises(UnsupportedModelError, match="meta device"):
        tokred.apply(model, "cat_pruning")


# --- pipelines: same seed, same image; different from the baseline ---------------------------------------------------
def pixart_image(pipe, seed: int = 0) -> torch.Tensor:
    out = pipe(num_inference_steps=5, guidance_scale=4.5, height=32, width=32, use_resolution_binning=False,
               negative_prompt=None, generator=torch.Generator().manual_seed(seed), output_type="pt",
               **pixart_prompt())  # fmt: skip
    return out.images


def dit_image(pipe, seed: int = 0) -> torch.Tensor:
    out = pipe(class_labels=[3, 7], num_inference_steps=5, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(seed), output_type="np")  # fmt: skip
    return torch.from_numpy(out.images)


@pytest.mark.parametrize("kind", ["sigma", "alpha", "dit"])
@pytest.mark.parametrize("method,options", [("tome", {}), ("ca_tome", {}), ("todo", {}), ("cat_pruning", {"t0": 2})])
def test_pipeline_same_seed_same_image_and_differs_from_baseline(kind, method, options):
    pipe = tiny_dit_pipeline() if kind == "dit" else tiny_pixart_pipeline(alpha=kind == "alpha")
    image = dit_image if kind == "dit" else pixart_image
    baseline = image(pipe)
    with tokred.apply(pipe, method, **options) as patch:
        first, second = image(pipe), image(pipe)
        assert patch.state.generation == 2 and patch.state.step == 5
        counts = patch.token_counts()["transformer_blocks.0"]
    assert torch.equal(first, second)
    assert not torch.equal(first, baseline)
    assert counts.attn < counts.tokens or counts.kv < counts.tokens
    assert torch.equal(image(pipe), baseline)


# --- the FLOPs figures' script -----------------------------------------------------------------------------------
def test_flops_script_counts_every_method_below_the_baseline():
    """benchmarks/dit_flops.py on DiT-XL/2's full width, one and two blocks, at 64 px (8x8 latents, 16 tokens)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dit_flops.py"
    spec = importlib.util.spec_from_file_location("dit_flops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    one, two = module.counts("dit_xl2", 64, 1), module.counts("dit_xl2", 64, 2)
    assert set(one) == {"baseline", "tome", "ca_tome", "todo", "cat_pruning"}
    block = {k: two[k] - one[k] for k in one}  # one block's FLOPs: what the extrapolation multiplies
    assert all(0 < block[m] < block["baseline"] for m in ("tome", "todo", "cat_pruning"))
    assert block["ca_tome"] <= block["baseline"]
