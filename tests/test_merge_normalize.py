"""alternate_matching normalizes the metric once before its split: the same pairs and scores, bit for bit, as
normalizing each half (the earlier formulation, kept as best_destinations' default)."""

from __future__ import annotations

import pytest
import torch

from tokred.merge import alternate_matching, best_destinations, select_pairs


@pytest.mark.parametrize("num_protected", [0, 1, 2])
def test_one_normalization_gives_the_same_pairs(num_protected):
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 197, 64, generator=gen)
    merge = alternate_matching(metric, r=13, num_protected=num_protected)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    node_max, node_idx = best_destinations(a, b, (num_protected + 1) // 2, num_protected // 2)
    unm, src, dst = select_pairs(node_max, node_idx, 13, sort_unmerged=num_protected > 0)
    assert torch.equal(merge.unm_idx, unm) and torch.equal(merge.src_idx, src) and torch.equal(merge.dst_idx, dst)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    again = best_destinations(unit[..., ::2, :], unit[..., 1::2, :], (num_protected + 1) // 2, num_protected // 2,
                              normalized=True)
    assert torch.equal(again[0], node_max) and torch.equal(again[1], node_idx)
