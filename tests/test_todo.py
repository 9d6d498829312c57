"""ToDo (token downsampling of self-attention keys/values) against an independent implementation.

The reference is written here as diffusers attention processors that downsample the keys/values themselves (by
slicing and reshaping, not through tokred's code) and compute attention eagerly; they are set with
``set_attn_processor`` on the self-attention of exactly the levels ToDo should touch.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from tiny_models import tiny_sd_pipeline, tiny_sd_unet
from tiny_sd3 import tiny_sd3_transformer

import tokred
from tokred.errors import InvalidOptionError, UnsupportedModelError

TIMESTEPS = (900, 500)


# --- the independent implementation ---------------------------------------------------------------------------
def reference_downsample(x: torch.Tensor, h: int, w: int, f: int, method: str) -> torch.Tensor:
    """[B, h*w, C] -> [B, (h//f)*(w//f), C] for sides that ``f`` divides."""
    b, _, c = x.shape
    grid = x.reshape(b, h, w, c)
    if method == "nearest":  # top-left token of each window
        small = grid[:, ::f, ::f]
    elif method == "nearest-exact":  # floor((i + 0.5) * f): the token f // 2 into each window
        small = grid[:, f // 2 :: f, f // 2 :: f]
    else:
        windows = grid.reshape(b, h // f, f, w // f, f, c)
        small = windows.mean(dim=(2, 4)) if method == "area" else windows.amax(dim=(2, 4))
    return small.reshape(b, -1, c)


def eager_attention(q, k, v, heads, scale):
    b, nq, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = ((q @ k.transpose(-1, -2)) * scale).softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(b, nq, c)


class ReferenceToDo:
    """Self-attention of a U-Net block (or an SD3 joint attention) with keys/values from the downsampled grid.

    ``grid()`` returns this layer's (h, w) for the current call (from the latent size a hook records).
    """

    def __init__(self, grid, factor: int, method: str) -> None:
        self.grid, self.factor, self.method = grid, factor, method

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        h, w = self.grid()
        kv = reference_downsample(hidden_states, h, w, self.factor, self.method)
        q, k, v = attn.to_q(hidden_states), attn.to_k(kv), attn.to_v(kv)
        heads, n = attn.heads, hidden_states.shape[1]
        if attn.norm_q is not None:  # SD3.5 qk-norm acts per head
            b, d = q.shape[0], q.shape[-1] // heads
            q = attn.norm_q(q.reshape(b, -1, heads, d)).reshape(b, -1, heads * d)
            k = attn.norm_k(k.reshape(b, -1, heads, d)).reshape(b, -1, heads * d)
        if encoder_hidden_states is not None:  # SD3 joint attention: text tokens join queries, keys and values
            e = encoder_hidden_states
            q = torch.cat([q, attn.add_q_proj(e)], dim=1)
            k = torch.cat([k, attn.add_k_proj(e)], dim=1)
            v = torch.cat([v, attn.add_v_proj(e)], dim=1)
        out = eager_attention(q, k, v, heads, attn.scale)
        image, text = out[:, :n], out[:, n:]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        return image, (text if attn.context_pre_only else attn.to_add_out(text))


def unet_level(name: str) -> int:
    """Downsampling of a U-Net transformer block from its name (4 down blocks, 4 up blocks, mid at 8)."""
    if m := re.match(r"down_blocks\.(\d+)\.", name):
        return 2 ** int(m.group(1))
    if m := re.match(r"up_blocks\.(\d+)\.", name):
        return 2 ** (3 - int(m.group(1)))
    return 8


def set_reference(model, levels, factor, method, patch_size=1):
    """Put ReferenceToDo on the self-attention of the blocks at ``levels``; returns a function undoing it."""
    latent = {}
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: latent.update(hw=(args[0] if args else kwargs["hidden_states"]).shape[-2:]),
        with_kwargs=True,
    )
    saved = dict(model.attn_processors)
    new = dict(saved)
    for name in saved:
        layer = name.rsplit(".", 2)[-2]
        if layer in ("attn1", "attn", "attn2") and (patch_size > 1 or unet_level(name) in levels):
            if layer == "attn2" and patch_size == 1:
                continue  # U-Net attn2 is cross-attention
            level = 1 if patch_size > 1 else unet_level(name)

            def grid(level=level):
                lh, lw = latent["hw"]
                return math.ceil(lh / (level * patch_size)), math.ceil(lw / (level * patch_size))

            new[name] = ReferenceToDo(grid, factor, method)
    model.set_attn_processor(new)

    def undo():
        handle.remove()
        model.set_attn_processor(saved)

    return undo


# --- fixtures and helpers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet():
    return tiny_sd_unet()


def unet_calls(unet, latent=(8, 8), batch=2, steps=TIMESTEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, *latent, generator=g)
    text = torch.randn(batch, 7, 32, generator=g)
    with torch.no_grad():
        return [unet(sample + 0.1 * i, t, encoder_hidden_states=text).sample for i, t in enumerate(steps)]


def sd3_calls(model, batch=2, steps=TIMESTEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample, text, pooled = torch.randn(batch, 16, 16, 16, generator=g), torch.randn(batch, 8, 64, generator=g), \
        torch.randn(batch, 64, generator=g)
    with torch.no_grad():
        return [
            model(hidden_states=sample + 0.1 * i, encoder_hidden_states=text, pooled_projections=pooled,
                  timestep=torch.full((batch,), float(t))).sample
            for i, t in enumerate(steps)
        ]


def assert_all_close(got, expected, atol=1e-5):
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


# --- exactness --------------------------------------------------------------------------------------------------
def test_factor_one_is_bit_exact_and_remove_restores(unet):
    base = unet_calls(unet)
    with tokred.apply(unet, "todo", downsample_factor=1) as patch:
        assert all(torch.equal(a, b) for a, b in zip(base, unet_calls(unet), strict=True))
        assert all(c.kv == c.attn for c in patch.token_counts().values())
    patch = tokred.apply(unet, "todo")
    reduced = unet_calls(unet)
    assert not torch.equal(reduced[0], base[0])
    assert all(torch.equal(a, b) for a, b in zip(reduced, unet_calls(unet), strict=True))  # deterministic
    patch.remove()
    assert all(torch.equal(a, b) for a, b in zip(base, unet_calls(unet), strict=True))


def test_token_counts_keys_values_down_queries_stay(unet):
    with tokred.apply(unet, "todo", downsample_factor=2) as patch:
        unet_calls(unet, latent=(8, 6), steps=TIMESTEPS[:1])
        counts = patch.token_counts()
    assert set(counts) == {n for n, _ in patch.adapter.blocks if patch.adapter.level[n] == 1}  # default: level 1
    for c in counts.values():
        assert (c.tokens, c.attn, c.mlp, c.cross, c.kv) == (48, 48, 48, 48, 12)  # 8x6 -> 4x3
    with tokred.apply(unet, "todo", downsample_factor=3, max_downsample=4) as patch:
        unet_calls(unet, latent=(12, 8), steps=TIMESTEPS[:1])
        kv = {patch.adapter.level[n]: c.kv for n, c in patch.token_counts().items()}
    assert kv == {1: 4 * 2, 2: 2 * 1, 4: 3 * 2}  # 12x8 -> 4x2; 6x4 -> 2x1; 3x2 is below the factor: dense


# --- against the independent implementation ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "levels", "latent"),
    [
        ({}, {1}, (8, 8)),
        ({"downsample_method": "nearest"}, {1}, (8, 4)),
        ({"downsample_method": "area", "max_downsample": 2}, {1, 2}, (8, 4)),
        ({"downsample_method": "max_pool", "downsample_factor": 4}, {1}, (8, 8)),
        ({"downsample_factor": 3, "max_downsample": 1}, {1}, (6, 6)),
    ],
)
def test_unet_matches_reference_processor(unet, options, levels, latent):
    factor = options.get("downsample_factor", 2)
    undo = set_reference(unet, levels, factor, options.get("downsample_method", "nearest-exact"))
    try:
        expected = unet_calls(unet, latent=latent, steps=TIMESTEPS[:1])
    finally:
        undo()
    with tokred.apply(unet, "todo", **options) as patch:
        got = unet_calls(unet, latent=latent, steps=TIMESTEPS[:1])
        counts = patch.token_counts()
    assert_all_close(got, expected)
    assert {patch.adapter.level[n] for n in counts} == levels
    assert all(c.kv == c.attn // factor**2 for c in counts.values())


def test_pipeline_matches_reference_processor():
    pipe = tiny_sd_pipeline()

    def generate():
        return pipe("a red cube", num_inference_steps=2, guidance_scale=5.0, height=16, width=16,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    base = generate()
    undo = set_reference(pipe.unet, {1}, 2, "nearest-exact")
    try:
        expected = generate()
    finally:
        undo()
    with tokred.apply(pipe, "todo") as patch:
        got = generate()
        assert patch.state.step == 2
    assert_all_close([got], [expected])
    assert not torch.allclose(got, base, atol=1e-4)
    assert torch.equal(generate(), base)


def test_sd3_joint_attention_matches_reference_processor():
    model = tiny_sd3_transformer(dual_attention_layers=(0,))  # block 0 also has SD3.5's attn2
    base = sd3_calls(model)
    undo = set_reference(model, None, 2, "area", patch_size=2)
    try:
        expected = sd3_calls(model)
    finally:
        undo()
    with tokred.apply(model, "todo", downsample_method="area") as patch:
        got = sd3_calls(model)
        counts = patch.token_counts()
    assert_all_close(got, expected)
    assert {(c.attn, c.kv) for c in counts.values()} == {(64, 16)}  # 8x8 image tokens -> 4x4 keys/values
    assert all(torch.equal(a, b) for a, b in zip(base, sd3_calls(model), strict=True))
    with tokred.apply(model, "todo", downsample_factor=1):
        assert all(torch.equal(a, b) for a, b in zip(base, sd3_calls(model), strict=True))


# --- time and levels --------------------------------------------------------------------------------------------
def test_timestep_threshold_stop_leaves_late_steps_dense(unet):
    base = unet_calls(unet)
    with tokred.apply(unet, "todo", timestep_threshold_stop=0.6) as patch:
        out = unet_calls(unet)  # timestep 900 downsampled; 500 (0.5 <= 0.6) dense
        assert {c.kv for c in patch.token_counts().values()} == {(16 + 64) / 2}
    assert not torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])


def test_sdxl_layout_defaults_to_its_first_attention_level():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    sdxl_like = UNet2DConditionModel(  # SDXL's layout: no transformer blocks at full resolution
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=16,
    ).eval()
    with tokred.apply(sdxl_like, "todo") as patch:
        unet_calls(sdxl_like, steps=TIMESTEPS[:1])
        counts = patch.token_counts()
    assert counts and {(c.attn, c.kv) for c in counts.values()} == {(16, 4)}  # level 2 of 8x8: 4x4 -> 2x2
    with pytest.raises(InvalidOptionError, match="run at downsampling 2"):
        tokred.apply(sdxl_like, "todo", max_downsample=1)


# --- errors, listing, benchmarks ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "valid"),
    [
        ({"downsample_factor": 0}, "int >= 1"),
        ({"downsample_factor": 2.0}, "int >= 1"),
        ({"downsample_factor": True}, "int >= 1"),
        ({"downsample_method": "linear"}, "nearest-exact, nearest, area, bilinear, bicubic, max_pool"),
        ({"max_downsample": 3}, "1, 2, 4 or 8"),
        ({"timestep_threshold_stop": 1.5}, "0 <= value <= 1"),
        ({"ratio": 0.5}, "downsample_factor"),
    ],
)
def test_bad_options_raise_at_apply_with_the_valid_values(unet, options, valid):
    with pytest.raises(InvalidOptionError, match=re.escape(valid)):
        tokred.apply(unet, "todo", **options)
    assert tokred.get_patch(unet) is None


def test_sd3_refuses_unet_options_and_custom_processors():
    from diffusers.models.attention_processor import AttnProcessor

    model = tiny_sd3_transformer()
    with pytest.raises(InvalidOptionError, match="max_downsample"):
        tokred.apply(model, "todo", max_downsample=1)
    model.transformer_blocks[0].attn.set_processor(AttnProcessor())
    with pytest.raises(UnsupportedModelError, match="JointAttnProcessor2_0"):
        tokred.apply(model, "todo")
    assert tokred.get_patch(model) is None


def test_listed_and_planned_for_text_to_image(capsys):
    from tokred.bench.cli import main
    from tokred.bench.harness import plan_cases

    assert "todo" in tokred.list_methods()
    assert main(["list"]) == 0
    listing = capsys.readouterr().out.split("\ntodo: ")[1].split("\n\n")[0]
    assert "downsample_factor" in listing and "nearest-exact" in listing and "factor2-area" in listing
    planned = {c.preset for c in plan_cases("text_to_image", "todo")}
    assert planned == {"baseline", "factor2", "factor2-area", "factor3", "factor4"}
