"""diffusers' cache hooks as tokred methods (``first_block_cache``, ``pab``) on SD3/SD3.5 transformers.

They equal diffusers' own hooks applied by hand (with the context, reset and None-text-stream handling tokred
adds), differ from the baseline, are deterministic over generations, remove exactly, compute fewer blocks or
attentions (counted by hooks on the sublayers that run only when computed, and by the token counts), refuse
the U-Net, work inside a CFG pipeline and beside a token method (ToDo) in one patch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_sd_unet
from tiny_sd3 import sd3_denoise, tiny_sd3_pipeline, tiny_sd3_transformer, tiny_sd35_transformer

import tokred
from tokred.adapters import resolve_adapter
from tokred.errors import InvalidOptionError, UnsupportedModelError
from tokred.options import parse_options
from tokred.patch import Patch
from tokred.state import RunState

TIMESTEPS = (950, 900, 700, 600, 500, 300)
# Options that make the tiny random models cache: first-block cache's residual change between these calls is
# 0.3 to 0.5 on random weights; the broadcast's window opened to every timestep.
OPTIONS = {
    "first_block_cache": {"threshold": 0.5},
    "pab": {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (0, 1000)},
}
CACHES = list(OPTIONS)
LAYOUTS = {"SD3": lambda: tiny_sd3_transformer(num_layers=4), "SD3.5": tiny_sd35_transformer}


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, 16, 16, generator=g), torch.randn(batch, 8, 64, generator=g), torch.randn(
        batch, 64, generator=g
    )


def generate(model, timesteps=TIMESTEPS, before_step=None):
    sample, text, pooled = inputs()
    return torch.stack(sd3_denoise(model, sample, text, pooled, timesteps, before_step))


def count_runs(model):
    """Forward hooks on every block's feed-forward (runs only when the block computes) and on every attention's
    query projection (runs only when the attention computes): the calls of each, after each generation."""
    counts = {"ff": 0, "to_q": 0}
    handles = []
    for block in model.transformer_blocks:
        handles.append(block.ff.register_forward_hook(lambda *a: counts.__setitem__("ff", counts["ff"] + 1)))
        for attn in (block.attn, getattr(block, "attn2", None)):
            if attn is not None:
                handles.append(
                    attn.to_q.register_forward_hook(lambda *a: counts.__setitem__("to_q", counts["to_q"] + 1))
                )
    return counts, handles


def module_state(model):
    """What remove() must restore: every module's own attributes (forwards, registries) and the parameters."""
    return [(name, sorted(vars(m))) for name, m in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", CACHES)
def test_cache_differs_is_deterministic_computes_less_and_removes_exactly(method, layout):
    model = LAYOUTS[layout]()
    names, params = module_state(model)
    counts, handles = count_runs(model)
    base = generate(model)
    base_counts = dict(counts)
    patch = tokred.apply(model, method, **OPTIONS[method])
    assert getattr(type(patch.method), "kind", None) == "cache"
    counts.update(ff=0, to_q=0)
    first = generate(model)
    cached_counts = dict(counts)
    tokens = patch.token_counts()
    second = generate(model)  # the rising timestep starts a second generation: the hooks' state is reset
    patch.remove()
    for h in handles:
        h.remove()
    assert torch.equal(first, second)
    assert not torch.equal(first, base)
    assert torch.equal(first[0], base[0])  # the first call of a generation computes everything
    if method == "first_block_cache":
        assert cached_counts["ff"] < base_counts["ff"] and cached_counts["to_q"] < base_counts["to_q"]
        head, *rest = tokens.values()
        assert head.attn == head.mlp == head.tokens == 64  # the first block always runs
        skipped = len(TIMESTEPS) - cached_counts["ff"] // len(model.transformer_blocks)
        assert all(t.tokens == 64 and t.mlp < 64 and t.attn == t.kv == t.mlp for t in rest)
        assert skipped >= 1
    else:
        assert cached_counts["ff"] == base_counts["ff"] and cached_counts["to_q"] < base_counts["to_q"]
        assert all(t.tokens == t.mlp == 64 and t.attn == t.kv < 64 for t in tokens.values())
        # skip range 2 over the window: every second call reuses (calls 2, 4, 6 of 6)
        assert all(t.attn == 64 * 3 / 6 for t in tokens.values())
    assert torch.equal(generate(model), base)
    after_names, after_params = module_state(model)
    assert after_names == names and all(torch.equal(params[k], after_params[k]) for k in params)
    assert tokred.get_patch(model) is None


def test_first_block_cache_equals_diffusers_hooks_applied_by_hand():
    """diffusers' apply_first_block_cache on a copy, with what tokred adds done by hand: a cache context, the reset
    per generation, and the last block's text stream returned instead of None (beneath the hooks)."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    model = tiny_sd3_transformer(num_layers=4)
    reference = copy.deepcopy(model)
    last = reference.transformer_blocks[-1]
    plain = last.forward

    def text_passes(*args, **kwargs):
        encoder, hidden = plain(*args, **kwargs)
        return kwargs["encoder_hidden_states"], hidden

    last.forward = text_passes
    apply_first_block_cache(reference, FirstBlockCacheConfig(threshold=0.5))

    def by_hand():
        HookRegistry.check_if_exists_or_initialize(reference).reset_stateful_hooks()
        _set_cache_context(reference, CacheContext("cond"))
        return generate(reference)

    expected = [by_hand(), by_hand()]
    with tokred.apply(model, "first_block_cache", threshold=0.5):
        got = [generate(model), generate(model)]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_pab_equals_diffusers_hooks_applied_by_hand():
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    model = tiny_sd35_transformer()
    reference = copy.deepcopy(model)
    now = {"t": 0.0}
    apply_pyramid_attention_broadcast(
        reference,
        PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=3,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: now["t"],
        ),
    )

    def by_hand():
        for module in reference.modules():
            if hasattr(module, "_diffusers_hook"):
                module._diffusers_hook.reset_stateful_hooks(recurse=False)
        return generate(reference, before_step=lambda i: now.__setitem__("t", TIMESTEPS[i - 1]))

    expected = [by_hand(), by_hand()]
    base = generate(model)
    with tokred.apply(model, "pab", spatial_attention_block_skip_range=3):
        got = [generate(model), generate(model)]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(got[0], base)


@pytest.mark.parametrize("method,reason", [
    ("first_block_cache", r"\(diffusers' first-block cache hooks the blocks of a transformer's top-level block lists .*"
     r"a U-Net has none.*deepcache\)\)"),
    ("pab", r"\(offered for diffusion transformers only.*deepcache\)\)"),
])
def test_unet_and_vit_are_refused_with_the_reason_and_the_supported_families(method, reason):
    from tiny_models import tiny_timm_vit

    unet = tiny_sd_unet()
    with pytest.raises(UnsupportedModelError, match=f"'{method}' does not support diffusers_unet models {reason}; it "
                       "supports: diffusers_dit, diffusers_flux, diffusers_mmdit"):
        tokred.apply(unet, method)
    assert tokred.get_patch(unet) is None and not any("forward" in vars(m) for m in unet.modules())
    vit = tiny_timm_vit("vit_small_patch16_224")
    with pytest.raises(UnsupportedModelError, match="timm_vit models \\(a cache across denoising steps, and a ViT's "
                       "forward is one call"):
        tokred.apply(vit, method)


def test_bad_options_and_models_are_refused():
    model = tiny_sd3_transformer()
    with pytest.raises(InvalidOptionError, match="'threshold'=-0.1 is invalid; valid: number >= 0"):
        tokred.apply(model, "first_block_cache", threshold=-0.1)
    with pytest.raises(InvalidOptionError, match=r"spatial_attention_timestep_skip_range'=\(800, 100\) is invalid"):
        tokred.apply(model, "pab", spatial_attention_timestep_skip_range=(800, 100))
    with pytest.raises(InvalidOptionError, match="spatial_attention_block_skip_range'=0 is invalid; valid: int >= 1"):
        tokred.apply(model, "pab", spatial_attention_block_skip_range=0)
    with pytest.raises(UnsupportedModelError, match="has 1 block.*needs a first block and at least one more"):
        tokred.apply(tiny_sd3_transformer(num_layers=1), "first_block_cache")
    assert not any("forward" in vars(m) or "_diffusers_hook" in vars(m) for m in model.modules())


def test_pab_at_skip_range_one_is_the_unpatched_model():
    model = tiny_sd35_transformer()
    base = generate(model)
    window = {"spatial_attention_timestep_skip_range": (0, 1000)}
    with tokred.apply(model, "pab", spatial_attention_block_skip_range=1, **window):
        assert torch.equal(generate(model), base)


@pytest.mark.parametrize("method", CACHES)
def test_paused_calls_compute_the_unpatched_model_and_leave_the_cache_alone(method):
    model = tiny_sd3_transformer(num_layers=4)
    sample, text, pooled = inputs()

    def extra_call():
        with torch.no_grad():
            return model(hidden_states=sample * 2, encoder_hidden_states=text, pooled_projections=pooled,
                         timestep=torch.full((2,), 650.0)).sample

    base, base_extra = generate(model), extra_call()
    with tokred.apply(model, method, **OPTIONS[method]) as patch:
        plain = generate(model)
        extras = []

        def before_step(i):
            if i == 4:  # an extra call, paused, between calls 3 and 4
                with patch.paused():
                    extras.append(extra_call())

        with_pause = generate(model, before_step=before_step)
    assert torch.equal(with_pause, plain) and not torch.equal(plain, base)
    assert torch.equal(extras[0], base_extra)


@pytest.mark.parametrize("method", CACHES)
def test_deepcopy_of_a_patched_model_carries_its_own_patch(method):
    model = tiny_sd3_transformer(num_layers=4)
    base = generate(model)
    with tokred.apply(model, method, **OPTIONS[method]):
        clone = copy.deepcopy(model)
        expected = generate(model)
    assert torch.equal(generate(clone), expected) and torch.equal(generate(model), base)
    tokred.remove(clone)
    assert torch.equal(generate(clone), base)
    assert not any("forward" in vars(m) or "_diffusers_hook" in vars(m) for m in clone.modules())


def test_a_registry_already_on_a_block_keeps_its_own_hooks():
    """A diffusers hook the user registered on a block before (here a counting one) still runs while patched
    (inside ours, as part of the block), and remove() leaves it, and only it, in the block's registry."""
    from diffusers.hooks.hooks import HookRegistry, ModelHook

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model = tiny_sd3_transformer(num_layers=4)
    block = model.transformer_blocks[2]
    HookRegistry.check_if_exists_or_initialize(block).register_hook(Count(), "user_count")
    user_forward = vars(block)["forward"]
    base = generate(model)
    for method in CACHES:
        with tokred.apply(model, method, **OPTIONS[method]) as patch:
            Count.calls = 0
            generate(model)
            t = patch.token_counts()["transformer_blocks.2"]
        # the user's hook is part of the block beneath ours: it runs on the calls that compute the block
        assert Count.calls == round(t.calls * t.mlp / t.tokens) and Count.calls < len(TIMESTEPS) or method == "pab"
        assert Count.calls == len(TIMESTEPS) or method == "first_block_cache"  # pab hooks the attentions only
        assert list(block._diffusers_hook.hooks) == ["user_count"] and vars(block)["forward"] is user_forward
        assert torch.equal(generate(model), base)
        with tokred.apply(model, method, **OPTIONS[method]):
            clone = copy.deepcopy(model)  # its own patch: the copied registry lost our hooks before it was applied
        assert list(clone.transformer_blocks[2]._diffusers_hook.hooks)[0] == "user_count"
        tokred.remove(clone)
        assert list(clone.transformer_blocks[2]._diffusers_hook.hooks) == ["user_count"]


# --- beside a token method in one patch (what a composition installs) ---------------------------------------------
def cache_and_todo(model, cache: str, options: dict):
    """ToDo's block planner and the cache's hooks installed into one patch, the token method first (the cache
    outside, recomputed blocks reduced inside), through the pieces tokred.apply uses."""
    adapter = resolve_adapter(model)
    todo_cls, cache_cls = tokred.get_method("todo"), tokred.get_method(cache)
    todo = todo_cls(parse_options(todo_cls.options[adapter.family], {"downsample_factor": 2}, context="todo"))
    method = cache_cls(parse_options(cache_cls.options[adapter.family], options, context=cache))
    todo.check(adapter)
    method.check(adapter)
    patch = Patch(adapter, method, RunState(method=cache_cls.State()))
    try:
        adapter.attach(patch)
        todo.install(patch)
        method.install(patch)
    except BaseException:
        patch.remove()  # as tokred.apply does when an install fails
        raise
    return patch


@pytest.mark.parametrize("method", CACHES)
def test_cache_and_todo_in_one_patch(method):
    model = tiny_sd3_transformer(num_layers=4)
    names, _ = module_state(model)
    base = generate(model)
    with tokred.apply(model, "todo", downsample_factor=2):
        todo_alone = generate(model)
    with tokred.apply(model, method, **OPTIONS[method]):
        cache_alone = generate(model)
    patch = cache_and_todo(model, method, OPTIONS[method])
    counts, handles = count_runs(model)
    both = generate(model)
    tokens, to_q = patch.token_counts(), counts["to_q"]
    both_again = generate(model)
    patch.remove()
    for h in handles:
        h.remove()
    assert torch.equal(both, both_again)
    assert not torch.equal(both, todo_alone) and not torch.equal(both, cache_alone) and not torch.equal(both, base)
    assert torch.equal(both[0], todo_alone[0])  # the first call computes every block, with ToDo's keys/values
    for t in tokens.values():
        # one record per call; ToDo's 2x2 downsampling of the keys/values where the attention computed, 0 elsewhere
        assert t.calls == len(TIMESTEPS) and t.tokens == 64 and t.kv == pytest.approx(t.attn / 4)
    assert min(t.attn for t in tokens.values()) < 64
    assert to_q < len(TIMESTEPS) * len(model.transformer_blocks)
    assert torch.equal(generate(model), base) and module_state(model)[0] == names


# --- inside pipelines ----------------------------------------------------------------------------------------------
def pipe_images(pipe, **kwargs):
    return pipe(
        ["a red cube"],
        num_inference_steps=5,
        guidance_scale=5.0,
        height=32,
        width=32,
        max_sequence_length=8,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    ).images


@pytest.mark.parametrize("method", CACHES)
def test_sd3_pipeline_with_cfg(method):
    """A CFG-batched StableDiffusion3Pipeline: same seed, same image over two generations; not the baseline's;
    fewer block (or attention) computations; remove() exact."""
    pipe = tiny_sd3_pipeline(num_layers=4)
    counts, handles = count_runs(pipe.transformer)
    base = pipe_images(pipe)
    base_counts = dict(counts)
    patch = tokred.apply(pipe, method, **OPTIONS[method])
    counts.update(ff=0, to_q=0)
    first = pipe_images(pipe)
    cached = dict(counts)
    second = pipe_images(pipe)
    steps = patch.state.step
    patch.remove()
    for h in handles:
        h.remove()
    assert (first == second).all() and not (first == base).all() and steps == 5
    assert cached["to_q"] < base_counts["to_q"]
    assert (pipe_images(pipe) == base).all()
    assert not any("forward" in vars(m) or "_diffusers_hook" in vars(m) for m in pipe.transformer.modules())


@pytest.mark.parametrize("method", CACHES)
def test_sd35_pipeline_skip_layer_passes_compute_every_block(method):
    """SD3.5's skip-layer guidance adds an auxiliary pass per step (from the second): it bypasses the hooks, so
    each one computes every block it does not skip by design, and the cache's state is that of the counted calls."""
    pipe = tiny_sd3_pipeline(num_layers=3, dual_attention_layers=(0,), qk_norm="rms_norm")
    slg = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    ff_calls = []
    patch = tokred.apply(pipe, method, **OPTIONS[method])
    hooks = [
        b.ff.register_forward_hook(lambda m, a, o, i=i: ff_calls.append((patch.state.auxiliary, i)))
        for i, b in enumerate(pipe.transformer.transformer_blocks)
    ]
    try:
        with_slg = pipe_images(pipe, **slg)
        again = pipe_images(pipe, **slg)
    finally:
        for h in hooks:
            h.remove()
        patch.remove()
    auxiliary = [i for aux, i in ff_calls[: len(ff_calls) // 2] if aux]
    assert auxiliary == [0, 2] * 4  # block 1 skipped by the guidance itself, the others computed in every pass
    assert (with_slg == again).all()


def test_flops_count_what_ran():
    """FlopCounterMode over a whole generation counts only the computed blocks and attentions: the caches count
    fewer FLOPs than the baseline, the cache with ToDo fewer than either alone."""
    from tokred.flops import count_flops

    model = tiny_sd3_transformer(num_layers=4)
    base = count_flops(lambda: generate(model))
    with tokred.apply(model, "todo", downsample_factor=2):
        todo = count_flops(lambda: generate(model))
    for method in CACHES:
        with tokred.apply(model, method, **OPTIONS[method]) as patch:
            cached = count_flops(lambda: generate(model))
            computed = sum(t.mlp if method == "first_block_cache" else t.attn for t in patch.token_counts().values())
        patch = cache_and_todo(model, method, OPTIONS[method])
        both = count_flops(lambda: generate(model))
        patch.remove()
        assert both < min(cached, todo) and cached < base
        assert computed < 64 * len(model.transformer_blocks)  # the token counts show the same skipped work


# --- the DiT families: PixArt-Σ, DiT-XL/2 (diffusers_dit) and Flux.1 (diffusers_flux) -------------------------------
def dit_generate(kind: str, model, timesteps=TIMESTEPS, before_step=None) -> torch.Tensor:
    """One generation of ``kind``'s tiny transformer (batch 2, 64 image tokens): a call per timestep on
    ``sample + 0.1 * i``; ``before_step(i)`` runs before call i (1-based)."""
    from tiny_dit import TEXT_WIDTH, pixart_added_cond
    from tiny_flux import image_ids, smooth_tokens

    g = torch.Generator().manual_seed(0)
    outs = []
    with torch.no_grad():
        if kind == "Flux.1":
            sample, text = smooth_tokens(2, 8, 8, 16, g), torch.randn(2, 6, 32, generator=g)
            pooled = torch.randn(2, 32, generator=g)
            for i, t in enumerate(timesteps):
                if before_step is not None:
                    before_step(i + 1)
                out = model(hidden_states=sample + 0.1 * i, encoder_hidden_states=text, pooled_projections=pooled,
                            timestep=torch.full((2,), t / 1000), img_ids=image_ids(8, 8), txt_ids=torch.zeros(6, 3),
                            guidance=torch.full((2,), 3.5))  # fmt: skip
                outs.append(out.sample)
            return torch.stack(outs)
        sample = torch.randn(2, 4, 16, 16, generator=g)
        text = torch.randn(2, 6, TEXT_WIDTH, generator=g)
        for i, t in enumerate(timesteps):
            if before_step is not None:
                before_step(i + 1)
            if kind == "DiT":
                out = model(sample + 0.1 * i, timestep=torch.full((2,), t), class_labels=torch.tensor([1, 7]))
            else:
                out = model(sample + 0.1 * i, encoder_hidden_states=text, timestep=torch.full((2,), t),
                            added_cond_kwargs=pixart_added_cond(2, 128, 128))  # fmt: skip
            outs.append(out.sample)
    return torch.stack(outs)


def dit_model(kind: str):
    from tiny_dit import tiny_dit_transformer, tiny_pixart_transformer
    from tiny_flux import tiny_flux_transformer

    if kind == "Flux.1":
        return tiny_flux_transformer(num_layers=2, num_single_layers=2)
    return tiny_dit_transformer(num_layers=4) if kind == "DiT" else tiny_pixart_transformer(num_layers=4)


KINDS = ["PixArt-Σ", "DiT", "Flux.1"]


def block_list(model):
    return [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]


def count_dit_runs(model):
    """Forward hooks on every block's MLP input layer (``ff``, or a single-stream Flux block's ``proj_mlp``: runs
    only when the block computes), on every self-attention's query projection (``attn1`` / ``attn``) and on every
    cross-attention's (PixArt's ``attn2``)."""
    counts = {"ff": 0, "to_q": 0, "cross_q": 0}
    handles = []

    def bump(key):
        return lambda *a: counts.__setitem__(key, counts[key] + 1)

    for block in block_list(model):
        handles.append((block.ff if hasattr(block, "ff") else block.proj_mlp).register_forward_hook(bump("ff")))
        handles.append((getattr(block, "attn1", None) or block.attn).to_q.register_forward_hook(bump("to_q")))
        if getattr(block, "attn2", None) is not None:
            handles.append(block.attn2.to_q.register_forward_hook(bump("cross_q")))
    return counts, handles


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", CACHES)
def test_dit_families_cache_differ_are_deterministic_compute_less_and_remove_exactly(method, kind):
    model = dit_model(kind)
    blocks = len(block_list(model))
    names, params = module_state(model)
    counts, handles = count_dit_runs(model)
    base = dit_generate(kind, model)
    base_counts = dict(counts)
    patch = tokred.apply(model, method, **OPTIONS[method])
    counts.update(ff=0, to_q=0, cross_q=0)
    first = dit_generate(kind, model)
    cached = dict(counts)
    tokens = patch.token_counts()
    second = dit_generate(kind, model)  # the rising timestep starts a second generation: the hooks' state is reset
    patch.remove()
    for h in handles:
        h.remove()
    assert torch.equal(first, second) and not torch.equal(first, base)
    assert torch.equal(first[0], base[0])  # the first call of a generation computes everything
    assert len(tokens) == blocks and all(t.tokens == 64 and t.calls == len(TIMESTEPS) for t in tokens.values())
    if method == "first_block_cache":
        assert cached["ff"] < base_counts["ff"] and cached["to_q"] < base_counts["to_q"]
        head, *rest = tokens.values()
        assert head.attn == head.mlp == 64  # the first block always runs
        assert all(t.mlp < 64 and t.attn == t.kv == t.mlp for t in rest)
        computed_calls = (cached["ff"] - len(TIMESTEPS)) / (blocks - 1)
        assert all(t.mlp == 64 * computed_calls / len(TIMESTEPS) for t in rest)  # counts = what the hooks saw run
        if kind == "PixArt-Σ":  # a skipped block computed no cross-attention either
            assert all(t.cross == t.mlp for t in rest) and cached["cross_q"] < base_counts["cross_q"]
    else:
        assert cached["ff"] == base_counts["ff"] and cached["to_q"] == base_counts["to_q"] // 2
        assert all(t.mlp == 64 and t.attn == t.kv == 64 * 3 / 6 for t in tokens.values())  # calls 2, 4, 6 reused
        assert cached["cross_q"] == base_counts["cross_q"]  # PixArt's cross-attention: not broadcast by default
    assert torch.equal(dit_generate(kind, model), base)
    after_names, after_params = module_state(model)
    assert after_names == names and all(torch.equal(params[k], after_params[k]) for k in params)
    assert tokred.get_patch(model) is None


@pytest.mark.parametrize("kind", KINDS)
def test_dit_families_first_block_cache_equals_diffusers_hooks_applied_by_hand(kind):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    model = dit_model(kind)
    reference = copy.deepcopy(model)
    apply_first_block_cache(reference, FirstBlockCacheConfig(threshold=0.5))

    def by_hand():
        HookRegistry.check_if_exists_or_initialize(reference).reset_stateful_hooks()
        _set_cache_context(reference, CacheContext("cond"))
        return dit_generate(kind, reference)

    expected = [by_hand(), by_hand()]
    with tokred.apply(model, "first_block_cache", threshold=0.5):
        got = [dit_generate(kind, model), dit_generate(kind, model)]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(got[0], dit_generate(kind, model))


@pytest.mark.parametrize("kind", KINDS)
def test_dit_families_pab_equals_diffusers_hooks_applied_by_hand(kind):
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    model = dit_model(kind)
    reference = copy.deepcopy(model)
    now = {"t": 0.0}
    cross = {"cross_attention_block_skip_range": 2} if kind == "PixArt-Σ" else {}
    apply_pyramid_attention_broadcast(
        reference,
        PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=3,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: now["t"],
            **cross,
        ),
    )

    def by_hand():
        for module in reference.modules():
            if hasattr(module, "_diffusers_hook"):
                module._diffusers_hook.reset_stateful_hooks(recurse=False)
        return dit_generate(kind, reference, before_step=lambda i: now.__setitem__("t", TIMESTEPS[i - 1]))

    expected = [by_hand(), by_hand()]
    base = dit_generate(kind, model)
    with tokred.apply(model, "pab", spatial_attention_block_skip_range=3, **cross) as patch:
        got = [dit_generate(kind, model), dit_generate(kind, model)]
        tokens = patch.token_counts()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(got[0], base)
    # window (100, 800): calls 3-6 (iterations 2-5) inside; skip 3 reuses iterations 2, 4, 5 (calls 3, 5, 6)
    assert all(t.attn == 64 * 3 / 6 for t in tokens.values())
    if cross:  # skip 2 on the cross-attention: iterations 3 and 5 (calls 4 and 6) reuse
        assert all(t.cross == 64 * 4 / 6 for t in tokens.values())


def test_pab_cross_attention_option_on_dit_is_refused():
    from tiny_dit import tiny_dit_transformer

    model = tiny_dit_transformer()
    with pytest.raises(UnsupportedModelError, match="cross_attention_block_skip_range=2 but this DiTTransformer2DModel "
                       "has no cross-attention; valid: None"):
        tokred.apply(model, "pab", cross_attention_block_skip_range=2)
    assert not any("forward" in vars(m) or "_diffusers_hook" in vars(m) for m in model.modules())
    with pytest.raises(InvalidOptionError, match="cross_attention_block_skip_range'=0 is invalid; valid: None or int"):
        tokred.apply(model, "pab", cross_attention_block_skip_range=0)
    with pytest.raises(InvalidOptionError, match="unknown option.*cross_attention_block_skip_range"):
        tokred.apply(dit_model("Flux.1"), "pab", cross_attention_block_skip_range=2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", CACHES)
def test_dit_families_paused_calls_are_unpatched_and_leave_the_cache_alone(method, kind):
    model = dit_model(kind)
    base = dit_generate(kind, model)
    base_extra = dit_generate(kind, model, timesteps=(650,))
    with tokred.apply(model, method, **OPTIONS[method]) as patch:
        plain = dit_generate(kind, model)
        extras = []

        def before_step(i):
            if i == 4:  # a paused generation of its own between calls 3 and 4
                with patch.paused():
                    extras.append(dit_generate(kind, model, timesteps=(650,)))

        with_pause = dit_generate(kind, model, before_step=before_step)
    assert torch.equal(with_pause, plain) and not torch.equal(plain, base)
    assert torch.equal(extras[0], base_extra)


@pytest.mark.parametrize("kind", KINDS)
def test_dit_families_deepcopy_carries_its_own_patch(kind):
    model = dit_model(kind)
    base = dit_generate(kind, model)
    with tokred.apply(model, "first_block_cache", threshold=0.5):
        clone = copy.deepcopy(model)
        expected = dit_generate(kind, model)
    assert torch.equal(dit_generate(kind, clone), expected) and torch.equal(dit_generate(kind, model), base)
    tokred.remove(clone)
    assert torch.equal(dit_generate(kind, clone), base)
    assert not any("forward" in vars(m) or "_diffusers_hook" in vars(m) for m in clone.modules())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", CACHES)
def test_dit_families_cache_and_todo_in_one_patch(method, kind):
    """ToDo installed first, the cache over it: recomputed blocks downsample their keys/values, skipped blocks
    compute nothing. Flux refuses pab beside a token method, saying why."""
    model = dit_model(kind)
    names, _ = module_state(model)
    base = dit_generate(kind, model)
    if method == "pab" and kind == "Flux.1":
        with pytest.raises(UnsupportedModelError, match="pab: beside a token method on Flux, tokred's reduced "
                           "attention is computed from the attention's projections"):
            cache_and_todo(model, method, OPTIONS[method])
        assert module_state(model)[0] == names and torch.equal(dit_generate(kind, model), base)
        return
    with tokred.apply(model, "todo", downsample_factor=2):
        todo_alone = dit_generate(kind, model)
    with tokred.apply(model, method, **OPTIONS[method]):
        cache_alone = dit_generate(kind, model)
    patch = cache_and_todo(model, method, OPTIONS[method])
    both = dit_generate(kind, model)
    tokens = patch.token_counts()
    both_again = dit_generate(kind, model)
    patch.remove()
    assert torch.equal(both, both_again)
    assert not torch.equal(both, todo_alone) and not torch.equal(both, cache_alone) and not torch.equal(both, base)
    assert torch.equal(both[0], todo_alone[0])  # the first call computes every block, with ToDo's keys/values
    for t in tokens.values():
        assert t.calls == len(TIMESTEPS) and t.tokens == 64 and t.kv == pytest.approx(t.attn / 4)
    assert min(t.attn for t in tokens.values()) < 64
    assert torch.equal(dit_generate(kind, model), base) and module_state(model)[0] == names


# --- the DiT families inside their pipelines ------------------------------------------------------------------------
def dit_pipeline(kind: str):
    from tiny_dit import tiny_dit_pipeline, tiny_pixart_pipeline
    from tiny_flux import tiny_flux_pipeline

    return {"PixArt-Σ": tiny_pixart_pipeline, "DiT": tiny_dit_pipeline, "Flux.1": tiny_flux_pipeline}[kind]()


def flux_inputs(true_cfg: bool = False) -> dict:
    g = torch.Generator().manual_seed(123)
    inputs = dict(prompt_embeds=torch.randn(1, 6, 32, generator=g),
                  pooled_prompt_embeds=torch.randn(1, 32, generator=g))
    if true_cfg:
        inputs.update(negative_prompt_embeds=torch.randn(1, 6, 32, generator=g),
                      negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g), true_cfg_scale=2.0)
    return inputs


def pipeline_image(kind: str, pipe, true_cfg: bool = False) -> torch.Tensor:
    from tiny_dit import pixart_prompt

    common = dict(num_inference_steps=5, generator=torch.Generator().manual_seed(0))
    if kind == "DiT":
        return torch.from_numpy(pipe(class_labels=[3, 7], guidance_scale=4.0, output_type="np", **common).images)
    if kind == "PixArt-Σ":
        return pipe(guidance_scale=4.5, height=32, width=32, use_resolution_binning=False, negative_prompt=None,
                    output_type="pt", **pixart_prompt(), **common).images  # fmt: skip
    return pipe(height=32, width=32, output_type="pt", **flux_inputs(true_cfg), **common).images


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", CACHES)
def test_dit_family_pipelines_same_seed_same_image_fewer_computations(method, kind):
    """PixArtSigmaPipeline and DiTPipeline (CFG batched: one call per step) and FluxPipeline (its own cache
    context "cond"): same seed, same image over two generations; not the baseline's; fewer block (or attention)
    computations; remove() exact."""
    pipe = dit_pipeline(kind)
    counts, handles = count_dit_runs(pipe.transformer)
    base = pipeline_image(kind, pipe)  # the baseline first: Flux's cache_context has set up the root's registry
    base_counts = dict(counts)
    names, _ = module_state(pipe.transformer)
    patch = tokred.apply(pipe, method, **OPTIONS[method])
    counts.update(ff=0, to_q=0, cross_q=0)
    first = pipeline_image(kind, pipe)
    cached = dict(counts)
    tokens = patch.token_counts()
    second = pipeline_image(kind, pipe)
    steps, generations = patch.state.step, patch.state.generation
    patch.remove()
    for h in handles:
        h.remove()
    assert torch.equal(first, second) and not torch.equal(first, base)
    assert steps == 5 and generations == 2
    assert cached["to_q"] < base_counts["to_q"]
    if method == "first_block_cache":
        assert cached["ff"] < base_counts["ff"]
        assert min(t.mlp for t in tokens.values()) < max(t.tokens for t in tokens.values())
    else:
        assert all(t.attn < t.tokens for t in tokens.values())
    assert torch.equal(pipeline_image(kind, pipe), base)
    assert module_state(pipe.transformer)[0] == names
    assert not any("forward" in vars(m) or "_diffusers_hook" in vars(m) for m in block_list(pipe.transformer))


def test_flux_true_cfg_first_block_cache_keeps_the_pipelines_contexts_and_equals_diffusers_enable_cache():
    """FluxPipeline with true CFG calls the transformer twice per step, in cache contexts "cond" and "uncond":
    tokred keeps them (one cache state each), so its images are those of diffusers' own enable_cache on a copy."""
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = dit_pipeline("Flux.1")
    reference = copy.deepcopy(pipe)
    reference.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    expected = pipeline_image("Flux.1", reference, true_cfg=True)
    base = pipeline_image("Flux.1", pipe, true_cfg=True)
    with tokred.apply(pipe, "first_block_cache", threshold=0.5) as patch:
        manager, contexts = patch.method_state.state_manager, []
        handle = pipe.transformer.register_forward_hook(lambda *a: contexts.append(manager._context.name))
        got = pipeline_image("Flux.1", pipe, true_cfg=True)
        handle.remove()
        again = pipeline_image("Flux.1", pipe, true_cfg=True)
        tokens = patch.token_counts()
    assert contexts == ["cond", "uncond"] * 5  # the pipeline's, each call in its own
    assert torch.equal(got, expected) and torch.equal(got, again) and not torch.equal(got, base)
    assert min(t.mlp for t in tokens.values()) < 64


def test_flux_true_cfg_pab_keeps_one_broadcast_state_per_context():
    """diffusers' broadcast keeps one state per attention, so under true CFG the "uncond" call of a step would
    reuse the "cond" call's attention; tokred keeps one per context: each context computes its own first, third
    and fifth call (window (0, 1000), skip 2), 6 of the 10 calls. Without true CFG, tokred equals diffusers'
    enable_cache on a copy (the pipeline's current timestep as the callback)."""
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    pipe = dit_pipeline("Flux.1")
    with tokred.apply(pipe, "pab", **OPTIONS["pab"]) as patch:
        managers, contexts = patch.method_state.managers, []
        handle = pipe.transformer.register_forward_hook(
            lambda *a: contexts.append({tuple(sorted(m._state_cache)) for m in managers})
        )
        with_cfg = pipeline_image("Flux.1", pipe, true_cfg=True)
        handle.remove()
        tokens = patch.token_counts()
        assert with_cfg.isfinite().all()
        assert all(t.calls == 10 and t.attn == 64 * 6 / 10 for t in tokens.values())
        assert contexts[-1] == {("cond", "uncond")}  # every attention: a state per context
        plain = pipeline_image("Flux.1", pipe)
    reference = copy.deepcopy(pipe)
    reference.transformer.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(0, 1000),
        current_timestep_callback=lambda: reference.current_timestep,
    ))  # fmt: skip
    assert torch.equal(plain, pipeline_image("Flux.1", reference))


def test_controlnet_residuals_are_refused_by_first_block_cache():
    from tiny_flux import image_ids

    model = dit_model("Flux.1")
    g = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(1, 64, 16, generator=g), encoder_hidden_states=torch.randn(1, 6, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=image_ids(8, 8),
                  txt_ids=torch.zeros(6, 3), guidance=torch.tensor([3.5]),
                  controlnet_block_samples=[torch.zeros(1, 64, 32)])  # fmt: skip
    with tokred.apply(model, "first_block_cache"), pytest.raises(
        UnsupportedModelError, match=r"ControlNet residuals \(controlnet_block_samples\).*add them twice"
    ):
        model(**kwargs)


def test_pab_beside_a_method_that_reduces_the_queries_is_refused_at_the_first_such_call():
    """ToMe merges the queries of PixArt's self-attention: a broadcast output would belong to another call's merged
    tokens, so pab+tome stops with the reason at its first call and the model is left as it was after remove()."""
    model = dit_model("PixArt-Σ")
    base = dit_generate("PixArt-Σ", model)
    with tokred.apply(model, "pab+tome", **{"pab.spatial_attention_timestep_skip_range": (0, 1000)}):
        with pytest.raises(UnsupportedModelError, match=r"pab: a token method reduces the queries of "
                           r"transformer_blocks.0.attn1 \(64 -> \d+ tokens\)"):
            dit_generate("PixArt-Σ", model)
    assert torch.equal(dit_generate("PixArt-Σ", model), base)


@pytest.mark.parametrize("kind", KINDS)
def test_dit_families_flops_count_what_ran(kind):
    """FlopCounterMode over a whole generation: each cache counts fewer FLOPs than the baseline, first-block cache
    with ToDo fewer than either alone."""
    from tokred.flops import count_flops

    model = dit_model(kind)
    base = count_flops(lambda: dit_generate(kind, model))
    with tokred.apply(model, "todo", downsample_factor=2):
        todo = count_flops(lambda: dit_generate(kind, model))
    counted = {}
    for method in CACHES:
        with tokred.apply(model, method, **OPTIONS[method]):
            counted[method] = count_flops(lambda: dit_generate(kind, model))
    patch = cache_and_todo(model, "first_block_cache", OPTIONS["first_block_cache"])
    both = count_flops(lambda: dit_generate(kind, model))
    patch.remove()
    assert all(c < base for c in counted.values())
    assert both < min(counted["first_block_cache"], todo)
