"""ToMe speed on CPU: DeiT-S (tokred vs unreduced) and the SD1.5 U-Net (tokred vs tomesd vs unreduced).

Run: ``pytest benchmarks/test_tome.py --benchmark-only --benchmark-json=tome.json``. Each variant's median
and its speedup over the baseline measured earlier in the same session land in ``extra_info``; CPU timings
drift between runs, so only ratios from one run are meaningful.
"""

from __future__ import annotations

import pytest
import torch
from conftest import unet_inputs

import tokred
from tokred.flops import count_flops

MEDIANS: dict[str, float] = {}


def record(benchmark, group: str, variant: str, **info) -> None:
    median = benchmark.stats.stats.median
    MEDIANS[f"{group}/{variant}"] = median
    baseline = MEDIANS.get(f"{group}/baseline")
    benchmark.extra_info.update(info, variant=variant, median_s=median)
    if baseline is not None:
        benchmark.extra_info["speedup_vs_baseline"] = baseline / median


@pytest.fixture(scope="module")
def deit_small():
    import timm

    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


@pytest.mark.parametrize("variant", ["baseline", "tome_r13"])
def test_deit_small_throughput(benchmark, deit_small, variant):
    benchmark.group = "deit_small_patch16_224 224px batch 8 cpu"
    x = torch.randn(8, 3, 224, 224)
    patch = tokred.apply(deit_small, "tome", r=13) if variant != "baseline" else None
    try:
        with torch.inference_mode():
            benchmark.pedantic(deit_small, args=(x,), rounds=10, warmup_rounds=2, iterations=1)
            gflops = count_flops(lambda: deit_small(x[:1])) / 1e9
    finally:
        if patch is not None:
            patch.remove()
    record(benchmark, "deit", variant, gflops_per_image=gflops, images_per_s=8 / benchmark.stats.stats.median)


@pytest.mark.parametrize("variant", ["baseline", "tokred_tome_0.5", "tomesd_0.5"])
def test_sd15_unet_step(benchmark, sd15_unet, variant):
    benchmark.group = "sd1.5 unet 32x32 latents batch 2 cpu"
    inputs = unet_inputs(batch=2, latent=32)
    patch = None
    if variant.startswith("tokred"):
        patch = tokred.apply(sd15_unet, "tome", ratio=0.5)
    elif variant.startswith("tomesd"):
        tomesd = pytest.importorskip("tomesd")
        tomesd.apply_patch(sd15_unet, ratio=0.5)  # patches block classes in place; removed below
    # tomesd reads the sample positionally, so every variant is called the same way
    args = (inputs["sample"], inputs["timestep"])
    kwargs = {"encoder_hidden_states": inputs["encoder_hidden_states"]}
    try:
        with torch.inference_mode():
            benchmark.pedantic(sd15_unet, args=args, kwargs=kwargs, rounds=3, warmup_rounds=1, iterations=1)
            gflops = count_flops(lambda: sd15_unet(*args, **kwargs)) / 1e9
    finally:
        if patch is not None:
            patch.remove()
        if variant.startswith("tomesd"):
            tomesd.remove_patch(sd15_unet)
    record(benchmark, "unet", variant, gflops_per_call=gflops)
