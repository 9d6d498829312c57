"""Shared fixtures and the paired statistics for the full-size CPU benchmarks (random weights: speed only, never
quality).

Timing follows the suite's rules (:mod:`tokred.bench.timing`, :mod:`tokred.bench.stats`): variants are timed in
the same rounds, in an order that rotates from round to round; warm-up rounds are run and dropped; a speedup is
the median of the per-round ratios ``baseline / variant`` with its 95% bootstrap interval (fixed seed).

``TOKRED_BENCH_TINY=1`` replaces SD1.5's U-Net by a narrow one with the same block layout and text width: a smoke
test of the benchmark files in seconds, whose numbers mean nothing.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tokred.bench import stats
from tokred.tasks.architectures import build_unet, sd15_unet_config

TINY = os.environ.get("TOKRED_BENCH_TINY") == "1"
TINY_UNET = dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=2, norm_num_groups=8, layers_per_block=1)


def sd15_unet_config_for_bench() -> dict:
    """Stable Diffusion 1.5's U-Net configuration (:func:`tokred.tasks.architectures.sd15_unet_config`), or the tiny
    smoke-test one."""
    return sd15_unet_config(TINY_UNET) if TINY else sd15_unet_config()


@pytest.fixture(scope="session")
def sd15_unet():
    """SD1.5's U-Net at random init (about 3.4 GB in fp32), built once per session."""
    return build_unet(sd15_unet_config_for_bench(), seed=0)


def unet_inputs(batch: int = 2, latent: int = 32, seed: int = 0) -> dict:
    """Denoiser inputs like one CFG step of SD1.5: latents, a timestep and 77 text tokens of width 768."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, latent, latent, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, 77, 768, generator=g),
    )


def paired_rounds(
    benchmark: Any,
    variants: dict[str, Callable[[], float | dict[str, float]]],
    rounds: int = stats.MIN_ROUNDS,
    warmup_rounds: int = 1,
    baseline: str = "baseline",
    rotate: bool = True,
) -> dict[str, list[float]]:
    """Run every variant once per round; ``variants[name]()`` returns the seconds of its timed call (or
    ``{label: seconds}`` for a variant that times several calls, e.g. two steps of one patch). With ``rotate`` the
    order rotates by one each round (without, for variants whose order matters, it stays as given). The warm-up
    rounds are dropped. ``extra_info`` gets ``rounds``, ``warmup_rounds``, ``median_s`` per timed label and, for
    each label against ``baseline``: ``speedup`` (median of the per-round ratios), ``speedup_ci`` and
    ``round_ratios``. Returns the timed seconds per label."""
    names = list(variants)
    times: dict[str, list[float]] = {}
    counter = {"round": 0}

    def one_round() -> None:
        k = counter["round"] % len(names) if rotate else 0
        for name in names[k:] + names[:k]:
            result = variants[name]()
            for label, seconds in (result.items() if isinstance(result, dict) else [(name, result)]):
                times.setdefault(label, []).append(seconds)
        counter["round"] += 1

    with torch.inference_mode():
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    timed = {label: t[warmup_rounds:] for label, t in times.items()}  # the warm-up rounds are not in any figure
    benchmark.extra_info.update(rounds=rounds, warmup_rounds=warmup_rounds,
                                median_s={label: statistics.median(t) for label, t in timed.items()})
    record_speedups(benchmark, timed, baseline)
    return timed


def record_speedups(benchmark: Any, timed: dict[str, list[float]], baseline: str, key: str = "speedup") -> None:
    """``extra_info[key]``, ``[key + "_ci"]``, ``["round_ratios"]``: each variant's paired speedup over
    ``baseline`` (median of per-round ratios, bootstrap interval)."""
    out, ci, ratios = {}, {}, {}
    for name, t in timed.items():
        if name == baseline:
            continue
        estimate = stats.speedup(stats.paired_ratios(timed[baseline], t))
        out[name], ci[name], ratios[name] = estimate.value, list(estimate.ci), list(estimate.ratios)
    benchmark.extra_info[key] = out
    benchmark.extra_info[f"{key}_ci"] = ci
    benchmark.extra_info.setdefault("round_ratios", {}).update(ratios)


def timed_call(fn: Callable[[], Any]) -> float:
    """Seconds of one call; on CUDA the queued kernels are waited for on both sides of it."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start
