"""MCTF: multi-criteria token fusion (Lee, Choi, Kim; CVPR 2024; mlvlab/MCTF, MIT), training-free.

In each active block, *before* its attention, ``r`` tokens are fused by a bidirectional bipartite matching whose
score multiplies three criteria over pairs (a, b) of the alternating split (even / odd positions):

* similarity ``((cos(x_a, x_b) + 1) / 2) ** (1 / tau_sim)`` of the block's input tokens;
* informativeness ``(i_a * i_b) ** (1 / tau_info)``, ``i`` the inverse of the attention a token receives
  (averaged over heads and queries), normalised by its maximum: tokens few attend to merge first;
* size ``(s_a * s_b) ** (1 / tau_size)``, ``s`` the inverse token size normalised by its maximum.

Bidirectional: ``r // 2`` tokens of the even set merge into their best odd partner, then ``r - r // 2`` of the
odd set (merged ones included) into their best remaining even partner. Tokens are pooled with the weights
``received attention * size / max size``. One-step-ahead attention: the block's attention probabilities,
computed on its input, are reduced with the same merge (merged keys summed, merged queries pooled) and used by
the block's attention on the fused tokens, so queries and keys are not projected twice (the values are projected
from the fused tokens). Proportional attention (``log(size)``) is on.

Options and defaults are the official DeiT-S evaluation's (``run/eval_deit_s_mctf.sh``: ``mctf_type
[16,0,0,1,1,1,20,40,1,1,0]``, ``activate_layer [1..11]``): ``r`` 16, ``tau_sim`` 1, ``tau_info`` 20,
``tau_size`` 40, ``bidirection`` True, ``prop_attn`` True, ``start_block`` 1 (every block but the first).

Where we differ from the official code
    * Only its default mode is offered: one-step-ahead attention (``one_step_ahead=1``) and attention-weighted
      pooling (``pooling_type=1``); the "precise" mode (attention recomputed after the fusion), fusion after the
      MLP without one-step-ahead attention, and max/mean pooling are not.
    * Distillation and register tokens are protected prefix tokens (never merged); the official code protects
      the first ``num_protected`` rows of the even set, which is right for the class token alone.
    * ``r`` is capped at half the unprotected tokens as in the official code, and, as there, lowered so that at
      least 10 tokens remain (``t - r < 10``).
    * The official models were also fine-tuned with MCTF; this is the training-free use of the same fusion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tokred import Method, register_method
from tokred.adapters.timm_vit import TimmViTAdapter
from tokred.errors import InvalidOptionError
from tokred.merge import TwoWayMerge
from tokred.options import int_at_least, is_bool, is_number, option
from tokred.reduction import FULL_BLOCK, AttentionScores, BlockCall, BlockPlan, TokenReduce

from .tome import _is_r_schedule, checked_schedule


def _tau(doc: str, default: float) -> Any:
    return option(default, valid="number >= 0 (0 switches the criterion off)", check=lambda v: is_number(v) and v >= 0,
                  doc=doc)  # fmt: skip


@dataclass
class MCTFOptions:
    r: Any = option(
        16,
        valid="int >= 0, list of ints >= 0 (one per block), or (r, inflection) with inflection in [-1, 1]",
        check=_is_r_schedule,
        doc="tokens fused per active block (ToMe's schedules); 0 is the exact identity. Official DeiT-S: 16",
    )
    tau_sim: float = _tau("temperature of the similarity criterion", 1.0)
    tau_info: float = _tau("temperature of the informativeness criterion (attention received)", 20.0)
    tau_size: float = _tau("temperature of the size criterion", 40.0)
    bidirection: bool = option(True, valid="bool", check=is_bool, doc="two-way matching (even->odd, then odd->even)")
    start_block: int = option(
        1, valid="int >= 0", check=int_at_least(0), doc="first block that fuses (official: 1, all but the first)"
    )
    prop_attn: bool = option(True, valid="bool", check=is_bool, doc="proportional attention: add log(size)")
    trace_source: bool = option(
        False, valid="bool", check=is_bool, doc="keep patch.adapter.merged_tokens.source: merged -> input tokens"
    )


def mctf_merge(scores: AttentionScores, r: int, opts: MCTFOptions) -> TwoWayMerge | None:
    """The multi-criteria bidirectional matching of one block (see the module docstring)."""
    x, attn, size, p = scores.tokens, scores.attention, scores.size, scores.num_protected
    t = x.shape[1]
    if t - r < 10:
        r = t - 10
    r = min(r, (t - p) // 2)
    if r <= 0:
        return None
    r1, r2 = (r // 2, r - r // 2) if opts.bidirection else (r, 0)
    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        weight = a @ b.transpose(-1, -2)
        weight = ((weight + 1) / 2) ** (1 / opts.tau_sim) if opts.tau_sim else torch.ones_like(weight)
        received = attn.mean(dim=(1, 2))  # [B, T]: attention each token receives
        if opts.tau_info > 0:
            info = 1 / received
            info = info / info.amax(dim=1, keepdim=True)
            weight = weight * (info[:, ::2, None] * info[:, None, 1::2]) ** (1 / opts.tau_info)
        if opts.tau_size and size is not None:
            small = 1 / size[..., 0]
            small = small / small.amax(dim=1, keepdim=True)
            weight = weight * (small[:, ::2, None] * small[:, None, 1::2]) ** (1 / opts.tau_size)
        weight[:, : (p + 1) // 2] = -math.inf  # protected even tokens: never sources, never destinations
        weight[:, :, : p // 2] = -math.inf  # protected odd tokens
        best, best_dst = weight.max(dim=-1)
        edges = best.argsort(dim=-1, descending=True)[..., None]
        unm1, src1 = edges[:, r1:], edges[:, :r1]
        dst1 = best_dst[..., None].gather(1, src1)
        if p:
            unm1 = unm1.sort(dim=1).values  # the prefix stays in front
        second = weight.gather(1, unm1.expand(-1, -1, weight.shape[2])).transpose(1, 2)  # odd -> remaining even
        best2, best_dst2 = second.max(dim=-1)
        edges2 = best2.sort(dim=-1, descending=True).indices[..., None]
        unm2, src2 = edges2[:, r2:], edges2[:, :r2]
        dst2 = best_dst2[..., None].gather(1, src2)
    return TwoWayMerge(unm1, src1, dst1, unm2, src2, dst2, received[..., None])


@register_method("mctf")
class MCTF(Method):
    summary = "MCTF: multi-criteria (similarity, informativeness, size) bidirectional token fusion (CVPR 2024)"
    compile_support = "fullgraph"  # torch.compile(vit, fullgraph=True): tests/test_compile_vit.py
    kind = "merge"
    options = {"timm_vit": MCTFOptions}
    # A ladder, mild to clearly degrading. With the official start_block 1, MCTF's floor of 10 tokens stops any r
    # from costing top-1 on the embedded digits ViT (65 tokens: even r32 fuses to the floor by the fourth block and
    # ties with the unreduced model); fusing from the first block on (start_block 0) at r24 is what separates.
    presets = {"timm_vit": {"r8": {"r": 8}, "r12": {"r": 12}, "r16": {"r": 16},
                            "r24-start0": {"r": 24, "start_block": 0}}}

    def check(self, adapter) -> None:
        if not isinstance(adapter, TimmViTAdapter):
            return
        depth = len(adapter.blocks)
        self.schedule = checked_schedule("mctf", self.options.r, depth, "fused")
        if self.options.start_block >= depth and any(self.schedule):
            raise InvalidOptionError(
                f"mctf: start_block={self.options.start_block} is beyond the model's {depth} blocks; valid: "
                f"0..{depth - 1}"
            )

    def install(self, patch) -> None:
        opts, schedule = self.options, self.schedule

        def plan(call: BlockCall, x: torch.Tensor) -> BlockPlan:
            r = schedule[call.index]
            if r <= 0 or call.index < opts.start_block:
                return FULL_BLOCK
            return BlockPlan(
                tokens=TokenReduce(lambda scores: mctf_merge(scores, r, opts), attention=True, before_attention=True)
            )

        active = any(r > 0 for i, r in enumerate(schedule) if i >= opts.start_block)
        patch.adapter.install_blocks(
            patch, plan, prop_attn=opts.prop_attn, trace_source=opts.trace_source, may_reduce=active
        )
