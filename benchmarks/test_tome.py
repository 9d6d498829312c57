"""ToMe speed on CPU: DeiT-S (tokred vs unreduced) and the SD1.5 U-Net (tokred vs tomesd vs unreduced).

Run: ``pytest benchmarks/test_tome.py --benchmark-only --benchmark-json=tome.json``.

The variants are timed in the same rounds (:func:`conftest.paired_rounds`: each round runs every variant once,
patch, call, unpatch, in an order that rotates between rounds; the warm-up round is dropped from every figure).
``extra_info`` holds each variant's median over the timed rounds and its speedup over the baseline: the median of
the per-round ratios with a 95% bootstrap interval. pytest-benchmark's own statistics are those of a whole round.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import paired_rounds, timed_call, unet_inputs

import tokred
from tokred.flops import count_flops


def patched(call: Callable[[], object], enter: Callable[[], object], leave: Callable[[], object]):
    """A variant: patch with ``enter()``, time one ``call()``, unpatch with ``leave()`` (untimed)."""

    def run() -> float:
        enter()
        try:
            return timed_call(call)
        finally:
            leave()

    return run


def test_deit_small_throughput(benchmark):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    x = torch.randn(8, 3, 224, 224)
    call = lambda: model(x)
    holder: dict[str, tokred.Patch] = {}
    variants = {
        "baseline": lambda: timed_call(call),
        "tome_r13": patched(call, lambda: holder.update(p=tokred.apply(model, "tome", r=13)),
                            lambda: holder.pop("p").remove()),
    }  # fmt: skip
    timed = paired_rounds(benchmark, variants, rounds=10)
    full = count_flops(lambda: model(x[:1]))
    with tokred.apply(model, "tome", r=13):
        reduced = count_flops(lambda: model(x[:1]))
    benchmark.extra_info.update(
        model="deit_small_patch16_224",
        batch=8,
        images_per_s={name: 8 / benchmark.extra_info["median_s"][name] for name in timed},
        gflops_per_image={"baseline": full / 1e9, "tome_r13": reduced / 1e9},
        flops_ideal_speedup={"tome_r13": full / reduced},
    )


def test_sd15_unet_step(benchmark, sd15_unet):
    tomesd = pytest.importorskip("tomesd")
    inputs = unet_inputs(batch=2, latent=32)
    # tomesd's size hook reads the sample positionally, so every variant is called the same way
    args = (inputs["sample"], inputs["timestep"])
    kwargs = {"encoder_hidden_states": inputs["encoder_hidden_states"]}
    call = lambda: sd15_unet(*args, **kwargs)
    holder: dict[str, tokred.Patch] = {}
    variants = {
        "baseline": lambda: timed_call(call),
        "tokred_tome_0.5": patched(call, lambda: holder.update(p=tokred.apply(sd15_unet, "tome", ratio=0.5)),
                                   lambda: holder.pop("p").remove()),
        "tomesd_0.5": patched(call, lambda: tomesd.apply_patch(sd15_unet, ratio=0.5),
                              lambda: tomesd.remove_patch(sd15_unet)),
    }  # fmt: skip
    paired_rounds(benchmark, variants, rounds=5)
    full = count_flops(call)
    with tokred.apply(sd15_unet, "tome", ratio=0.5):
        reduced = count_flops(call)
    benchmark.extra_info.update(
        model="SD1.5 UNet2DConditionModel config, random init",
        latent="32x32",
        batch=2,
        gflops_per_call={"baseline": full / 1e9, "tome_0.5": reduced / 1e9},
        flops_ideal_speedup={"tome_0.5": full / reduced},
    )
