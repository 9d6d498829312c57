"""FLOP counting counts attention on CPU too, and matches the analytic count of a ViT."""

import torch
from torch.utils.flop_counter import FlopCounterMode

import tokred
from tokred.flops import count_flops


def analytic_vit_flops(batch, tokens, dim, depth, mlp_hidden, patch_inputs, patches, classes):
    per_block = (
        2 * tokens * dim * 3 * dim  # qkv
        + 2 * tokens * tokens * dim  # q @ k^T over all heads
        + 2 * tokens * tokens * dim  # attn @ v
        + 2 * tokens * dim * dim  # proj
        + 2 * 2 * tokens * dim * mlp_hidden  # fc1 + fc2
    )
    embed = 2 * patches * patch_inputs * dim
    head = 2 * dim * classes
    return batch * (embed + depth * per_block + head)


def test_counts_sdpa_on_cpu_and_matches_analytic(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    expected = analytic_vit_flops(
        batch=2, tokens=65, dim=48, depth=4, mlp_hidden=192, patch_inputs=3 * 4 * 4, patches=64, classes=10
    )
    assert count_flops(lambda: tiny_vit(x)) == expected

    plain = FlopCounterMode(display=False)  # torch's own counter misses CPU attention
    with torch.no_grad(), plain:
        tiny_vit(x)
    assert plain.get_total_flops() < expected


def test_tome_reduces_counted_flops(tiny_vit):
    x = torch.randn(1, 3, 32, 32)
    full = count_flops(lambda: tiny_vit(x))
    with tokred.apply(tiny_vit, "tome", r=8):
        reduced = count_flops(lambda: tiny_vit(x))
    assert reduced < 0.8 * full
