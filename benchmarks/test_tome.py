"""ToMe speed on CPU: DeiT-S (tokred vs unreduced) and the SD1.5 U-Net (tokred vs tomesd vs unreduced).

Run: ``pytest benchmarks/test_tome.py --benchmark-only --benchmark-json=tome.json``.

CPU timings here drift by tens of percent between runs, so the variants are measured *interleaved*: each
benchmark round runs every variant once (patch, call, unpatch) and times each call; pytest-benchmark's own
statistics are those of a whole round, and ``extra_info`` holds every variant's median and its speedup over
the baseline from the same rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
from conftest import unet_inputs

import tokred
from tokred.flops import count_flops


def interleaved(benchmark, call: Callable[[], object], variants: dict[str, tuple[Callable, Callable]], rounds: int):
    """Time ``call`` under each variant (enter, exit) once per round; return {variant: median seconds}."""
    times: dict[str, list[float]] = {name: [] for name in variants}

    def one_round() -> None:
        for name, (enter, leave) in variants.items():
            enter()
            try:
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
            finally:
                leave()

    with torch.inference_mode():
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=1, iterations=1)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["baseline"]
    benchmark.extra_info["median_s"] = medians
    benchmark.extra_info["speedup_vs_baseline"] = {name: base / m for name, m in medians.items()}
    return medians


def noop() -> None:
    pass


def test_deit_small_throughput(benchmark):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    x = torch.randn(8, 3, 224, 224)
    holder: dict[str, tokred.Patch] = {}
    variants = {
        "baseline": (noop, noop),
        "tome_r13": (lambda: holder.update(p=tokred.apply(model, "tome", r=13)), lambda: holder.pop("p").remove()),
    }
    medians = interleaved(benchmark, lambda: model(x), variants, rounds=10)
    full = count_flops(lambda: model(x[:1]))
    with tokred.apply(model, "tome", r=13):
        reduced = count_flops(lambda: model(x[:1]))
    benchmark.extra_info.update(
        model="deit_small_patch16_224",
        batch=8,
        images_per_s={name: 8 / m for name, m in medians.items()},
        gflops_per_image={"baseline": full / 1e9, "tome_r13": reduced / 1e9},
    )


def test_sd15_unet_step(benchmark, sd15_unet):
    tomesd = pytest.importorskip("tomesd")
    inputs = unet_inputs(batch=2, latent=32)
    # tomesd's size hook reads the sample positionally, so every variant is called the same way
    args = (inputs["sample"], inputs["timestep"])
    kwargs = {"encoder_hidden_states": inputs["encoder_hidden_states"]}
    holder: dict[str, tokred.Patch] = {}
    variants = {
        "baseline": (noop, noop),
        "tokred_tome_0.5": (
            lambda: holder.update(p=tokred.apply(sd15_unet, "tome", ratio=0.5)),
            lambda: holder.pop("p").remove(),
        ),
        "tomesd_0.5": (lambda: tomesd.apply_patch(sd15_unet, ratio=0.5), lambda: tomesd.remove_patch(sd15_unet)),
    }
    interleaved(benchmark, lambda: sd15_unet(*args, **kwargs), variants, rounds=4)
    full = count_flops(lambda: sd15_unet(*args, **kwargs))
    with tokred.apply(sd15_unet, "tome", ratio=0.5):
        reduced = count_flops(lambda: sd15_unet(*args, **kwargs))
    benchmark.extra_info.update(
        model="SD1.5 UNet2DConditionModel config, random init",
        latent="32x32",
        batch=2,
        gflops_per_call={"baseline": full / 1e9, "tome_0.5": reduced / 1e9},
    )
