"""CAT pruning on SD1.5's U-Net (full configuration, random init) on CPU: a pruned step against a full step.

Run: ``pytest benchmarks/test_cat_pruning.py --benchmark-only --benchmark-json=cat.json`` (32x32 latents,
about 11 U-Net calls: a few minutes). ``TOKRED_BENCH_64=1`` adds 64x64 latents (SD1.5's 512 px; one call takes
tens of seconds on a small CPU).

CAT is stateful: a pruned call needs the reference, clusters and caches of earlier calls. Each benchmark applies
the method with ``t0=2``, primes it with calls 1 (reference) and 2 (clustering, caches), after which every call
is a pruned one. The *full* step is the same patched model at a call without a selection (the patch's dense path,
bit-identical to the unpatched U-Net, see tests/test_cat_pruning.py). Full and pruned calls
alternate within each benchmark round, because CPU timings drift between runs. ``extra_info`` holds GFLOPs per
call (``tokred.flops.count_flops``), median seconds per call, their ratios, the same FLOPs with every U-Net level
pruned (``max_downsample=8``), the FLOP reduction of a whole 50-step generation with the default ``t0=8`` (the
paper reports 50-60% on SD3), and the cost of the one-off clustering and of the per-step selection on the real
noise output.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from conftest import unet_inputs

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
    assert g.sel is not None and g.sel_step == patch.state.step + 1
    return patch


@pytest.mark.parametrize("latent", LATENTS)
def test_sd15_unet_pruned_vs_full_step(benchmark, sd15_unet, latent):
    inputs = unet_inputs(batch=2, latent=latent)
    call = lambda: sd15_unet(**inputs).sample  # a constant timestep: calls count up inside one generation
    outputs = {}
    with torch.inference_mode():
        patch = _primed(sd15_unet, call)
        try:
            g = patch.method_state

            def full_step():
                # no selection for this call: every token computed (the patch's dense path, bit-identical to
                # the unpatched U-Net) and the caches refreshed; the next call prunes again
                g.sel_step = -1
                out = call()
                g.sel_step = patch.state.step + 1
                return out

            def pruned_step():
                outputs["pruned"] = call()

            times: dict[str, list[float]] = {"full": [], "pruned": []}

            def one_round() -> None:
                for name, fn in (("full", full_step), ("pruned", pruned_step)):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)

            benchmark.pedantic(one_round, rounds=2, warmup_rounds=0, iterations=1)
            full_flops = count_flops(full_step)
            pruned_flops = count_flops(pruned_step)

            # clustering (once per generation) and selection (every pruned step) on this U-Net's noise output
            tokens = outputs["pruned"].flatten(2).transpose(1, 2).float()
            h = w = latent
            k = min(20, h * w)
            labels = S.kmeans(S.clustering_features(tokens, h, w), k)
            change = (tokens - tokens.roll(1, 1)).norm(dim=-1)
            scores = S.cluster_scores(S.cluster_max(tokens, labels, k))
            budget = int(ALPHA * h * w)
            clustering_ms = _median_ms(lambda: S.kmeans(S.clustering_features(tokens, h, w), k), repeats=3)
            selection_ms = _median_ms(lambda: S.select_tokens(change, labels, scores, g.counts, budget, False))
        finally:
            patch.remove()

        # the same pruned step with every level pruned (pooled index maps); FLOPs only
        patch = _primed(sd15_unet, call, max_downsample=8)
        try:
            all_levels_flops = count_flops(call)
        finally:
            patch.remove()

    medians = {name: statistics.median(t) for name, t in times.items()}
    t0, steps = 8, 50

    def generation_reduction(pruned: float) -> float:
        return 1 - (t0 * full_flops + (steps - t0) * pruned) / (steps * full_flops)

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
        median_s=medians,
        time_ratio_pruned_vs_full=medians["pruned"] / medians["full"],
        generation_flops_reduction_50_steps_t0_8={
            "max_downsample_1": generation_reduction(pruned_flops),
            "max_downsample_8": generation_reduction(all_levels_flops),
        },
        clustering_ms=clustering_ms,
        selection_ms=selection_ms,
        clustering_share_of_full_step=clustering_ms / 1000 / medians["full"],
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
