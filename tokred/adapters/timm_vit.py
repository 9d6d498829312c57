"""timm Vision Transformers: block discovery and the merged-token block forward.

Merging methods for ViTs (ToMe, CA-ToMe) differ only in *which* tokens they merge at each block; the rest
is shared and lives here: a block forward that reproduces timm's ``Block`` exactly (LayerScale, qk-norm,
fused attention included), computes the merge metric (the attention keys averaged over heads), passes
token sizes to attention as an additive ``log(size)`` bias (proportional attention) and merges between
attention and MLP, as the official ToMe does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError
from ..merge import BipartiteMerge, merge_source, merge_wavg
from .base import Adapter, has_class_named

if TYPE_CHECKING:
    from ..patch import Patch

# chooser(layer_index, metric [B, N, C], num_protected) -> a merge, or None to keep every token
MergeChooser = Callable[[int, torch.Tensor, int], BipartiteMerge | None]


class TimmViTAdapter(Adapter):
    family = "timm_vit"
    description = "timm VisionTransformer and subclasses: ViT, DeiT, DeiT-3 (LayerScale), distilled DeiT"

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, model)
        self.blocks = list(model.blocks)
        # cls, distillation and register tokens sit in front of the patch tokens and are never merged
        self.num_protected = int(getattr(model, "num_prefix_tokens", 1))

    @classmethod
    def match(cls, obj: Any) -> TimmViTAdapter | None:
        if has_class_named(obj, "VisionTransformer", "timm.") and hasattr(obj, "blocks"):
            return cls(obj)
        return None

    def check(self) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        for i, block in enumerate(self.blocks):
            if type(block) is not Block or type(getattr(block, "attn", None)) is not Attention:
                raise UnsupportedModelError(
                    f"block {i} is {type(block).__name__} with {type(getattr(block, 'attn', None)).__name__}; "
                    "tokred supports timm ViTs built from timm.models.vision_transformer.Block with "
                    "timm.layers.Attention (ViT, DeiT, DeiT-3)"
                )

    def attach(self, patch: Patch) -> None:
        # Each forward is one "call": the per-call scratch (token sizes, sources) starts empty.
        def before_forward(module: torch.nn.Module, args: tuple) -> None:
            patch.state.begin_call()

        patch.add_hook(self.root.register_forward_pre_hook(before_forward))

    def install_merging_blocks(
        self, patch: Patch, choose: MergeChooser, prop_attn: bool = True, trace_source: bool = False
    ) -> None:
        """Swap every block's forward for one that merges tokens where ``choose`` returns a merge.

        After a forward, ``patch.state.call["size"]`` holds each token's size and, with ``trace_source``,
        ``patch.state.call["source"]`` the [B, N', N_input] map from merged to input tokens.
        """
        call = patch.state.call
        num_protected = self.num_protected

        for index, block in enumerate(self.blocks):

            def forward(
                blk: torch.nn.Module,
                x: torch.Tensor,
                attn_mask: torch.Tensor | None = None,
                is_causal: bool = False,
                _index: int = index,
            ) -> torch.Tensor:
                if attn_mask is not None or is_causal:
                    raise UnsupportedModelError("tokred's merging ViT blocks do not take attn_mask/is_causal")
                size = call.get("size")
                bias = size.log()[:, None, None, :, 0] if (prop_attn and size is not None) else None
                attn_out, metric = size_aware_attention(blk.attn, blk.norm1(x), bias)
                x = x + blk.drop_path1(blk.ls1(attn_out))
                merge = choose(_index, metric, num_protected)
                if merge is not None:
                    if trace_source:
                        call["source"] = merge_source(merge, x, call.get("source"))
                    x, call["size"] = merge_wavg(merge, x, size)
                x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
                return x

            patch.replace_forward(block, forward)


def size_aware_attention(
    attn: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention.forward`` with an additive logit ``bias``; also returns the keys averaged over
    heads (ToMe's merge metric). With ``bias=None`` it computes exactly what timm computes.

    The bias goes into ``scaled_dot_product_attention`` as a float mask, so fused attention stays fused.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None:
        bias = bias.to(q.dtype)

    if attn.fused_attn:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        out = attn.attn_drop(scores.softmax(dim=-1)) @ v

    out = out.transpose(1, 2).reshape(B, N, attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, k.mean(dim=1)
