"""CA-ToMe: parity with the official ``ca-tome`` 0.1.3, state per generation, batch independence, shape
changes, exact removal, option errors, and threshold merging on timm ViTs."""

import copy

import pytest
import torch
from conftest import require_reference
from tiny_models import tiny_sd_pipeline, tiny_sd_unet

import tokred
from tokred.errors import InvalidOptionError
from tokred.merge import grid_destinations, grid_matching
from tokred.methods.ca_tome import CACHE_PRESETS, resolve_compute_on, threshold_alternate_matching

TOP_LEVEL_SOURCES = 192  # 16x16 latent -> 256 tokens, one destination per 2x2 window -> 192 sources


@pytest.fixture(scope="module")
def unet():
    return tiny_sd_unet()


def unet_calls(steps, batch=2, latent=16, seed=1):
    """Denoiser inputs for ``steps`` calls with falling timesteps (one generation of a bare U-Net)."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, 7, 32, generator=g)
    return [(torch.randn(batch, 4, latent, latent, generator=g), torch.tensor(950 - 80 * i), ctx) for i in range(steps)]


def call(model, sample, t, ctx):
    with torch.no_grad():
        return model(sample, t, encoder_hidden_states=ctx).sample


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --- parity with the official package ------------------------------------------------------------------


def run_official(unet, calls, compute_on, **options):
    """The official block patch, driven as its own pipeline drives it: ``inference_step`` = call index + 1."""
    ca_patch = require_reference("ca_tome.patch")
    ref = copy.deepcopy(unet)
    ca_patch.apply_patch(ref, list(compute_on), **options)
    blocks = [m for m in ref.modules() if hasattr(m, "_cache_info")]
    assert blocks
    outs = []
    for i, (s, t, c) in enumerate(calls):
        for b in blocks:
            b.inference_step = i + 1
        outs.append(call(ref, s, t, c))
    return outs


SCHEDULE = [0, 3, 4, 7, 10]  # over 10 calls: computed at 1 (empty cache), 3, 4, 7, 10; reused at 2, 5, 6, 8, 9


@pytest.mark.parametrize("threshold", [0.5, 0.7])
def test_parity_with_official_at_every_step(unet, threshold):
    require_reference("ca_tome")
    calls = unet_calls(10)
    theirs = run_official(unet, calls, SCHEDULE, r=threshold, use_rand=False)

    mine = copy.deepcopy(unet)
    patch = tokred.apply(mine, "ca_tome", threshold=threshold, compute_on=SCHEDULE, use_rand=False)
    first = mine.down_blocks[0].attentions[0].transformer_blocks[0]
    inputs = []
    first.register_forward_pre_hook(
        lambda m, a, k: inputs.append(k.get("hidden_states", a[0] if a else None)), with_kwargs=True
    )
    a_idx, b_idx = grid_destinations(16, 16, 2, 2, None, torch.device("cpu"))
    reuse_changed_r = False
    for step, ((s, t, c), ref) in enumerate(zip(calls, theirs, strict=True), start=1):
        ours = call(mine, s, t, c)
        assert patch.state.step == step
        assert rel_diff(ours, ref) <= 1e-5, (step, rel_diff(ours, ref))
        stats = patch.method_state.block_stats
        assert len(stats) == 5  # the five top-level transformer blocks (max_downsample=1)
        for stat in stats.values():
            assert stat.tokens == 256 and stat.computed == (step in SCHEDULE or step == 1)
            assert 0 < stat.r[0] < TOP_LEVEL_SOURCES  # merging really happens, and not of everything
        # On a reused step a fresh search would have chosen another count: the cache is what is tested.
        fresh = grid_matching(inputs[-1], a_idx, b_idx, threshold=threshold)
        cached_r = stats["down_blocks.0.attentions.0.transformer_blocks.0"].r[0]
        if step not in SCHEDULE and step != 1:
            reuse_changed_r |= fresh.r != cached_r
        else:
            assert fresh.r == cached_r
    assert reuse_changed_r


@pytest.mark.parametrize("batch", [2, 1])
def test_parity_with_official_random_destinations(unet, batch):
    """With ``use_rand`` both fork the global RNG at the first merging block, so the first image matches; an
    odd batch falls back to top-left destinations in both."""
    require_reference("ca_tome")
    calls = unet_calls(4, batch=batch)
    torch.manual_seed(3)
    theirs = run_official(unet, calls, [0, 3], r=0.7)
    mine = copy.deepcopy(unet)
    tokred.apply(mine, "ca_tome", threshold=0.7, compute_on=[0, 3])
    torch.manual_seed(3)
    ours = [call(mine, *c) for c in calls]
    for a, b in zip(ours, theirs, strict=True):
        assert rel_diff(a, b) <= 1e-5
    top_left = copy.deepcopy(unet)
    tokred.apply(top_left, "ca_tome", threshold=0.7, compute_on=[0, 3], use_rand=False)
    differs = rel_diff(call(top_left, *calls[0]), theirs[0]) > 1e-4
    assert differs == (batch % 2 == 0)  # the random draw is used, and matters, for even batches only


def test_parity_with_official_layout_options(unet):
    """Merging for cross-attention and the MLP too, and in the 2x downsampled blocks."""
    require_reference("ca_tome")
    options = dict(max_downsample=2, merge_crossattn=True, merge_mlp=True, use_rand=False)
    calls = unet_calls(3)
    theirs = run_official(unet, calls, [0, 3], r=0.6, **options)
    mine = copy.deepcopy(unet)
    patch = tokred.apply(mine, "ca_tome", threshold=0.6, compute_on=[0, 3], **options)
    for step, (c, ref) in enumerate(zip(calls, theirs, strict=True), start=1):
        assert rel_diff(call(mine, *c), ref) <= 1e-5
        stats = patch.method_state.block_stats
        assert sorted(s.tokens for s in stats.values()) == [64] * 5 + [256] * 5
        assert all(0 < s.r[0] < 3 * s.tokens // 4 and s.computed == (step != 2) for s in stats.values())


def test_presets_equal_official_cache_conf():
    ca_tome = require_reference("ca_tome")
    conf = ca_tome.CacheConf
    official = {
        "config_1": conf.CONFIG_1,
        "config_2": conf.CONFIG_2,
        "config_3": conf.CONFIG_3,
        "config_4": conf.CONFIG_4,
        "adaptive": conf.ADAPTIVE,
        "config_five": conf.CONFIG_Five,
    }
    assert {k: list(v) for k, v in CACHE_PRESETS.items()} == official
    assert resolve_compute_on("CONFIG_Five") == frozenset(conf.CONFIG_Five)
    assert tokred.get_method("ca_tome").options["diffusers_unet"]().compute_on == "config_3"


# --- our own behaviour -------------------------------------------------------------------------------


def test_two_generations_with_the_same_seed_are_identical():
    """The pairs and the random stream start afresh every generation (the official package keeps the last
    image's pairs: with compute_on=[2], its second image would start from the first image's step-2 pairs)."""
    pipe = tiny_sd_pipeline()
    patch = tokred.apply(pipe, "ca_tome", compute_on=[2], threshold=0.5)

    def generate():
        torch.manual_seed(0)
        return pipe(
            "a cat",
            num_inference_steps=3,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    first, second = generate(), generate()
    assert patch.state.generation == 2 and patch.state.step == 3
    assert torch.equal(first, second)

    # The test can fail: keeping the cache across generations, as the official code does, changes the image.
    patch.method_state.reset = patch.method_state.block_stats.clear  # keep the cached pairs
    assert not torch.equal(first, generate())


def test_batch_independent_sample_alone_equals_sample_in_batch(unet):
    mine = copy.deepcopy(unet)
    calls = unet_calls(2, batch=3, seed=4)  # step 1 computes, step 2 reuses (compute_on default config_3)

    def row0(patch, batch):
        patch.reset()
        outs, rs = [], []
        for s, t, c in calls:
            outs.append(call(mine, s[:batch], t, c[:batch])[:1])
            rs.append([stat.r[0] for stat in patch.method_state.block_stats.values()])
        return outs, rs

    patch = tokred.apply(mine, "ca_tome", seed=0, batch_independent=True, threshold=0.6)
    alone, r_alone = row0(patch, 1)
    for batch in (2, 3):  # even and odd batches alike
        together, r_together = row0(patch, batch)
        assert r_together == r_alone
        for a, b in zip(together, alone, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(len(stat.r) == 3 for stat in patch.method_state.block_stats.values())

    # Default mode couples the rows (batch-max r; top-left destinations for odd batches): it differs.
    patch = tokred.apply(mine, "ca_tome", seed=0, threshold=0.6)
    coupled, r_coupled = row0(patch, 3)
    assert r_coupled != r_alone
    assert rel_diff(coupled[0], alone[0]) > 1e-4


def test_batch_size_and_resolution_changes_recompute(unet):
    mine, forced = copy.deepcopy(unet), copy.deepcopy(unet)
    patch = tokred.apply(mine, "ca_tome", compute_on=[], use_rand=False, threshold=0.6)
    tokred.apply(forced, "ca_tome", compute_on=[2], use_rand=False, threshold=0.6)
    (s1, t1, c1), (s2, t2, c2) = unet_calls(2, batch=2, seed=5)
    s2, c2 = torch.cat([s2, s2.flip(0)]), torch.cat([c2, c2])  # batch 2 -> 4 on a reuse step
    call(mine, s1, t1, c1)
    call(forced, s1, t1, c1)
    out = call(mine, s2, t2, c2)
    assert out.shape[0] == 4
    assert all(stat.computed for stat in patch.method_state.block_stats.values())
    assert torch.equal(out, call(forced, s2, t2, c2))  # the same as a planned recompute at that step

    call(mine, s2, torch.tensor(700), c2)
    assert not any(stat.computed for stat in patch.method_state.block_stats.values())  # same shape: reused

    big = torch.randn(4, 4, 24, 24, generator=torch.Generator().manual_seed(6))
    out = call(mine, big, torch.tensor(600), c2)  # new resolution on a reuse step
    assert out.shape == big.shape and torch.isfinite(out).all()
    stats = patch.method_state.block_stats
    assert patch.state.step == 4 and all(stat.computed and stat.tokens == 576 for stat in stats.values())


def test_remove_restores_bit_exactly(unet):
    mine = copy.deepcopy(unet)
    s, t, c = unet_calls(1)[0]
    state = {k: v.clone() for k, v in mine.state_dict().items()}
    before = call(mine, s, t, c)
    with tokred.apply(mine, "ca_tome", threshold=0.5):
        reduced = call(mine, s, t, c)
    assert not torch.equal(before, reduced)
    assert torch.equal(before, call(mine, s, t, c))
    assert all(torch.equal(state[k], v) for k, v in mine.state_dict().items())
    assert not any("forward" in vars(m) for m in mine.modules())
    assert tokred.get_patch(mine) is None


def test_threshold_one_disables_merging(unet):
    mine = copy.deepcopy(unet)
    s, t, c = unet_calls(1)[0]
    before = call(mine, s, t, c)
    with tokred.apply(mine, "ca_tome", threshold=1.0) as patch:
        assert torch.equal(call(mine, s, t, c), before)
        assert not patch.method_state.block_stats


@pytest.mark.parametrize(
    "options, match",
    [
        ({"threshold": 1.5}, r"option 'threshold'=1.5 is invalid; valid: -1 <= threshold <= 1"),
        ({"threshold": -1.01}, "option 'threshold'"),
        ({"threshold": True}, "option 'threshold'"),
        ({"threshold": "0.7"}, "option 'threshold'"),
        (
            {"compute_on": "config_9"},
            r"'config_9' is invalid; valid: a preset name \(config_1, config_2, config_3, "
            r"config_4, adaptive, config_five",
        ),
        ({"compute_on": [1, 2.5]}, "option 'compute_on'"),
        ({"compute_on": [1, True]}, "option 'compute_on'"),
        ({"compute_on": [-1, 3]}, "option 'compute_on'"),
        ({"compute_on": 5}, "option 'compute_on'"),
        ({"max_downsample": 3}, "option 'max_downsample'"),
        ({"batch_independent": 1}, "option 'batch_independent'"),
        ({"ratio": 0.5}, r"unknown option 'ratio'.*Valid options: threshold"),
    ],
)
def test_bad_options_raise_at_apply(unet, options, match):
    with pytest.raises(InvalidOptionError, match=match):
        tokred.apply(unet, "ca_tome", **options)
    assert tokred.get_patch(unet) is None


def test_compute_on_accepts_presets_and_step_lists(unet):
    mine = copy.deepcopy(unet)
    for value in ["adaptive", "CONFIG_3", (1, 5), range(0, 50, 5), []]:
        tokred.apply(mine, "ca_tome", compute_on=value).remove()
    assert resolve_compute_on("adaptive") == frozenset(CACHE_PRESETS["adaptive"])


# --- timm ViTs: threshold instead of a fixed r ---------------------------------------------------------


def test_vit_threshold_one_is_bit_identical(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        baseline = tiny_vit(x)
        with tokred.apply(tiny_vit, "ca_tome", threshold=1.0) as patch:
            assert torch.equal(tiny_vit(x), baseline)
            assert patch.adapter.merged_tokens.size is None


def test_vit_lower_threshold_merges_more(tiny_vit):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    counts = []
    with torch.no_grad():
        for threshold in (0.9, 0.8, 0.5, -1.0):
            with tokred.apply(tiny_vit, "ca_tome", threshold=threshold) as patch:
                tiny_vit(x)
                size = patch.adapter.merged_tokens.size
                counts.append(65 if size is None else size.shape[1])
                if size is not None:
                    assert torch.equal(size.sum(dim=1).flatten(), torch.full((2,), 65.0))
        assert counts[0] == 65 and counts[0] > counts[1] > counts[2] > counts[3]  # 65, 59, 15, 5 here
        # At threshold -1 every unprotected source qualifies: ToMe with r capped at half the tokens.
        with tokred.apply(tiny_vit, "ca_tome", threshold=-1.0):
            everything = tiny_vit(x)
        with tokred.apply(tiny_vit, "tome", r=1000):
            assert torch.equal(everything, tiny_vit(x))


def test_vit_threshold_counts_batch_max_of_qualifying_sources():
    # Token 0 protected; sources are even positions 2, 4, 6, destinations odd positions 1, 3, 5, 7.
    e = torch.eye(4)
    near = lambda v, eps: v + eps * torch.tensor([0.0, 0.0, 0.0, 1.0])
    dst = [e[0], e[1], e[2], e[3]]
    sample0 = torch.stack([e[3], dst[0], near(e[0], 0.1), dst[1], near(e[1], 2.0), dst[2], near(e[2], 2.0), dst[3]])
    sample1 = torch.stack([e[3], dst[0], near(e[0], 0.1), dst[1], near(e[1], 0.2), dst[2], near(e[2], 2.0), dst[3]])
    merge = threshold_alternate_matching(torch.stack([sample0, sample1]), 0.95, num_protected=1)
    assert merge.r == 2  # sample 0 has one source above 0.95, sample 1 two: the batch max
    assert merge.src_idx[0, 0, 0] == 1  # position 2 is source 1 (position 0, the cls token, is source 0)
    assert threshold_alternate_matching(torch.stack([sample0, sample0]), 0.95, 1).r == 1
    assert threshold_alternate_matching(torch.stack([sample0, sample1]), 1.0, 1) is None


def test_vit_rejects_diffusion_only_options(tiny_vit):
    with pytest.raises(
        InvalidOptionError,
        match=r"ca_tome \(timm_vit\): unknown option 'compute_on'.*Valid options: "
        r"threshold",
    ):
        tokred.apply(tiny_vit, "ca_tome", compute_on="config_3")
    with pytest.raises(InvalidOptionError, match="unknown option 'batch_independent'"):
        tokred.apply(tiny_vit, "ca_tome", batch_independent=True)
