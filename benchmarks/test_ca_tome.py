"""CA-ToMe speed on CPU, SD1.5's U-Net (random init), 32x32 latents, batch 2 (one CFG step).

Run: ``pytest benchmarks/test_ca_tome.py --benchmark-only --benchmark-json=ca_tome.json``.

(a) A step that recomputes the merge pairs against one that reuses the cached pairs: one patch whose
    ``compute_on`` holds every odd step, called twice per round on the same inputs (so with the same
    tokens): the difference is the cost of the similarity search, sort, count and random draw. That cost
    is small next to a U-Net call on CPU, so it is also timed alone on the five merging blocks' inputs
    (``test_sd15_search_cost_per_step``), free of the U-Net's run-to-run noise.
(b) CA-ToMe against ToMe at a similar token count: the merge count CA-ToMe reaches on these inputs is
    measured first and ToMe's ratio is set to merge as many tokens in total over the same blocks.

Random weights: on random-init SD1.5 the best source-destination similarities of these inputs lie around
0.4-0.55, so the paper's threshold 0.7 merges nothing (``extra_info["merged_at_threshold"]`` records the
counts); the benchmarks use 0.45, which merges about half of the sources. The timings show what a token count
costs; the count a threshold gives on trained weights is a different matter.

Statistics (:func:`conftest.paired_rounds`): the variants are timed in the same rounds, the warm-up round is
dropped, and every speedup is the median of the per-round ratios with a 95% bootstrap interval.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from conftest import paired_rounds, timed_call, unet_inputs

import tokred
from tokred.merge import grid_destinations, grid_matching

THRESHOLD = 0.45  # see the module docstring: 0.7 merges nothing on random weights
PROBE_THRESHOLDS = (0.4, 0.45, 0.5, 0.6, 0.7)
NOTE = (
    "random init: timings show the cost of the token counts reached here; the count a threshold gives on "
    "trained weights differs (0.7 merges nothing here)"
)
INFO = dict(model="SD1.5 UNet2DConditionModel config, random init", latent="32x32", batch=2, threshold=THRESHOLD)


def call_args():
    inputs = unet_inputs(batch=2, latent=32)
    return (inputs["sample"], inputs["timestep"]), {"encoder_hidden_states": inputs["encoder_hidden_states"]}


def test_sd15_recompute_vs_reuse_step(benchmark, sd15_unet):
    args, kwargs = call_args()
    patch = tokred.apply(sd15_unet, "ca_tome", threshold=THRESHOLD, compute_on=range(1, 1000, 2))

    def step(name: str) -> float:
        seconds = timed_call(lambda: sd15_unet(*args, **kwargs))
        assert all(s.computed == (name == "recompute") for s in patch.method_state.block_stats.values())
        return seconds

    # odd step, then even step, in this order every round (the step number decides); the timestep never rises,
    # so the patch never resets
    variants = {"recompute": lambda: step("recompute"), "reuse": lambda: step("reuse")}
    try:
        timed = paired_rounds(benchmark, variants, baseline="recompute", rotate=False)
        stats = patch.method_state.block_stats
    finally:
        patch.remove()
    differences = [a - b for a, b in zip(timed["recompute"], timed["reuse"], strict=True)]
    benchmark.extra_info.update(
        INFO,
        meaning="speedup['reuse']: a reuse step's speedup over a recompute step (median of per-round ratios)",
        recompute_minus_reuse_ms=1e3 * statistics.median(differences),
        merged_per_block={name: s.r[0] for name, s in stats.items()},
        tokens_per_block=next(iter(stats.values())).tokens,
        note=NOTE,
    )


@pytest.fixture(scope="module")
def top_block_inputs(sd15_unet) -> dict[str, torch.Tensor]:
    """The inputs of the five full-resolution transformer blocks in one unpatched call."""
    args, kwargs = call_args()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        block.register_forward_pre_hook(
            lambda m, a, k, name=name: inputs.__setitem__(name, k.get("hidden_states", a[0] if a else None)),
            with_kwargs=True,
        )
        for name, block in sd15_unet.named_modules()
        if type(block).__name__ == "BasicTransformerBlock"
    ]
    try:
        with torch.inference_mode():
            sd15_unet(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {name: x for name, x in inputs.items() if x.shape[1] == 32 * 32}


def test_sd15_search_cost_per_step(benchmark, top_block_inputs):
    """What a reused step saves: the random draw, similarity, count and sort of the five merging blocks
    (the shared primitives, as a recompute step calls them), timed alone, without the U-Net's noise."""
    generator = torch.Generator().manual_seed(0)

    def search() -> list:
        out = []
        for x in top_block_inputs.values():
            a_idx, b_idx = grid_destinations(32, 32, 2, 2, generator, x.device)
            out.append(grid_matching(x, a_idx, b_idx, threshold=THRESHOLD))
        return out

    with torch.inference_mode():
        merges = benchmark.pedantic(search, rounds=20, iterations=3, warmup_rounds=2)  # warm-up not in the stats
    benchmark.extra_info.update(
        INFO,
        blocks=len(merges),
        merged_per_block=[m.r if m else 0 for m in merges],
        meaning="time a reuse step saves over a recompute step (the gathers/scatters run in both)",
        note=NOTE,
    )


def merged_at_thresholds(block_inputs: dict[str, torch.Tensor]) -> dict[float, dict[str, int]]:
    """Per threshold, the count CA-ToMe merges in each top-level block (top-left destinations)."""
    a_idx, b_idx = grid_destinations(32, 32, 2, 2, None, torch.device("cpu"))
    return {
        t: {
            name: (m.r if (m := grid_matching(x, a_idx, b_idx, threshold=t)) else 0) for name, x in block_inputs.items()
        }
        for t in PROBE_THRESHOLDS
    }


def test_sd15_ca_tome_vs_tome_at_similar_token_count(benchmark, sd15_unet, top_block_inputs):
    probe = merged_at_thresholds(top_block_inputs)
    tokens_per_block = 32 * 32
    blocks = len(probe[THRESHOLD])
    merged = sum(probe[THRESHOLD].values())
    ratio = round(merged / (blocks * tokens_per_block), 3)  # ToMe merges int(N * ratio) in each of these blocks
    tome_merged = blocks * int(tokens_per_block * ratio)

    args, kwargs = call_args()
    call = lambda: sd15_unet(*args, **kwargs)
    ca, tome = f"ca_tome_{THRESHOLD}", f"tome_{ratio}"
    counts: dict[str, list[int]] = {}

    def ca_tome_steps() -> dict[str, float]:
        with tokred.apply(sd15_unet, "ca_tome", threshold=THRESHOLD, compute_on=[]) as patch:
            out = {f"{ca}_recompute": timed_call(call)}  # step 1: empty cache, pairs computed
            out[f"{ca}_reuse"] = timed_call(call)  # step 2: cached pairs
            counts["ca_tome"] = [s.r[0] for s in patch.method_state.block_stats.values()]
        return out

    def tome_step() -> float:
        with tokred.apply(sd15_unet, "tome", ratio=ratio):
            return timed_call(call)

    paired_rounds(benchmark, {"baseline": lambda: timed_call(call), "ca_tome": ca_tome_steps, tome: tome_step})
    benchmark.extra_info.update(
        INFO,
        merged_at_threshold={str(t): sum(c.values()) for t, c in probe.items()},
        tome_ratio=ratio,
        tokens_per_block=tokens_per_block,
        merged_per_block={"ca_tome": counts["ca_tome"], "tome": [int(tokens_per_block * ratio)] * blocks},
        self_attention_tokens_total={
            "ca_tome": blocks * tokens_per_block - merged,
            "tome": blocks * tokens_per_block - tome_merged,
        },
        note=NOTE,
    )
