"""Issue 21, the method items: CAT pruning under autograd, CAT's warning for generations too short to prune outside
pipelines, grid-merging strides larger than the token grid, and ToMe/ToDo on a meta model materialised later."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import tiny_sd_pipeline, tiny_sd_unet
from tiny_sd3 import sd3_denoise, tiny_sd3_transformer

import tokred
from tokred.methods.cat_pruning import CatNoPruningWarning
from tokred.methods.tome import StrideTooLargeWarning

TIMESTEPS = (900, 800, 700, 600)
TOP_BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"


def unet_inputs(batch=2, latent=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, latent, latent, generator=g), torch.randn(batch, 77, 32, generator=g)


def unet_generation(unet, steps=3, latent=8):
    """A bare generation without gradients: ``steps`` U-Net calls at decreasing timesteps."""
    sample, text = unet_inputs(latent=latent)
    with torch.no_grad():
        return [unet(sample + 0.1 * i, t, encoder_hidden_states=text).sample for i, t in enumerate(TIMESTEPS[:steps])]


def sd3_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 8, 64, generator=g), torch.randn(2, 64, generator=g)


def sd3_generation(model, steps=4):
    """A bare SD3 generation without gradients: ``steps`` transformer calls at decreasing timesteps."""
    sample, text, pooled = sd3_inputs()
    return sd3_denoise(model, sample, text, pooled, [1000 - 100 * i for i in range(steps)])


def cat_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, CatNoPruningWarning)]


# --- 10. CAT pruning with gradients enabled -----------------------------------------------------------------------
def train_calls(unet, steps=3):
    """``steps`` U-Net calls in train mode with gradients, each followed by backward; the outputs and the
    parameter gradients of the last call."""
    sample, text = unet_inputs()
    outs = []
    for i, t in enumerate(TIMESTEPS[:steps]):
        unet.zero_grad()
        out = unet(sample + 0.1 * i, t, encoder_hidden_states=text).sample
        assert out.requires_grad, f"call {i + 1} lost its gradient"
        out.square().mean().backward()
        outs.append(out.detach())
    return outs, {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_cat_pruning_backward_runs_through_the_recomputed_tokens():
    unet = tiny_sd_unet().train()
    q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight  # used by recomputed rows only
    with tokred.apply(unet, "cat_pruning", t0=2, alpha=0.3) as patch:
        _, grads = train_calls(unet, steps=3)  # calls 1-2 full, 3 pruned
        top = patch.token_counts()[TOP_BLOCK]
        assert top.attn < top.tokens and top.mlp < top.tokens  # the last call was pruned
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    assert grads["conv_in.weight"].abs().sum() > 0


def test_cat_pruning_graphs_of_several_calls_backward_together():
    """The caches keep values only: a loss over a whole generation (calls 1-4, 3 and 4 pruned) backpropagates."""
    unet = tiny_sd_unet().train()
    sample, text = unet_inputs()
    with tokred.apply(unet, "cat_pruning", t0=2, alpha=0.3):
        loss = sum(
            unet(sample + 0.1 * i, t, encoder_hidden_states=text).sample.square().mean()
            for i, t in enumerate(TIMESTEPS)
        )
        loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)


def test_cat_pruning_alpha_one_gradients_equal_the_unpatched_model():
    """alpha=1 recomputes every token through the sparse path: the pruned call's gradients are the model's own."""
    unet = tiny_sd_unet().train()
    base_outs, base = train_calls(unet)
    with tokred.apply(unet, "cat_pruning", t0=2, alpha=1.0) as patch:
        outs, got = train_calls(unet)
        assert patch.method_state.sel_step == 4  # call 3 ran the sparse path
    assert all(torch.equal(a, b) for a, b in zip(base_outs, outs, strict=True))
    assert got.keys() == base.keys()
    for name in base:  # equal up to the summation order of the permuted rows
        assert (got[name] - base[name]).norm() <= 1e-5 * base[name].norm() + 1e-12, name


def test_cat_pruning_sd3_keeps_gradients():
    model = tiny_sd3_transformer().train()
    sample, text, pooled = sd3_inputs()
    with tokred.apply(model, "cat_pruning", t0=2, alpha=0.3) as patch:
        for i, t in enumerate(TIMESTEPS[:3]):
            model.zero_grad()
            out = model(hidden_states=sample + 0.1 * i, encoder_hidden_states=text, pooled_projections=pooled,
                        timestep=torch.full((2,), float(t))).sample
            assert out.requires_grad
            out.square().mean().backward()
        assert patch.method_state.sel_step == 4
    to_q = model.transformer_blocks[0].attn.to_q.weight
    assert torch.isfinite(to_q.grad).all() and to_q.grad.abs().sum() > 0


# --- 12./13. CatNoPruningWarning outside pipelines ----------------------------------------------------------------
def test_cat_warns_when_a_bare_unet_loop_is_too_short_to_prune():
    unet = tiny_sd_unet()
    patch = tokred.apply(unet, "cat_pruning", t0=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatNoPruningWarning)
        unet_generation(unet, steps=3)  # a bare loop does not know it ends here
    with pytest.warns(CatNoPruningWarning, match=r"a generation made 3 denoiser calls, at most t0=50, so nothing was"):
        patch.remove()


def test_cat_warns_once_per_short_generation_when_the_next_one_starts():
    unet = tiny_sd_unet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch = tokred.apply(unet, "cat_pruning", t0=50)
        unet_generation(unet, steps=3)
        assert cat_warnings(caught) == []
        unet_generation(unet, steps=2)  # the timestep rose: the first generation ended with 3 calls
        assert len(cat_warnings(caught)) == 1 and "made 3 denoiser calls, at most t0=50" in cat_warnings(caught)[0]
        patch.remove()  # the second one ends with the patch
        assert len(cat_warnings(caught)) == 2 and "made 2 denoiser calls" in cat_warnings(caught)[1]
        assert "at least 3 denoiser calls" in cat_warnings(caught)[1]  # no t0 prunes a 2-call generation


def test_cat_warns_for_a_short_sd3_loop():
    model = tiny_sd3_transformer()
    patch = tokred.apply(model, "cat_pruning", t0=10)
    sd3_generation(model, steps=4)
    with pytest.warns(CatNoPruningWarning, match=r"made 4 denoiser calls, at most t0=10"):
        patch.remove()


@pytest.mark.parametrize("family", ["unet", "sd3"])
def test_cat_does_not_warn_when_it_prunes(family):
    model = tiny_sd_unet() if family == "unet" else tiny_sd3_transformer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatNoPruningWarning)
        with tokred.apply(model, "cat_pruning", t0=2) as patch:
            if family == "unet":
                unet_generation(model, steps=4)
                unet_generation(model, steps=4)
            else:
                sd3_generation(model, steps=4)
                sd3_generation(model, steps=4)
            assert patch.method_state.sel_step == 5  # calls 3 and 4 pruned


def test_cat_pipeline_warning_is_not_repeated_when_the_generation_ends():
    pipe = tiny_sd_pipeline()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tokred.apply(pipe, "cat_pruning", t0=4):
            pipe("a cube", num_inference_steps=4, height=32, width=32, output_type="latent")
            pipe("a cube", num_inference_steps=6, height=32, width=32, output_type="latent")
    found = cat_warnings(caught)
    assert len(found) == 1 and "this generation makes 4 denoiser calls, at most t0=4" in found[0]


# --- 14. strides larger than the token grid ---------------------------------------------------------------------
def reduced(counts):
    """Some block computed a sublayer (or its keys/values) on fewer tokens than entered it."""
    return any(min(c.attn, c.kv, c.mlp) < c.tokens for c in counts.values())


@pytest.mark.parametrize("method", ["tome", "ca_tome"])
def test_stride_larger_than_the_grid_warns_once(method):
    unet = tiny_sd_unet()
    with tokred.apply(unet, method, sx=100, sy=100) as patch:
        with pytest.warns(StrideTooLargeWarning, match=rf"{method}: .*sx=100, sy=100 exceeds the 16x16 token grid"):
            unet_generation(unet, steps=1, latent=16)
        assert not reduced(patch.token_counts())
        with warnings.catch_warnings():
            warnings.simplefilter("error", StrideTooLargeWarning)
            unet_generation(unet, steps=1, latent=16)  # once per patch
    assert issubclass(StrideTooLargeWarning, tokred.TokredWarning) and issubclass(StrideTooLargeWarning, UserWarning)


@pytest.mark.parametrize("method", ["tome", "ca_tome"])
def test_stride_larger_than_the_sd3_patch_grid_warns(method):
    model = tiny_sd3_transformer()
    with tokred.apply(model, method, sx=1, sy=9) as patch:
        with pytest.warns(StrideTooLargeWarning, match=r"sx=1, sy=9 exceeds the 8x8 token grid"):
            sd3_generation(model, steps=1)
        assert not reduced(patch.token_counts())


@pytest.mark.parametrize("method, options", [("tome", {}), ("ca_tome", {"threshold": 0.0}),
                                             ("tome", {"sx": 4, "sy": 4, "max_downsample": 8})])
def test_strides_that_fit_some_grid_do_not_warn(method, options):
    """Default strides; and 4x4 strides on 16x16 latents, too large for the 2x2 grid of level 8 but not for the
    top level's 16x16: some blocks merge, so there is nothing to warn about."""
    unet = tiny_sd_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("error", StrideTooLargeWarning)
        with tokred.apply(unet, method, **options) as patch:
            unet_generation(unet, steps=1, latent=16)
            assert reduced(patch.token_counts())


# --- the meta device: ToMe and ToDo plan on shapes and work once the model is materialised -------------------------
@pytest.mark.parametrize("method", ["tome", "todo"])
def test_meta_unet_patched_then_materialised_equals_the_real_one(method):
    real = tiny_sd_unet()
    with torch.device("meta"):
        meta = tiny_sd_unet()
    patch = tokred.apply(meta, method, seed=0)
    meta.to_empty(device="cpu")
    meta.load_state_dict(real.state_dict())
    torch.manual_seed(0)
    got = unet_generation(meta, steps=2, latent=16)
    assert reduced(patch.token_counts())
    patch.remove()
    with tokred.apply(real, method, seed=0) as real_patch:
        torch.manual_seed(0)
        expected = unet_generation(real, steps=2, latent=16)
        assert real_patch.token_counts().keys() == patch.token_counts().keys()
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(got, unet_generation(real, steps=2, latent=16), strict=True))
