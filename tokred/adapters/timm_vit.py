"""timm Vision Transformers: block discovery and the reducing block forward.

Reduction methods for ViTs (ToMe, CA-ToMe, EViT, ToFu, PiToMe) differ only in *which* tokens they merge, prune
or fuse at each block; the rest is shared and lives here: a block forward that reproduces timm's ``Block``
exactly (LayerScale, qk-norm, fused attention included), computes the scores a method asks for (the attention
keys averaged over heads always; the class token's attention row or the attention matrix on request, next to
fused attention), passes token sizes to attention as an additive ``log(size)`` bias (proportional attention)
and reduces the tokens between attention and MLP, for the rest of the network, as the official ToMe and EViT do.

The ViT reduction point is a planner's ``BlockPlan(tokens=TokenReduce(choose, cls_attention=..., attention=...))``
(:mod:`tokred.reduction`): ``choose(scores: AttentionScores) -> TokenReduction | None`` for each block call,
installed with :meth:`TimmViTAdapter.install_blocks`, the same protocol as the diffusion adapters. The
bookkeeping (each token's size, and with ``trace_source`` which input tokens it covers) is the adapter's:
:attr:`TimmViTAdapter.merged_tokens` after a forward. Every block reads the sizes its predecessor produced in
the same forward (not "the latest"), so a block recomputed under gradient checkpointing sees exactly what it
saw the first time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError
from ..merge import TokenReduction
from ..reduction import FULL_BLOCK, AttentionScores, BlockCall, BlockPlan, Grid, Planner, TokenReduce
from .base import Adapter, has_class_named

if TYPE_CHECKING:
    from ..patch import Patch

# choose(call, metric [B, N, C]) -> a merge, or None to keep every token (the protocol before 0.3; deprecated)
MergeChooser = Callable[[BlockCall, torch.Tensor], TokenReduction | None]


@dataclass
class MergedTokens:
    """After a forward of a merging ViT: ``size`` [B, N', 1], how many input tokens each token stands for (None
    when nothing merged), and ``source`` [B, N', N_input], which input tokens each covers (with
    ``trace_source``; else None)."""

    size: torch.Tensor | None = None
    source: torch.Tensor | None = None


class TimmViTAdapter(Adapter):
    family = "timm_vit"
    description = (
        "timm VisionTransformer and subclasses: ViT, DeiT, DeiT-3 (LayerScale), distilled DeiT, register tokens, "
        "no class token (SigLIP, MAP or average pooling), DINOv2, CLIP (pre-norm)"
    )

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, model)
        self.blocks = [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
        # cls, distillation and register tokens sit in front of the patch tokens and are never merged
        self.num_protected = int(getattr(model, "num_prefix_tokens", 1))
        self.merged_tokens = MergedTokens()
        self._entering: list[MergedTokens] = [MergedTokens() for _ in range(len(self.blocks) + 1)]

    @classmethod
    def match(cls, obj: Any) -> TimmViTAdapter | None:
        if has_class_named(obj, "VisionTransformer", "timm.") and hasattr(obj, "blocks"):
            return cls(obj)
        return None

    def check(self) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        if not self.blocks:
            raise UnsupportedModelError("this VisionTransformer has no blocks (depth=0): there is nothing to merge in")
        for name, block in self.blocks:
            if type(block) is not Block or type(getattr(block, "attn", None)) is not Attention:
                raise UnsupportedModelError(
                    f"block {name} is {type(block).__name__} with {type(getattr(block, 'attn', None)).__name__}; "
                    "tokred supports timm ViTs built from timm.models.vision_transformer.Block with "
                    "timm.layers.Attention (ViT, DeiT, DeiT-3)"
                )

    def attach(self, patch: Patch) -> None:
        adapter = self

        def legacy_call() -> dict[str, Any]:
            merged = adapter.merged_tokens
            return {k: v for k, v in (("size", merged.size), ("source", merged.source)) if v is not None}

        patch.state.legacy_call = legacy_call

    def patch_grid(self) -> Grid | None:
        grid = getattr(getattr(self.root, "patch_embed", None), "grid_size", None)
        return Grid(int(grid[0]), int(grid[1]), 1) if grid is not None else None

    def has_class_token(self) -> bool:
        """Whether token 0 is a class token (EViT's attention row needs one; SigLIP/avg-pool ViTs have none)."""
        return getattr(self.root, "cls_token", None) is not None

    def install_blocks(
        self,
        patch: Patch,
        planner: Planner,
        names: set[str] | None = None,
        *,
        prop_attn: bool = False,
        trace_source: bool = False,
        may_reduce: bool = True,
    ) -> None:
        """Run the blocks (those in ``names``; default all) through the adapter's forward, asking ``planner(call,
        x)`` before each block call for its :class:`~tokred.reduction.BlockPlan`. The ViT's point is the plan's
        ``tokens`` (:class:`~tokred.reduction.TokenReduce`): after attention, its ``choose`` gets the
        :class:`~tokred.reduction.AttentionScores` and returns a :class:`~tokred.merge.TokenReduction` (or None),
        applied to the tokens for the rest of the network. The other plan fields are not offered on ViTs.

        ``prop_attn``: proportional attention, ``log(size)`` added to the attention logits once tokens were
        merged or fused. ``trace_source``: keep ``merged_tokens.source``. ``may_reduce=False`` (zero strength)
        tells the adapter that the token count never changes, which keeps ``forward_intermediates(...,
        output_fmt="NCHW")`` available.
        """
        entering, counter = self._entering, patch.tokens
        grid, num_protected = self.patch_grid(), self.num_protected
        adapter = self

        for index, (name, block) in enumerate(self.blocks):
            # every block runs the adapter's forward (token sizes and sources pass through each one); the planner
            # is asked only for the blocks in ``names``
            call = BlockCall(name, index, block, 1, grid, 0)

            def forward(
                blk: torch.nn.Module,
                x: torch.Tensor,
                attn_mask: torch.Tensor | None = None,
                is_causal: bool = False,
                _index: int = index,
                _call: BlockCall = call,
                _planned: bool = names is None or name in names,
            ) -> torch.Tensor:
                if attn_mask is not None or is_causal:
                    raise UnsupportedModelError("tokred's reducing ViT blocks do not take attn_mask/is_causal")
                plan = planner(_call, x) if _planned else FULL_BLOCK
                point = vit_point(plan, _call)
                before = entering[_index] if _index else MergedTokens()  # what the previous block left
                size, source = before.size, before.source
                bias = size.log()[:, None, None, :, 0] if (prop_attn and size is not None) else None
                num_tokens = x.shape[1]
                if point is not None and point.before_attention:  # reduce the input, reuse its attention
                    h = blk.norm1(x)
                    q, k = queries_keys(blk.attn, h)
                    probs = attention_probs(q, k, blk.attn.scale, bias)
                    scores = AttentionScores(x, k.mean(dim=1), size, num_protected, _call, attention=probs)
                    reduction = point.choose(scores)
                    if reduction is not None:
                        if trace_source:
                            source = reduction.reduce_source(source if source is not None else identity_source(x))
                        x, size = reduction.reduce(x, size)
                        probs, h = reduction.reduce_attention(probs), blk.norm1(x)
                    x = x + blk.drop_path1(blk.ls1(attention_with(blk.attn, h, probs)))
                    point = None
                else:
                    attn_out, keys, cls_attention, attention = size_aware_attention(
                        blk.attn, blk.norm1(x), bias,
                        cls_attention=point is not None and point.cls_attention,
                        attention=point is not None and point.attention,
                    )  # fmt: skip
                    x = x + blk.drop_path1(blk.ls1(attn_out))
                if point is not None:
                    scores = AttentionScores(x, keys, size, num_protected, _call, cls_attention, attention)
                    reduction = point.choose(scores)
                    if reduction is not None:
                        if trace_source:
                            source = reduction.reduce_source(source if source is not None else identity_source(x))
                        x, size = reduction.reduce(x, size)
                after = MergedTokens(size, source if trace_source else None)
                entering[_index + 1] = after
                adapter.merged_tokens = after
                x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
                counter.record(_call.name, num_tokens, num_tokens, num_tokens, x.shape[1])  # attention: queries
                # and keys of all entering tokens (also before_attention, whose probabilities are computed on them)
                return x

            patch.replace_forward(block, forward)

        if may_reduce and hasattr(self.root, "forward_intermediates"):
            original = self.root.forward_intermediates

            def forward_intermediates(*args: Any, **kwargs: Any) -> Any:
                if kwargs.get("output_fmt", "NCHW") == "NCHW" and patch.active:
                    raise UnsupportedModelError(
                        f"{patch.method.name} reduces tokens, so the intermediates no longer fill the patch grid and "
                        "cannot be returned as NCHW maps; call forward_intermediates(..., output_fmt='NLC') for the "
                        "token features (reduced tokens, prefix tokens split off as usual)"
                    )
                return original(*args, **kwargs)

            patch.set_attr(self.root, "forward_intermediates", forward_intermediates)

    # --- deprecated installers (kept for plugins written against earlier versions) -----------------------------
    def install_merging(
        self,
        patch: Patch,
        choose: MergeChooser,
        prop_attn: bool = True,
        trace_source: bool = False,
        may_merge: bool = True,
    ) -> None:
        """Deprecated since 0.3 (removed in 0.4): ``install_blocks(patch, planner, prop_attn=...,
        trace_source=..., may_reduce=...)`` with a planner returning ``BlockPlan(tokens=TokenReduce(choose))``.
        ``choose(call, metric)`` gets ``scores.keys`` as its ``metric``."""
        warnings.warn(
            "TimmViTAdapter.install_merging(patch, choose) is deprecated and will be removed in tokred 0.4; use "
            "TimmViTAdapter.install_blocks(patch, planner, prop_attn=..., trace_source=..., may_reduce=...) with a "
            "planner returning tokred.reduction.BlockPlan(tokens=TokenReduce(lambda scores: ...)); the old "
            "choose(call, metric) receives scores.keys as metric",
            DeprecationWarning,
            stacklevel=2,
        )
        self.install_blocks(
            patch, chooser_planner(choose), prop_attn=prop_attn, trace_source=trace_source, may_reduce=may_merge
        )

    def install_merging_blocks(
        self, patch: Patch, choose: Callable[[int, torch.Tensor, int], Any], prop_attn: bool = True,
        trace_source: bool = False,
    ) -> None:  # fmt: skip
        """Deprecated (tokred 0.2's name; removed in 0.4): ``choose(layer_index, metric, num_protected)``. Use
        :meth:`install_blocks` as :meth:`install_merging` says."""
        warnings.warn(
            "TimmViTAdapter.install_merging_blocks(patch, choose) (tokred 0.2) is deprecated and will be removed in "
            "tokred 0.4; use TimmViTAdapter.install_blocks(patch, planner, prop_attn=..., trace_source=...) with a "
            "planner returning tokred.reduction.BlockPlan(tokens=TokenReduce(lambda scores: ...))",
            DeprecationWarning,
            stacklevel=2,
        )
        protected = self.num_protected
        self.install_blocks(
            patch,
            chooser_planner(lambda call, metric: choose(call.index, metric, protected)),
            prop_attn=prop_attn,
            trace_source=trace_source,
        )


def chooser_planner(choose: MergeChooser) -> Planner:
    """The planner of a merge chooser ``choose(call, metric)`` (the protocol before 0.3)."""

    def plan(call: BlockCall, x: torch.Tensor) -> BlockPlan:
        return BlockPlan(tokens=TokenReduce(lambda scores: choose(call, scores.keys)))

    return plan


def vit_point(plan: Any, call: BlockCall) -> TokenReduce | None:
    """The plan's ``tokens`` point; a plan that asks for a point a ViT block does not offer is an error."""
    if not isinstance(plan, BlockPlan):
        raise UnsupportedModelError(
            f"{call.name}: a ViT planner returns a BlockPlan (RowPlans are for diffusion denoisers), got "
            f"{type(plan).__name__}"
        )
    if not all(p.is_identity for p in (plan.attn, plan.kv, plan.cross, plan.attn2, plan.kv2, plan.mlp)):
        raise UnsupportedModelError(
            f"{call.name}: timm ViT blocks offer BlockPlan(tokens=...) only; attn/kv/cross/attn2/kv2/mlp are "
            "diffusion points"
        )
    return plan.tokens


# Copied from timm 1.0.31 timm.layers.Attention.forward; changes marked "tokred:".
def size_aware_attention(
    attn: torch.nn.Module,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    cls_attention: bool = False,
    attention: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """timm ``Attention.forward`` with an additive logit ``bias``; also returns the keys averaged over heads
    (ToMe's merge metric), and on request the class token's attention row averaged over heads [B, N]
    (``cls_attention``) and the attention probabilities [B, H, N, N] (``attention``). With ``bias=None`` the
    output is exactly what timm computes.

    The bias goes into ``scaled_dot_product_attention`` as a float mask, so fused attention stays fused; the
    requested scores are computed next to it (query 0 against all keys, or the explicit matrix) and reuse the
    eager path's matrix when ``fused_attn`` is off.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None:
        bias = bias.to(q.dtype)  # tokred: proportional attention's log(size)
        if torch.compiler.is_compiling():
            # tokred: a token count known only at run time (CA-ToMe's threshold, an unbacked size) would make
            # attention's mask broadcasting guard on N == 1; the explicit [B, 1, N, N] view has nothing to guard
            bias = bias.expand(-1, -1, N, -1)
    probs = None  # tokred: the attention matrix, when computed

    if attn.fused_attn:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0  # tokred: attn_mask=bias
        )
        if attention:  # tokred: the explicit matrix next to fused attention
            probs = attention_probs(q, k, attn.scale, bias)
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias  # tokred
        probs = scores.softmax(dim=-1)  # tokred: kept for the scores
        out = attn.attn_drop(probs) @ v

    out = out.transpose(1, 2).reshape(B, N, attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    # tokred: the scores a reduction asked for
    cls_row = None
    if cls_attention:
        cls_row = probs[:, :, 0] if probs is not None else attention_probs(q[:, :, :1], k, attn.scale, bias)[:, :, 0]
        cls_row = cls_row.mean(dim=1)
    return out, k.mean(dim=1), cls_row, probs if attention else None


def identity_source(x: torch.Tensor) -> torch.Tensor:
    """Each token covers itself: [B, N, N] identity."""
    n, t, _ = x.shape
    return torch.eye(t, device=x.device, dtype=x.dtype)[None].expand(n, t, t)


def queries_keys(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention``'s queries and keys [B, H, N, D] of ``x`` (qk-norm applied), without the values: the
    first two thirds of the ``qkv`` projection."""
    B, N, _ = x.shape
    attn_dim = attn.num_heads * attn.head_dim
    weight, bias = attn.qkv.weight[: 2 * attn_dim], attn.qkv.bias
    qk = F.linear(x, weight, None if bias is None else bias[: 2 * attn_dim])
    q, k = qk.reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k)


# Adapted from timm 1.0.31 timm.layers.Attention.forward; changes marked "tokred:".
def attention_with(attn: torch.nn.Module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """timm ``Attention.forward`` on ``x`` [B, N, C] with given attention probabilities ``probs`` [B, H, N, N]
    (MCTF's one-step-ahead attention): only the values are projected."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    attn_dim = attn.num_heads * attn.head_dim
    weight, bias = attn.qkv.weight[2 * attn_dim :], attn.qkv.bias  # tokred: the values only
    v = F.linear(x, weight, None if bias is None else bias[2 * attn_dim :])
    v = v.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    out = attn.attn_drop(probs.to(v.dtype)) @ v  # tokred: the given probabilities
    out = out.transpose(1, 2).reshape(B, N, attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) for queries ``q`` [B, H, M, D] over keys ``k`` [B, H, N, D]: [B, H, M, N]."""
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1)
