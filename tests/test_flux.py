"""Flux.1 (issue 18): the diffusers_flux adapter and every method on it, on tiny FluxTransformer2DModel in Flux.1-dev's
and -schnell's layouts (dual-stream then single-stream blocks, rotary embeddings), alone and inside FluxPipeline."""

from __future__ import annotations

import pytest
import torch
from tiny_flux import flux_denoise, image_ids, tiny_flux_pipeline, tiny_flux_transformer

import tokred
from tokred.adapters import diffusers_flux as flux_adapter
from tokred.adapters import resolve_adapter
from tokred.errors import TokredError, UnsupportedModelError
from tokred.flops import count_flops
from tokred.merge import grid_destinations, grid_matching
from tokred.method import Method
from tokred.patch import Patch
from tokred.reduction import BlockPlan, KeyValue, Sublayer, gather_rows
from tokred.state import RunState

METHODS = {"tome": {}, "ca_tome": {}, "todo": {}, "cat_pruning": {"t0": 2}}
ZERO_STRENGTH = {"tome": {"ratio": 0.0}, "ca_tome": {"threshold": 1.0}, "todo": {"downsample_factor": 1},
                 "cat_pruning": {"t0": 2, "alpha": 1.0}}
LAYOUTS = {"dev": True, "schnell": False}  # guidance_embeds


@pytest.fixture(scope="module", params=list(LAYOUTS))
def model(request):
    return tiny_flux_transformer(guidance_embeds=LAYOUTS[request.param])


def run(model) -> torch.Tensor:
    return torch.stack(flux_denoise(model))


def leftover_forwards(model) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in vars(m)]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_deterministically_reduces_both_block_types_and_removes_exactly(model, method):
    baseline = run(model)
    patch = tokred.apply(model, method, **METHODS[method])
    first = run(model)
    counts = patch.token_counts()
    second = run(model)
    patch.remove()
    assert torch.equal(first, second)
    assert not torch.equal(first, baseline)
    for kind in ("transformer_blocks.", "single_transformer_blocks."):  # dual- and single-stream blocks
        reduced = [c for name, c in counts.items() if name.startswith(kind) and min(c.attn, c.kv, c.mlp) < c.tokens]
        assert reduced, f"{method}: no {kind[:-1]} reduced its tokens"
    assert torch.equal(run(model), baseline) and not leftover_forwards(model) and tokred.get_patch(model) is None


@pytest.mark.parametrize("method", list(ZERO_STRENGTH))
def test_zero_strength_is_bit_exact(model, method):
    baseline = run(model)
    with tokred.apply(model, method, **ZERO_STRENGTH[method]):
        assert torch.equal(run(model), baseline)


def test_text_tokens_are_never_reduced():
    model = tiny_flux_transformer()
    with tokred.apply(model, "tome", ratio=0.5, merge_mlp=True) as patch:
        run(model)
        counts = patch.token_counts()
    # the counts are of image tokens (8 x 8 grid): half merged in every block, the 6 text tokens untouched
    assert all(c.tokens == 64 and c.attn == 32 for c in counts.values())


# --- rotary embeddings of reduced tokens -------------------------------------------------------------------------
def install(model, planner) -> Patch:
    """The adapter driven by a hand-written planner (no method): for checks of the reduction points themselves."""
    adapter = resolve_adapter(model)
    patch = Patch(adapter, Method(None), RunState())
    adapter.attach(patch)
    adapter.install_blocks(patch, planner)
    return patch


def permuting_planner(positions_follow: bool, mlp_too: bool = False):
    """Queries (and keys/values, and with ``mlp_too`` the MLP branch) on the image tokens in a random order, put
    back in order afterwards. Attention is permutation-equivariant, so the output is the model's own exactly when
    every token keeps its rotary phase (``positions_follow``); with the tables left in grid order it is not."""

    def plan(call, x):
        n = x.shape[1]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(call.index))[None].expand(x.shape[0], -1)
        inverse = perm.argsort(dim=1)

        def rows(t):
            return gather_rows(t, perm)

        sub = Sublayer(rows, lambda y: gather_rows(y, inverse), positions=rows if positions_follow else lambda t: t)
        return BlockPlan(attn=sub, mlp=sub if mlp_too else Sublayer())

    return plan


@pytest.mark.parametrize("mlp_too", [False, True])
def test_reduced_tokens_keep_their_rotary_phase_in_both_block_types(mlp_too):
    model = tiny_flux_transformer()
    baseline = run(model)
    patch = install(model, permuting_planner(positions_follow=True, mlp_too=mlp_too))
    try:
        permuted = run(model)
    finally:
        patch.remove()
    torch.testing.assert_close(permuted, baseline, rtol=1e-5, atol=1e-5)
    patch = install(model, permuting_planner(positions_follow=False, mlp_too=mlp_too))
    try:
        wrong = run(model)
    finally:
        patch.remove()
    assert (wrong - baseline).abs().max() > 1e-3  # the phases matter: the test can fail


def test_a_merged_token_is_rotated_with_its_destinations_phase():
    """ToMe's plan gives each merged token its destination's rows of the rotary tables (GridMerge.kept)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 8, generator=g)
    a_idx, b_idx = grid_destinations(8, 8, 2, 2, torch.Generator().manual_seed(1), "cpu")
    merge = grid_matching(x, a_idx, b_idx, r=32)
    table = torch.arange(64.0)[None, :, None].expand(2, 64, 4)  # each token's "phase" is its own index
    kept = merge.kept(table)[..., 0].long()  # [B, 32]: the token whose phase each merged token takes
    assert kept.shape == (2, 32)
    unm = merge.unm_idx.shape[1]
    assert torch.equal(kept[:, unm:], b_idx[0, :, 0].expand(2, -1))  # destinations: their own phase
    assert torch.equal(kept[:, :unm], a_idx[0, :, 0][merge.unm_idx[..., 0]])  # unmerged sources: their own
    # the values merged tokens carry sit at those tokens: merging x and reading the destination rows agree
    merged = merge(x)
    for b in range(2):
        for j in range(unm):
            assert torch.equal(merged[b, j], x[b, kept[b, j]])


def captured_key_tables(model, method, **options):
    """The rotary cos tables [B, S, D] of the keys of the first dual block's attention in one reduced call."""
    tables = []
    original = flux_adapter.rotate

    def spy(x, cos, sin):
        tables.append(cos)
        return original(x, cos, sin)

    with tokred.apply(model, method, **options):
        flux_adapter.rotate = spy
        try:
            flux_denoise(model, timesteps=(0.9,))
        finally:
            flux_adapter.rotate = original
    return tables[1]  # (query, key) per block: the first block's keys


def test_todo_keys_take_the_phase_of_the_tokens_they_come_from():
    model = tiny_flux_transformer()
    cos = captured_key_tables(model, "todo", downsample_factor=2, downsample_method="nearest")
    rotary_cos, _ = model.pos_embed(torch.cat([torch.zeros(6, 3), image_ids(8, 8)]))
    image = rotary_cos[6:].reshape(8, 8, -1)
    assert cos.shape[1] == 6 + 16
    assert torch.equal(cos[0, :6], rotary_cos[:6])  # text keys: their own
    assert torch.equal(cos[0, 6:], image[::2, ::2].reshape(16, -1))  # each key: its top-left source's phase
    area = captured_key_tables(model, "todo", downsample_factor=2, downsample_method="area")
    torch.testing.assert_close(area[0, 6:], image.reshape(4, 2, 4, 2, -1).mean(dim=(1, 3)).reshape(16, -1))


# --- what is refused ---------------------------------------------------------------------------------------------
def test_refusals_are_clear_and_leave_the_model_alone():
    model = tiny_flux_transformer()
    baseline = run(model)
    with pytest.raises(UnsupportedModelError, match="'deepcache' does not support diffusers_flux.*diffusers_unet"):
        tokred.apply(model, "deepcache")
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class MyProcessor(FluxAttnProcessor):
        pass

    model.single_transformer_blocks[0].attn.set_processor(MyProcessor())
    with pytest.raises(UnsupportedModelError, match="single_transformer_blocks.0.attn uses MyProcessor"):
        tokred.apply(model, "tome")
    model.single_transformer_blocks[0].attn.set_processor(FluxAttnProcessor())
    assert tokred.get_patch(model) is None and not leftover_forwards(model)
    assert torch.equal(run(model), baseline)


def test_a_plan_that_does_not_say_where_reduced_tokens_stand_is_an_error():
    model = tiny_flux_transformer()

    def plan(call, x):
        return BlockPlan(attn=Sublayer(lambda t: t[:, ::2], lambda y: y.repeat_interleave(2, dim=1)))

    patch = install(model, plan)
    try:
        with pytest.raises(UnsupportedModelError, match="gives no Sublayer.positions"):
            run(model)
    finally:
        patch.remove()

    def kv_plan(call, x):
        return BlockPlan(kv=KeyValue(tokens=lambda t: t[:, ::2]))

    patch = install(model, kv_plan)
    try:
        with pytest.raises(UnsupportedModelError, match="gives no KeyValue.positions"):
            run(model)
    finally:
        patch.remove()


def test_ids_that_are_not_a_row_major_grid_leave_calls_unreduced():
    model = tiny_flux_transformer()
    g = torch.Generator().manual_seed(0)
    kwargs = dict(encoder_hidden_states=torch.randn(1, 6, 32, generator=g), pooled_projections=torch.randn(1, 32),
                  timestep=torch.tensor([0.5]), txt_ids=torch.zeros(6, 3), guidance=torch.tensor([3.5]))
    x = torch.randn(1, 64, 16, generator=g)
    ids = image_ids(8, 8) + torch.tensor([1.0, 0.0, 0.0])  # a reference-image offset (Kontext-style)
    with torch.no_grad():
        baseline = model(hidden_states=x, img_ids=ids, **kwargs).sample
        with tokred.apply(model, "tome") as patch:
            out = model(hidden_states=x, img_ids=ids, **kwargs).sample
            assert all(c.attn == c.tokens for c in patch.token_counts().values())
    assert torch.equal(out, baseline)


def test_steps_follow_the_flux_timestep_scale():
    model = tiny_flux_transformer()
    with tokred.apply(model, "tome") as patch:
        flux_denoise(model, timesteps=(0.9, 0.8))
        assert patch.state.step == 2 and patch.state.last_timestep == pytest.approx(800.0)
        flux_denoise(model, timesteps=(0.9,))  # the timestep rose: a new generation
        assert patch.state.step == 1


def test_todo_stops_at_the_timestep_threshold_on_the_0_1000_scale():
    model = tiny_flux_transformer()
    with tokred.apply(model, "todo", timestep_threshold_stop=0.85) as patch:
        flux_denoise(model, timesteps=(0.9,))
        assert all(c.kv < c.tokens for c in patch.token_counts().values())
        patch.reset_token_counts()
        flux_denoise(model, timesteps=(0.8,))
        assert all(c.kv == c.tokens for c in patch.token_counts().values())


def test_cat_on_schnells_four_steps_with_the_default_t0_prunes_nothing_and_says_so():
    from tokred.methods.cat_pruning import CatNoPruningWarning

    pipe = tiny_flux_pipeline(guidance_embeds=False)
    with tokred.apply(pipe, "cat_pruning"), pytest.warns(CatNoPruningWarning, match="t0=8"):
        pipe(**pipe_inputs(pipe, steps=4))


# --- FLOPs on the meta device ------------------------------------------------------------------------------------
def test_flops_on_the_meta_device_go_down_with_tome_and_todo():
    from tokred.tasks import architectures as A

    config = A.config_with("flux_dev", dict(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                            axes_dims_rope=(4, 6, 6)))
    model = A.build_from_config("flux_dev", config, device="meta")
    inputs = A.flux_transformer_inputs(resolution=256, device="meta", max_sequence_length=16)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][..., :32]
    inputs["pooled_projections"] = inputs["pooled_projections"][..., :32]
    baseline = count_flops(lambda: model(**inputs))
    flops = {}
    for method in ("tome", "todo"):
        with tokred.apply(model, method):
            flops[method] = count_flops(lambda: model(**inputs))
    assert flops["tome"] < baseline and flops["todo"] < baseline
    with pytest.raises(TokredError, match="meta device"):
        tokred.apply(model, "cat_pruning")


# --- inside FluxPipeline -----------------------------------------------------------------------------------------
def pipe_inputs(pipe, steps: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(123)
    return dict(prompt_embeds=torch.randn(1, 6, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                height=32, width=32, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="pt")


@pytest.mark.parametrize("method", list(METHODS))
def test_pipeline_same_seed_same_image_different_from_the_baseline(method):
    pipe = tiny_flux_pipeline()
    baseline = pipe(**pipe_inputs(pipe)).images
    patch = tokred.apply(pipe, method, **METHODS[method])
    assert patch.adapter.root is pipe.transformer
    first = pipe(**pipe_inputs(pipe)).images
    counts = patch.token_counts()
    second = pipe(**pipe_inputs(pipe)).images
    patch.remove()
    assert torch.equal(first, second)
    assert not torch.equal(first, baseline)
    assert any(min(c.attn, c.kv, c.mlp) < c.tokens for c in counts.values())
    assert torch.equal(pipe(**pipe_inputs(pipe)).images, baseline)


def test_ca_tome_batch_independent_rows_match_each_sample_alone():
    from tiny_flux import smooth_tokens

    model = tiny_flux_transformer()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=smooth_tokens(2, 8, 8, 16, g), encoder_hidden_states=torch.randn(2, 6, 32, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.full((2,), 0.9),
                  guidance=torch.full((2,), 3.5), img_ids=image_ids(8, 8), txt_ids=torch.zeros(6, 3))
    first = {k: v[:1] if k not in ("img_ids", "txt_ids") else v for k, v in inputs.items()}
    options = dict(batch_independent=True, threshold=0.5, use_rand=False)  # random windows would differ per call
    with torch.no_grad(), tokred.apply(model, "ca_tome", **options) as patch:
        batched = model(**inputs).sample
        assert all(len(s.r) == 2 for s in patch.method_state.block_stats.values())
        alone = model(**first).sample
    torch.testing.assert_close(batched[:1], alone, rtol=1e-4, atol=1e-5)


def test_pipeline_with_tiny_clip_and_t5_text_encoders():
    pipe = tiny_flux_pipeline(text_encoders=True)
    kwargs = dict(prompt="a photo of a cat riding a horse", height=32, width=32, num_inference_steps=3,
                  max_sequence_length=8, output_type="pt")
    baseline = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    with tokred.apply(pipe, "tome") as patch:
        first = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
        second = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
        assert patch.state.generation == 2 and patch.state.step == 3
    assert torch.equal(first, second) and not torch.equal(first, baseline)
    assert torch.equal(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images, baseline)


# --- the architecture rows -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,tokens,guidance", [("flux_dev", 512, True), ("flux_schnell", 256, False)])
def test_random_init_pipeline_gives_flux_its_pipelines_conditioning(name, tokens, guidance):
    from tokred.tasks import architectures as A

    arch = A.get_architecture(name)
    assert arch.family == "diffusers_flux" and arch.pipeline_class == "FluxPipeline"
    assert (arch.default_steps, arch.guidance_scale) == ((28, 3.5) if guidance else (4, 0.0))
    config = arch.config()
    assert (config["num_layers"], config["num_single_layers"], config["num_attention_heads"],
            config["attention_head_dim"], config["guidance_embeds"]) == (19, 38, 24, 128, guidance)
    pipe = A.RandomInitPipeline(name, A.build(name, device="meta"), arch.scheduler())
    run = pipe.begin([0, 1], arch.default_steps, arch.guidance_scale, latent_size=128)  # 1024 px
    assert not run.cfg and run.latents.shape == (2, 64 * 64, 64)  # 2x2-packed, one branch per image
    cond = run.conditioning
    assert cond["encoder_hidden_states"].shape == (2, tokens, 4096) and cond["pooled_projections"].shape == (2, 768)
    assert cond["img_ids"].shape == (4096, 3) and cond["txt_ids"].shape == (tokens, 3)
    assert ("guidance" in cond) == guidance
    assert len(run.timesteps) == arch.default_steps


def test_random_init_sigmas_equal_flux_pipelines():
    from tokred.tasks import architectures as A

    pipe = tiny_flux_pipeline()
    pipe(**pipe_inputs(pipe, steps=5))  # 8x8 packed tokens
    ours = A.flux_dev_scheduler()
    A.flux_set_timesteps(ours, 5, 64, "cpu")
    assert torch.equal(ours.timesteps, pipe.scheduler.timesteps)
