"""ToFu: Token Fusion, bridging token pruning and token merging (Kim et al., WACV 2024; arXiv 2312.01026).

ToMe's bipartite soft matching on the attention keys (alternating split, the ``r`` most similar pairs, protected
prefix tokens), with two changes. In the early blocks the matched sources are *pruned* (dropped, the destination
kept as it is) instead of merged. In the later blocks they are merged with MLERP, a norm-preserving merge: the
mean of a destination and its sources, rescaled to the largest norm among them, so merged tokens do not shrink
towards the origin as averages of dissimilar vectors do.

Options: ``r`` (ToMe's schedules: an int, a per-block list or ``(r, inflection)``; default 13, ToMe's),
``merge_from`` (the first block that merges; the blocks before it prune; None: ``depth // 2 + 1``, the reference
code's split: blocks 0-6 prune and 7-11 merge on a 12-block ViT), ``size_weighted``, ``prop_attn``,
``trace_source``.

Reference code (Westlake-AI/OpenToMe ``opentome/timm/tofu.py``; the paper's own code is not public) and where we
differ
    * MLERP there averages the destination and its sources plainly (``scatter_reduce(mean)``) and never updates
      the token sizes, so its ``prop_attn=True`` has no effect. Default here: the plain mean and no proportional
      attention (the same computation). ``size_weighted=True`` averages by token size and ``prop_attn=True``
      adds ``log(size)`` to the attention logits, as ToMe does (the paper presents MLERP as ToMe's merge with the
      norm restored).
    * Destinations that receive no source, and the unmerged sources, pass unchanged (the reference rescales every
      destination to its own norm, which changes it only by rounding).
    * Distillation and register tokens are protected prefix tokens in front (as in tokred's ToMe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokred import Method, register_method
from tokred.adapters.timm_vit import TimmViTAdapter
from tokred.errors import InvalidOptionError
from tokred.merge import NormMerge, PruneSources, alternate_matching
from tokred.options import is_bool, is_int, option, optional
from tokred.reduction import FULL_BLOCK, AttentionScores, BlockCall, BlockPlan, TokenReduce

from .tome import _is_r_schedule, checked_schedule


@dataclass
class ToFuOptions:
    r: Any = option(
        13,
        valid="int >= 0, list of ints >= 0 (one per block), or (r, inflection) with inflection in [-1, 1]",
        check=_is_r_schedule,
        doc="tokens pruned or merged per block, as ToMe's r; 0 is the exact identity. ViT-S/B: 8-16",
    )
    merge_from: int | None = option(
        None,
        valid="None or an int >= 0",
        check=optional(lambda v: is_int(v) and v >= 0),
        doc="first block that merges (MLERP); earlier blocks prune. None: depth // 2 + 1 (reference code)",
    )
    size_weighted: bool = option(
        False, valid="bool", check=is_bool, doc="average merged tokens by size (reference code: plain mean)"
    )
    prop_attn: bool = option(
        False, valid="bool", check=is_bool, doc="proportional attention, log(size) (reference code: no effect)"
    )
    trace_source: bool = option(
        False, valid="bool", check=is_bool, doc="keep patch.adapter.merged_tokens.source: merged -> input tokens"
    )


def tofu_reduction(
    scores: AttentionScores, r: int, prune: bool, size_weighted: bool
) -> PruneSources | NormMerge | None:
    """ToMe's matching on the keys; the sources pruned (early blocks) or merged with MLERP (later blocks)."""
    merge = alternate_matching(scores.keys, r, scores.num_protected)
    if merge is None:
        return None
    return PruneSources(merge) if prune else NormMerge(merge, size_weighted)


@register_method("tofu")
class ToFu(Method):
    summary = "ToFu: ToMe's matching, pruning in early blocks and norm-preserving merging (MLERP) later (WACV 2024)"
    compile_support = "fullgraph"  # torch.compile(vit, fullgraph=True): tests/test_compile_vit.py
    kind = "merge"
    options = {"timm_vit": ToFuOptions}
    presets = {"timm_vit": {"r8": {"r": 8}, "r13": {"r": 13}, "r16": {"r": 16}}}

    def check(self, adapter) -> None:
        if not isinstance(adapter, TimmViTAdapter):
            return
        depth = len(adapter.blocks)
        self.schedule = checked_schedule("tofu", self.options.r, depth, "reduced")
        merge_from = self.options.merge_from
        self.merge_from = depth // 2 + 1 if merge_from is None else merge_from
        if self.merge_from > depth:
            raise InvalidOptionError(
                f"tofu: merge_from={merge_from} is beyond the model's {depth} blocks; valid: 0..{depth} (0 merges in "
                f"every block, {depth} prunes in every block)"
            )

    def install(self, patch) -> None:
        schedule, merge_from, weighted = self.schedule, self.merge_from, self.options.size_weighted

        def plan(call: BlockCall, x: torch.Tensor) -> BlockPlan:
            r = schedule[call.index]
            if r <= 0:
                return FULL_BLOCK
            prune = call.index < merge_from
            return BlockPlan(tokens=TokenReduce(lambda scores: tofu_reduction(scores, r, prune, weighted)))

        patch.adapter.install_blocks(
            patch, plan, prop_attn=self.options.prop_attn, trace_source=self.options.trace_source,
            may_reduce=any(schedule),
        )  # fmt: skip
