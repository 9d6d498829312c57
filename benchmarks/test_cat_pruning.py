"""CAT pruning on SD1.5's U-Net (full configuration, random init) on CPU: a pruned step against a full step.

Run: ``pytest benchmarks/test_cat_pruning.py --benchmark-only --benchmark-json=cat.json`` (32x32 latents, about
30 U-Net calls: a few minutes). ``TOKRED_BENCH_64=1`` adds 64x64 latents (SD1.5's 512 px; one call takes tens of
seconds on a small CPU).

CAT is stateful: a pruned call needs the reference, clusters and caches of earlier calls. Each round applies the
method with ``t0=2`` afresh and primes it with calls 1 (reference) and 2 (clustering, caches), untimed; the next
call, timed, is a pruned one. The *full* step is the same call on the **unpatched** U-Net (the patch removed), so
it carries none of the patch's overhead. Both are timed in every round, the warm-up round dropped, the order
rotating between rounds (:func:`conftest.paired_rounds`); ``speedup["pruned"]`` is the median of the per-round
ratios full / pruned with a 95% bootstrap interval.

``extra_info`` also holds GFLOPs per call (``tokred.flops.count_flops``), the same FLOPs with every U-Net level
pruned (``max_downsample=8``), and the cost of the one-off clustering and of the per-step selection on the real
noise output. ``extrapolated_generation_flops_reduction_50_steps_t0_8`` is **extrapolated**, not measured: the
FLOP reduction a whole 50-step generation with the default ``t0=8`` would get if every pruned step cost what this
one does (the paper reports 50-60% on SD3).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from conftest import paired_rounds, timed_call, unet_inputs

import tokred
from tokred.flops import count_flops
from tokred.methods import cat_pruning_select as S

LATENTS = [32] + ([64] if os.environ.get("TOKRED_BENCH_64") else [])
ALPHA = 0.3


def _median_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _primed(unet, call, **options) -> tokred.Patch:
    """``unet`` patched with CAT (t0=2) after calls 1 (reference) and 2 (clustering, caches): the next call prunes."""
    patch = tokred.apply(unet, "cat_pruning", t0=2, alpha=ALPHA, **options)
    call()
    call()
    g = patch.method_state
    assert g.sel is not None and g.sel_step == patch.state.step + 1  # (read only: the next call prunes)
    return patch


@pytest.mark.parametrize("latent", LATENTS)
def test_sd15_unet_pruned_vs_full_step(benchmark, sd15_unet, latent):
    inputs = unet_inputs(batch=2, latent=latent)
    call = lambda: sd15_unet(**inputs).sample  # a constant timestep: calls count up inside one generation
    outputs = {}

    def full_step() -> float:
        assert tokred.get_patch(sd15_unet) is None
        return timed_call(call)

    def pruned_step() -> float:
        patch = _primed(sd15_unet, call)
        try:
            start = time.perf_counter()
            outputs["pruned"] = call()
            seconds = time.perf_counter() - start
            outputs["counts"] = patch.method_state.counts
        finally:
            patch.remove()
        return seconds

    paired_rounds(benchmark, {"full": full_step, "pruned": pruned_step}, baseline="full")
    with torch.inference_mode():
        full_flops = count_flops(call)  # unpatched
        patch = _primed(sd15_unet, call)
        try:
            pruned_flops = count_flops(call)
        finally:
            patch.remove()

        # clustering (once per generation) and selection (every pruned step) on this U-Net's noise output
        tokens = outputs["pruned"].flatten(2).transpose(1, 2).float()
        h = w = latent
        k = min(20, h * w)
        labels = S.kmeans(S.clustering_features(tokens, h, w), k)
        change = (tokens - tokens.roll(1, 1)).norm(dim=-1)
        scores = S.cluster_scores(S.cluster_max(tokens, labels, k))
        budget = int(ALPHA * h * w)
        clustering_ms = _median_ms(lambda: S.kmeans(S.clustering_features(tokens, h, w), k), repeats=3)
        selection_ms = _median_ms(lambda: S.select_tokens(change, labels, scores, outputs["counts"], budget, False))

        # the same pruned step with every level pruned (pooled index maps); FLOPs only
        patch = _primed(sd15_unet, call, max_downsample=8)
        try:
            all_levels_flops = count_flops(call)
        finally:
            patch.remove()

    t0, steps = 8, 50

    def extrapolated_reduction(pruned: float) -> float:
        return 1 - (t0 * full_flops + (steps - t0) * pruned) / (steps * full_flops)

    full_s = benchmark.extra_info["median_s"]["full"]
    benchmark.extra_info.update(
        model="SD1.5 UNet2DConditionModel config, random init",
        latent=f"{latent}x{latent}",
        batch=2,
        alpha=ALPHA,
        gflops_per_call={
            "full": full_flops / 1e9,
            "pruned": pruned_flops / 1e9,
            "pruned_all_levels": all_levels_flops / 1e9,
        },
        flops_ratio_pruned_vs_full=pruned_flops / full_flops,
        flops_ratio_pruned_all_levels_vs_full=all_levels_flops / full_flops,
        flops_ideal_speedup={"pruned": full_flops / pruned_flops},
        extrapolated_generation_flops_reduction_50_steps_t0_8={
            "max_downsample_1": extrapolated_reduction(pruned_flops),
            "max_downsample_8": extrapolated_reduction(all_levels_flops),
        },
        extrapolated_note="extrapolated from one pruned step's FLOPs, assuming every pruned step of a 50-step "
        "generation costs the same; not measured",
        clustering_ms=clustering_ms,
        selection_ms=selection_ms,
        clustering_share_of_full_step=clustering_ms / 1000 / full_s,
    )
    assert all_levels_flops < pruned_flops < full_flops


def test_clustering_cost_sd3_size(benchmark):
    """The one-off k-means at SD3-medium's size: 2 x 4096 tokens (1024 px) of 64 noise channels, 20 clusters."""
    tokens = torch.randn(2, 4096, 64, generator=torch.Generator().manual_seed(0))
    result = benchmark.pedantic(
        lambda: S.kmeans(S.clustering_features(tokens, 64, 64), 20), rounds=3, warmup_rounds=1, iterations=1
    )
    assert result.shape == (2, 4096)
    benchmark.extra_info.update(tokens="2 x 4096 x 64", clusters=20)
