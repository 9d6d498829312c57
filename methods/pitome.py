"""PiToMe: spectrum-preserving token merging (Tran et al., NeurIPS 2024; arXiv 2405.16148).

In each block, after attention, every non-prefix token gets an *energy* score from the attention keys (averaged
over heads): ``E_i = mean_j ELU(cos(k_i, k_j) - margin)`` over all non-prefix tokens ``j`` (itself included).
High energy means many similar tokens (background, redundant); low energy marks the informative tokens. Tokens
are ordered by energy, highest first, and ``r`` of them are merged, by a size-weighted mean as ToMe:

* *protected* blocks (the paper's algorithm): the ``2r`` highest-energy tokens are split alternately into sources
  and destinations, every source merges into its most similar destination; the other tokens are protected and
  never merged;
* *bipartite* blocks: all tokens, in energy order, are split alternately; the ``r`` sources most similar to their
  best destination merge (ToMe's matching on the energy-ordered split; nothing is protected).

Options: ``r`` (ToMe's schedules; default 13, ToMe's), ``margin`` (None: the reference code's per-block margin
``0.75 - 0.75 * i / depth``; or one float for every block), ``alpha`` (ELU's, 1.0), ``bsm_blocks`` (None: the
reference code's ``ceil(depth / 2)`` first blocks are bipartite, the rest protected; 0: protected in every block,
the paper's algorithm), ``prop_attn``, ``trace_source``.

Reference code (Westlake-AI/OpenToMe ``opentome/timm/pitome.py``, ``opentome/tome/pitome.py``; the authors' code,
hchautran/PiToMe, is under a non-commercial licence and was not used) and where we differ
    * Distillation and register tokens are protected prefix tokens in front, excluded from the energy (the
      reference strips only the class token).
    * Proportional attention is off by default, as in the reference (``prop_attn=True`` adds ``log(size)``).
    * ``2r`` larger than the non-prefix tokens is capped (the reference fails).
    * The energy's similarity matrix is ``N x N`` per block; its matmul is counted in tokred's FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tokred import Method, register_method
from tokred.adapters.timm_vit import TimmViTAdapter
from tokred.merge import GridMerge
from tokred.options import is_bool, is_int, is_number, number_in, option, optional
from tokred.reduction import FULL_BLOCK, AttentionScores, BlockCall, BlockPlan, TokenReduce

from .tome import _is_r_schedule, checked_schedule


@dataclass
class PiToMeOptions:
    r: Any = option(
        13,
        valid="int >= 0, list of ints >= 0 (one per block), or (r, inflection) with inflection in [-1, 1]",
        check=_is_r_schedule,
        doc="tokens merged per block, as ToMe's r; 0 is the exact identity. ViT-S/B: 8-16",
    )
    margin: float | None = option(
        None,
        valid="None or a number in [-1, 1]",
        check=optional(number_in(-1.0, 1.0)),
        doc="energy margin; None: 0.75 - 0.75 * i / depth in block i (reference code)",
    )
    alpha: float = option(
        1.0, valid="number > 0", check=lambda v: is_number(v) and v > 0, doc="ELU's alpha in the energy"
    )
    bsm_blocks: int | None = option(
        None,
        valid="None or an int >= 0",
        check=optional(lambda v: is_int(v) and v >= 0),
        doc="first blocks using the energy-ordered bipartite matching; None: ceil(depth / 2) (reference code); "
        "0: protected merging everywhere (the paper)",
    )
    prop_attn: bool = option(False, valid="bool", check=is_bool, doc="proportional attention: add log(size)")
    trace_source: bool = option(
        False, valid="bool", check=is_bool, doc="keep patch.adapter.merged_tokens.source: merged -> input tokens"
    )


def energy(keys: torch.Tensor, margin: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(energy [B, T], cosine similarity [B, T, T]) of the tokens ``keys`` [B, T, C]."""
    k = F.normalize(keys, p=2, dim=-1)
    sim = k @ k.transpose(-1, -2)
    return F.elu(sim - margin, alpha=alpha).mean(dim=-1), sim


def pitome_merge(scores: AttentionScores, r: int, margin: float, alpha: float, protect: bool) -> GridMerge | None:
    """The merge of one block: sources, destinations and pairs from the energy order (see the module docstring)."""
    p = scores.num_protected
    with torch.no_grad():
        keys = scores.keys[:, p:]
        b, t, _ = keys.shape
        r = min(r, t // 2)
        if r <= 0:
            return None
        e, sim = energy(keys, margin, alpha)
        order = e.argsort(dim=-1, descending=True)
        merging = order[:, : 2 * r] if protect else order
        a, d = merging[:, ::2], merging[:, 1::2]
        pair = sim.gather(1, a[..., None].expand(-1, -1, t)).gather(2, d[:, None, :].expand(-1, a.shape[1], -1))
        best, best_dst = pair.max(dim=-1)
        prefix = torch.arange(p, device=keys.device).expand(b, p)
        if protect:  # every source merges; the low-energy rest is kept as unmerged "sources"
            kept = order[:, 2 * r :]
            src_set = torch.cat([prefix, kept + p, a + p], dim=1)
            unm = torch.arange(p + kept.shape[1], device=keys.device).expand(b, -1)
            src = torch.arange(r, device=keys.device).expand(b, r) + p + kept.shape[1]
            dst = best_dst
        else:  # ToMe's choice of the r best pairs
            edges = best.argsort(dim=-1, descending=True)
            src_set = torch.cat([prefix, a + p], dim=1)
            unm = torch.cat([prefix, edges[:, r:] + p], dim=1)
            src = edges[:, :r] + p
            dst = best_dst.gather(1, edges[:, :r])
    return GridMerge(unm[..., None], src[..., None], dst[..., None], src_set[..., None], d[..., None] + p)


@register_method("pitome")
class PiToMe(Method):
    summary = "PiToMe: energy-ordered merging that protects informative (low-energy) tokens (NeurIPS 2024)"
    compile_support = "fullgraph"  # torch.compile(vit, fullgraph=True): tests/test_compile_vit.py
    kind = "merge"
    options = {"timm_vit": PiToMeOptions}
    # A ladder, mild to clearly degrading; the strongest is ToMe's decreasing schedule (2r in the first block down
    # to 0 in the last, as tome's strongest): its early merging costs top-1, where constant r16 still ties with
    # the unreduced model on the embedded digits ViT (64 patches).
    presets = {"timm_vit": {"r8": {"r": 8}, "r13": {"r": 13}, "r16": {"r": 16}, "r16-decreasing": {"r": (16, -1)}}}

    def check(self, adapter) -> None:
        if not isinstance(adapter, TimmViTAdapter):
            return
        depth = len(adapter.blocks)
        self.schedule = checked_schedule("pitome", self.options.r, depth, "merged")
        opts = self.options
        self.margins = [0.75 - 0.75 * i / depth if opts.margin is None else opts.margin for i in range(depth)]
        self.bsm_blocks = math.ceil(depth / 2) if opts.bsm_blocks is None else opts.bsm_blocks

    def install(self, patch) -> None:
        schedule, margins, bsm_blocks, alpha = self.schedule, self.margins, self.bsm_blocks, self.options.alpha

        def plan(call: BlockCall, x: torch.Tensor) -> BlockPlan:
            r, i = schedule[call.index], call.index
            if r <= 0:
                return FULL_BLOCK
            protect = i >= bsm_blocks
            return BlockPlan(tokens=TokenReduce(lambda scores: pitome_merge(scores, r, margins[i], alpha, protect)))

        patch.adapter.install_blocks(
            patch, plan, prop_attn=self.options.prop_attn, trace_source=self.options.trace_source,
            may_reduce=any(schedule),
        )  # fmt: skip
