"""SDXL: every method on the SDXL U-Net and StableDiffusionXLPipeline acts at the default level (2: SDXL has no
attention at full resolution); CAT pruning prunes that level and leaves the noise output alone; refiner-style
calls (``denoising_end`` on the base pipeline, then ``StableDiffusionXLImg2ImgPipeline`` with ``denoising_start``);
explicit levels that select nothing are refused."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_sd_unet
from tiny_sdxl import TEXT_WIDTH, sdxl_added_cond, tiny_sdxl_img2img, tiny_sdxl_pipeline, tiny_sdxl_unet

import tokred
from tokred.errors import InvalidOptionError

METHODS = [m for m in tokred.list_methods() if "diffusers_unet" in tokred.get_method(m).options]
# CAT: t0=2 so that a 4-step generation prunes its calls 3 and 4. CA-ToMe: on random weights and white-noise
# latents the SDXL blocks' inputs are rarely 0.7-similar (the paper's threshold, for trained SD1.5 features),
# so the pipeline tests use 0.5, where it merges.
OPTIONS = {"cat_pruning": {"t0": 2}, "ca_tome": {"threshold": 0.5}}
TIMESTEPS = (900, 800, 700)
PROMPT = ["a red cube"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def unet():
    return tiny_sdxl_unet()


def unet_calls(unet, latent=16, batch=2, steps=TIMESTEPS):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, latent, latent, generator=g)
    text = torch.randn(batch, 77, 2 * TEXT_WIDTH, generator=g)
    added = sdxl_added_cond(batch, 8 * latent, 8 * latent)
    with torch.no_grad():
        return [unet(sample + 0.1 * i, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
                for i, t in enumerate(steps)]


def generate(pipe, steps=4, **kwargs):
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=5.0, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def level_blocks(patch, level):
    return {name for name, lvl in patch.adapter.level.items() if lvl == level}


def reduced(c):
    return min(c.attn, c.kv, c.mlp, c.tokens if c.cross is None else c.cross) < c.tokens


# --- the default level ---------------------------------------------------------------------------------------------
def test_sdxl_levels_and_default(unet):
    patch = tokred.apply(unet, "tome")
    try:
        assert patch.adapter.levels() == [2, 4] and patch.adapter.default_level() == 2
    finally:
        patch.remove()


@pytest.mark.parametrize("method", METHODS)
def test_pipeline_same_seed_differs_from_baseline_and_remove_is_exact(pipe, method):
    base = generate(pipe)
    patch = tokred.apply(pipe, method, **OPTIONS.get(method, {}))
    try:
        first = generate(pipe)
        counts = patch.token_counts()
        second = generate(pipe)
        level2 = level_blocks(patch, 2)
    finally:
        patch.remove()
    assert (first == second).all()
    assert not (first == base).all()
    assert (generate(pipe) == base).all() and tokred.get_patch(pipe) is None
    if tokred.get_method(method).kind in ("cache", "composite"):
        # a cache (alone or composed) skips whole blocks at every level (tests/test_deepcache.py covers SDXL)
        assert any(c.tokens == 0 or reduced(c) for c in counts.values()), counts
        return
    # every block of the default level reduced its tokens (4 calls: CFG batch of 2), none elsewhere was touched
    assert set(counts) == level2 and all(reduced(c) for c in counts.values()), counts


@pytest.mark.parametrize("method", ["tome", "ca_tome", "cat_pruning"])
def test_explicit_level_1_selects_nothing_and_is_refused(unet, method):
    base = unet_calls(unet, steps=TIMESTEPS[:1])
    with pytest.raises(InvalidOptionError, match="max_downsample=1 selects no transformer block.*downsampling 2, 4"):
        tokred.apply(unet, method, max_downsample=1)
    assert tokred.get_patch(unet) is None and torch.equal(unet_calls(unet, steps=TIMESTEPS[:1])[0], base[0])


@pytest.mark.parametrize("method", ["tome", "ca_tome"])
def test_explicit_level_4_merges_both_levels(unet, method):
    with tokred.apply(unet, method, max_downsample=4, **OPTIONS.get(method, {})) as patch:
        unet_calls(unet, steps=TIMESTEPS[:1])
        assert set(patch.token_counts()) == level_blocks(patch, 2) | level_blocks(patch, 4)


# --- CAT pruning on SDXL -------------------------------------------------------------------------------------------
def raw_and_returned(unet, fn):
    """``fn()``'s outputs, and conv_out's own outputs before any patch hook (registered first, runs first)."""
    raw = []
    hook = unet.conv_out.register_forward_hook(lambda m, a, out: raw.append(out.clone()))
    try:
        return raw, fn()
    finally:
        hook.remove()


def test_cat_prunes_level_2_and_leaves_the_noise_output_alone(unet):
    raw, outs = [], []

    def run():
        with tokred.apply(unet, "cat_pruning", t0=2) as patch:
            outs = unet_calls(unet)
            return outs, patch.token_counts(), level_blocks(patch, 2)

    raw, (outs, counts, level2) = raw_and_returned(unet, run)
    assert set(counts) == level2
    assert all(c.attn < c.tokens and c.mlp < c.tokens for c in counts.values())  # call 3 pruned
    assert all(torch.equal(r, o) for r, o in zip(raw, outs, strict=True))  # the U-Net's own noise, every call


def test_cat_replaces_unselected_noise_where_level_1_prunes():
    """The counterpart on SD1.x (level-1 blocks map one-to-one onto the output): the pruned call's output is not
    conv_out's own, so the SDXL test above can tell the two apart."""
    sd1 = tiny_sd_unet()
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)

    def run():
        with tokred.apply(sd1, "cat_pruning", t0=2), torch.no_grad():
            return [sd1(sample + 0.1 * i, t, encoder_hidden_states=text).sample for i, t in enumerate(TIMESTEPS)]

    raw, outs = raw_and_returned(sd1, run)
    assert torch.equal(raw[0], outs[0]) and torch.equal(raw[1], outs[1])
    assert not torch.equal(raw[2], outs[2])


# --- refiner-style calls -------------------------------------------------------------------------------------------
def ensemble(pipe, img2img, split=0.5, steps=6):
    """The ensemble-of-experts flow: the base pipeline denoises up to ``split`` and hands its latents to the
    img2img pipeline, which continues from ``split`` (here on the same U-Net and scheduler)."""
    g = torch.Generator().manual_seed(0)
    latents = pipe(PROMPT, num_inference_steps=steps, denoising_end=split, height=32, width=32, generator=g,
                   output_type="latent").images
    return img2img(PROMPT, image=latents, num_inference_steps=steps, denoising_start=split, generator=g,
                   output_type="np").images


@pytest.mark.parametrize("method", METHODS)
def test_refiner_style_calls(pipe, method):
    img2img = tiny_sdxl_img2img(pipe)
    base = ensemble(pipe, img2img)
    patch = tokred.apply(pipe, method, **OPTIONS.get(method, {}))  # the shared U-Net
    try:
        calls = []
        hook = pipe.unet.register_forward_hook(lambda m, a, o: calls.append((patch.state.generation, patch.state.step)))
        try:
            first = ensemble(pipe, img2img)
        finally:
            hook.remove()
        counts = patch.token_counts()
        second = ensemble(pipe, img2img)
    finally:
        patch.remove()
    assert (first == second).all() and not (first == base).all()
    assert (ensemble(pipe, img2img) == base).all()
    # each pipeline call is a generation of its own, counted from step 1 (timesteps 831, 665 | 499, 333, 167, 1)
    g0 = calls[0][0]
    assert calls == [(g0, 1), (g0, 2), (g0 + 1, 1), (g0 + 1, 2), (g0 + 1, 3), (g0 + 1, 4)]
    assert counts and all(reduced(c) for c in counts.values())
