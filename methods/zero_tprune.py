"""Zero-TPrune: zero-shot token pruning on the attention graph (Wang, Dedhia, Jha; CVPR 2024; arXiv 2305.17328).

In every block with ``r > 0``, after attention, ``r`` non-prefix tokens are pruned (dropped for the rest of the
network; nothing is merged) in three stages, I' -> S -> I:

* **Importance by Weighted PageRank (WPR).** Each head's attention matrix ``A`` (row ``i``: query ``i``'s
  probabilities over the keys) is a directed graph in which every token votes for the tokens it attends to,
  weighted by its own importance: ``s_j <- sum_i A_ij s_i`` (``s <- A^T s``), from ``s`` uniform with the class
  token's score ``sqrt(N)`` times the others' (``cls_init="sqrt_n"``, the paper's Zero-TPrune; ``"uniform"``:
  Zero-TPrune-uni), normalised to sum 1. The heads are combined by *EIR* (emphasising the informative region), the
  root mean square over the heads kept by the *VHF* (variance-based head filter): a head counts when the variance
  of its scores lies in ``var_range`` (default [0.01, 0.7], the paper's).
* **I'-stage:** one WPR iteration on the block's attention ranks the tokens; it prunes nothing.
* **S-stage:** the non-prefix tokens are split by that rank into a group A that may be pruned and a group B
  (``partition="sequential"``, the paper's Sequential-U default: A the less important half, B the more important
  half; ``"alternate"``: ranks alternate between A and B, least important in A); each A token finds its most
  similar B token (cosine similarity of the attention keys, averaged over heads) and the A tokens of the
  ``floor(s_ratio * r)`` most similar pairs are pruned.
* **I-stage:** WPR with ``wpr_iters`` iterations on the attention restricted to the tokens left (their rows and
  columns, each row renormalised to sum 1) ranks them again, and the ``r - floor(s_ratio * r)`` least important are
  pruned. The tokens kept stay in their original order; prefix tokens (class, distillation, registers) are never
  pruned.

Options and defaults: ``r`` 12 (ToMe's schedules: an int, a per-block list, or ``(r, inflection)``; at most half
the non-prefix tokens per block), ``s_ratio`` 0.5, ``partition`` "sequential", ``cls_init`` "sqrt_n",
``var_range`` (0.01, 0.7) (None: no head filter), ``wpr_iters`` None: the paper's convergence schedule, 30
iterations in the first three blocks, 1 in the last three and 10 in the others (it reports 30-50, 1 and 5-10), or
one int for every block, or a list with one per block; ``trace_source``. Presets r8 / r12 / r16.

DeiT-S (224², 12 blocks, ``python tests/test_zero_tprune.py``) at the defaults: 2.96 GMACs per image against 4.60
unreduced (35.7% fewer; the paper: 34.7% fewer, 3.0), the method's own work counted: the explicit attention matrix,
the WPR iterations and the S-stage similarity add 0.11 GMACs over ToMe at the same token counts (ToMe r=12: 2.85;
ToMe's default r=13: 2.71). ``r=11`` would count 3.11. Zero strength (``r=0``) is the unpatched model bit-exactly.

No official code was available; this follows the paper. Our choices where it leaves room
    * **Per-block budget.** The paper gives per-layer pruning counts for each model; here ``r`` tokens per block
      (ToMe's schedules), split between the stages by ``s_ratio`` (S-stage ``floor(s_ratio * r)``, I-stage the
      rest); the default ``r=12`` lands DeiT-S nearest the paper's 3.0 GMACs (2.96).
    * **VHF's scale.** Scores sum to 1 over ``N`` tokens, so their raw variance is of order ``1/N^2``, far below any
      useful bound. The variance is taken of a head's scores over the non-prefix tokens divided by their mean
      (mean 1: a uniform head has variance 0, one that puts everything on one of ``n`` tokens ``n - 1``), so
      ``var_range`` means the same at every token count and the class token's boosted score does not dominate it.
      When the filter leaves no head for an image, every head is used for it (rather than no score at all).
    * **I-stage attention.** The restricted attention is renormalised: softmax over a subset of keys is exactly
      the full softmax restricted and renormalised, so this is the attention the kept tokens would have computed
      among themselves, and it keeps the matrix stochastic, so WPR conserves the total score.
    * WPR runs in float32 whatever the model's dtype (its iterations accumulate rounding).
    * The attention probabilities are computed explicitly next to timm's fused attention in the pruning blocks
      (their matmul counted in the FLOPs), as for MCTF's scores (EViT needs only the class token's row).
    * Models without a class token are refused with the default ``cls_init="sqrt_n"`` (there is no class token to
      boost); ``cls_init="uniform"`` serves them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tokred import Method, register_method
from tokred.adapters.timm_vit import TimmViTAdapter
from tokred.errors import InvalidOptionError, UnsupportedModelError
from tokred.merge import TokenSelect
from tokred.options import is_bool, is_int, is_number, number_in, one_of, option, optional
from tokred.reduction import FULL_BLOCK, AttentionScores, BlockCall, BlockPlan, TokenReduce

from .tome import _is_r_schedule, checked_schedule

PARTITIONS = ("sequential", "alternate")
CLS_INITS = ("sqrt_n", "uniform")


def _is_var_range(v: Any) -> bool:
    return isinstance(v, list | tuple) and len(v) == 2 and all(is_number(x) and x >= 0 for x in v) and v[0] <= v[1]


def _is_iters(v: Any) -> bool:
    if is_int(v):
        return v >= 1
    return isinstance(v, list | tuple) and len(v) > 0 and all(is_int(i) and i >= 1 for i in v)


@dataclass
class ZeroTPruneOptions:
    r: Any = option(
        12,
        valid="int >= 0, list of ints >= 0 (one per block), or (r, inflection) with inflection in [-1, 1]",
        check=_is_r_schedule,
        doc="tokens pruned per block (ToMe's schedules), at most half the non-prefix tokens; 0 is the exact "
        "identity. DeiT-S: 12 is 2.96 GMACs (the paper: 3.0); 6-14 recommended",
    )
    s_ratio: float = option(
        0.5,
        valid="0 <= s_ratio <= 1",
        check=number_in(0.0, 1.0),
        doc="share of r pruned by similarity (S-stage, floor(s_ratio * r)); the rest by importance (I-stage). "
        "0: I-stage only; 1: S-stage only. 0.3-0.7 recommended",
    )
    partition: str = option(
        "sequential",
        valid="'sequential' or 'alternate'",
        check=one_of(*PARTITIONS),
        doc="S-stage groups: 'sequential' (Sequential-U: the less important half may be pruned) or 'alternate' "
        "(importance ranks alternate between the groups)",
    )
    cls_init: str = option(
        "sqrt_n",
        valid="'sqrt_n' or 'uniform'",
        check=one_of(*CLS_INITS),
        doc="WPR's initial scores: the class token sqrt(N) times the others (Zero-TPrune), or uniform "
        "(Zero-TPrune-uni, also for ViTs without a class token)",
    )
    var_range: Any = option(
        (0.01, 0.7),
        valid="None, or (var_min, var_max) with 0 <= var_min <= var_max",
        check=optional(_is_var_range),
        doc="VHF: heads whose score variance (scores over their mean) lies outside are left out of the "
        "aggregation; None: every head. Paper: (0.01, 0.7)",
    )
    wpr_iters: Any = option(
        None,
        valid="None, an int >= 1, or a list of ints >= 1 with one per block",
        check=optional(_is_iters),
        doc="WPR iterations of the I-stage per block; None: 30 in the first three blocks, 1 in the last three, "
        "10 elsewhere (the paper's convergence counts: 30-50, 1, 5-10)",
    )
    trace_source: bool = option(
        False, valid="bool", check=is_bool, doc="keep patch.adapter.merged_tokens.source: kept -> input tokens"
    )


def default_iterations(depth: int) -> list[int]:
    """The paper's WPR iterations to convergence: many in the first three blocks, one in the last three."""
    return [30 if i < 3 else 1 if i >= depth - 3 else 10 for i in range(depth)]


def weighted_pagerank(probs: torch.Tensor, iters: int, boost_first: bool) -> torch.Tensor:
    """Each head's WPR scores [B, H, N] on ``probs`` [B, H, N, N] (rows: queries): ``iters`` times ``s <- A^T s``
    from uniform scores (token 0 ``sqrt(N)`` times the others with ``boost_first``), normalised to sum 1."""
    b, h, n, _ = probs.shape
    s = probs.new_ones(b, h, 1, n)
    if boost_first:
        s[..., 0] = math.sqrt(n)
    s = s / s.sum(dim=-1, keepdim=True)
    for _ in range(iters):
        s = s @ probs  # s_j = sum_i s_i A_ij: a row-vector times the matrix, one matmul per head
    return s[:, :, 0]


def head_aggregate(scores: torch.Tensor, p: int, var_range: tuple[float, float] | None) -> torch.Tensor:
    """EIR with VHF: per token [B, N], the root mean square of the heads' scores ``scores`` [B, H, N] over the
    heads whose variance of ``scores / mean`` over the non-prefix tokens lies in ``var_range`` (all heads when
    none does, or without a range)."""
    if var_range is None:
        return scores.square().mean(dim=1).sqrt()
    candidates = scores[:, :, p:]
    variance = (candidates / candidates.mean(dim=-1, keepdim=True)).var(dim=-1, unbiased=False)  # [B, H]
    kept = (variance >= var_range[0]) & (variance <= var_range[1])
    kept = kept | ~kept.any(dim=1, keepdim=True)  # no head passes: use them all
    weight = kept.to(scores.dtype)[..., None]
    return ((scores.square() * weight).sum(dim=1) / weight.sum(dim=1)).sqrt()


def importance(probs: torch.Tensor, iters: int, p: int, opts: ZeroTPruneOptions) -> torch.Tensor:
    """The tokens' importance [B, N]: WPR per head, then EIR/VHF over the heads."""
    var_range = None if opts.var_range is None else tuple(opts.var_range)
    return head_aggregate(weighted_pagerank(probs, iters, opts.cls_init == "sqrt_n"), p, var_range)


def drop_from(index: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``index`` [B, n] without its columns ``drop`` [B, d] (each row drops d), the rest in their order."""
    n = index.shape[1]
    order = torch.arange(n, device=index.device).expand_as(index)
    dropped = torch.zeros_like(index, dtype=torch.bool).scatter(1, drop, True)
    columns = (order + n * dropped).argsort(dim=1)[:, : n - drop.shape[1]]  # kept columns first, in order
    return index.gather(1, columns)


def similarity_pruned(keys: torch.Tensor, rank: torch.Tensor, r: int, partition: str) -> torch.Tensor:
    """S-stage: the ``r`` candidates [B, r] (indices into ``keys`` [B, n, C]) of group A most similar to their
    most similar group-B token; ``rank`` [B, n] orders the candidates least important first."""
    if partition == "sequential":
        half = rank.shape[1] // 2
        group_a, group_b = rank[:, :half], rank[:, half:]
    else:
        group_a, group_b = rank[:, 0::2], rank[:, 1::2]
    k = F.normalize(keys, dim=-1)
    c = k.shape[-1]
    sim = k.gather(1, group_a[..., None].expand(-1, -1, c)) @ k.gather(1, group_b[..., None].expand(-1, -1, c)).mT
    best = sim.amax(dim=-1)
    top = best.argsort(dim=1, descending=True, stable=True)[:, :r]
    return group_a.gather(1, top)


def zero_tprune_selection(scores: AttentionScores, r: int, iters: int, opts: ZeroTPruneOptions) -> TokenSelect | None:
    """The tokens one block keeps after the I' -> S -> I stages (see the module docstring); None when none is
    pruned."""
    p = scores.num_protected
    probs = scores.attention.float()
    b, _, n, _ = probs.shape
    r = min(r, (n - p) // 2)
    if r <= 0:
        return None
    r_s = int(opts.s_ratio * r)
    r_i = r - r_s
    with torch.no_grad():
        kept = torch.arange(p, n, device=probs.device).expand(b, n - p)  # candidates left, in order
        if r_s:
            pre = importance(probs, 1, p, opts)[:, p:]  # I'-stage: one iteration, ranks only
            rank = pre.argsort(dim=1, stable=True)
            kept = drop_from(kept, similarity_pruned(scores.keys[:, p:], rank, r_s, opts.partition))
        prefix = torch.arange(p, device=probs.device).expand(b, p)
        kept = torch.cat([prefix, kept], dim=1)
        if r_i:
            h, m = probs.shape[1], kept.shape[1]
            rows = probs.gather(2, kept[:, None, :, None].expand(b, h, m, n))
            sub = rows.gather(3, kept[:, None, None, :].expand(b, h, m, m))
            sub = sub / sub.sum(dim=-1, keepdim=True)  # the attention among the kept tokens
            least = importance(sub, iters, p, opts)[:, p:].argsort(dim=1, stable=True)[:, :r_i]
            kept = torch.cat([prefix, drop_from(kept[:, p:], least)], dim=1)
    return TokenSelect(kept)


@register_method("zero_tprune")
class ZeroTPrune(Method):
    summary = "Zero-TPrune: prune by Weighted PageRank on the attention graph and by key similarity (CVPR 2024)"
    kind = "prune"
    compile_support = "fullgraph"  # torch.compile(vit, fullgraph=True): tests/test_compile_vit.py
    options = {"timm_vit": ZeroTPruneOptions}
    presets = {"timm_vit": {"r8": {"r": 8}, "r12": {"r": 12}, "r16": {"r": 16}}}

    def check(self, adapter) -> None:
        if not isinstance(adapter, TimmViTAdapter):
            return
        opts = self.options
        depth = len(adapter.blocks)
        self.schedule = checked_schedule("zero_tprune", opts.r, depth, "pruned")
        if opts.cls_init == "sqrt_n" and not adapter.has_class_token() and any(self.schedule):
            raise UnsupportedModelError(
                "zero_tprune's default cls_init='sqrt_n' boosts the class token's initial score, and this ViT has "
                "no class token (MAP or average pooling); pass cls_init='uniform' (Zero-TPrune-uni)"
            )
        iters = opts.wpr_iters
        if iters is None:
            self.iterations = default_iterations(depth)
        elif is_int(iters):
            self.iterations = [iters] * depth
        elif len(iters) != depth:
            raise InvalidOptionError(
                f"zero_tprune: wpr_iters has {len(iters)} entries but the model has {depth} blocks; valid: one int "
                f">= 1 per block, a single int, or None"
            )
        else:
            self.iterations = list(iters)

    def install(self, patch) -> None:
        opts, schedule, iterations = self.options, self.schedule, self.iterations

        def plan(call: BlockCall, x: torch.Tensor) -> BlockPlan:
            r, iters = schedule[call.index], iterations[call.index]
            if r <= 0:
                return FULL_BLOCK
            return BlockPlan(
                tokens=TokenReduce(lambda scores: zero_tprune_selection(scores, r, iters, opts), attention=True)
            )

        patch.adapter.install_blocks(
            patch, plan, prop_attn=False, trace_source=opts.trace_source, may_reduce=any(schedule)
        )
