"""timm Vision Transformers: block discovery and the merging block forward.

Merging methods for ViTs (ToMe, CA-ToMe) differ only in *which* tokens they merge at each block; the rest is
shared and lives here: a block forward that reproduces timm's ``Block`` exactly (LayerScale, qk-norm, fused
attention included), computes the merge metric (the attention keys averaged over heads), passes token sizes to
attention as an additive ``log(size)`` bias (proportional attention) and merges between attention and MLP, as
the official ToMe does.

The ViT reduction point is the *merge chooser*: ``choose(call, metric) -> BipartiteMerge | None`` for each block
call, ``metric`` [B, N, C] being the keys averaged over heads. The bookkeeping (each token's size, and with
``trace_source`` which input tokens it covers) is the adapter's: :attr:`TimmViTAdapter.merged_tokens` after a
forward. Every block reads the sizes its predecessor produced in the same forward (not "the latest"), so a block
recomputed under gradient checkpointing sees exactly what it saw the first time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError
from ..merge import BipartiteMerge, merge_source, merge_wavg
from ..reduction import BlockCall, Grid
from .base import Adapter, has_class_named

if TYPE_CHECKING:
    from ..patch import Patch

# choose(call, metric [B, N, C]) -> a merge, or None to keep every token
MergeChooser = Callable[[BlockCall, torch.Tensor], BipartiteMerge | None]


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

    def patch_grid(self) -> Grid | None:
        grid = getattr(getattr(self.root, "patch_embed", None), "grid_size", None)
        return Grid(int(grid[0]), int(grid[1]), 1) if grid is not None else None

    def install_merging(
        self,
        patch: Patch,
        choose: MergeChooser,
        prop_attn: bool = True,
        trace_source: bool = False,
        may_merge: bool = True,
    ) -> None:
        """Swap every block's forward for one that merges tokens where ``choose`` returns a merge.

        ``may_merge=False`` (e.g. ``r=0``) tells the adapter that the token count never changes, which keeps
        ``forward_intermediates(..., output_fmt="NCHW")`` available.
        """
        entering, counter = self._entering, patch.tokens
        grid = self.patch_grid()
        adapter = self

        for index, (name, block) in enumerate(self.blocks):
            call = BlockCall(name, index, block, 1, grid, 0)

            def forward(
                blk: torch.nn.Module,
                x: torch.Tensor,
                attn_mask: torch.Tensor | None = None,
                is_causal: bool = False,
                _index: int = index,
                _call: BlockCall = call,
            ) -> torch.Tensor:
                if attn_mask is not None or is_causal:
                    raise UnsupportedModelError("tokred's merging ViT blocks do not take attn_mask/is_causal")
                before = entering[_index] if _index else MergedTokens()  # what the previous block left
                size, source = before.size, before.source
                bias = size.log()[:, None, None, :, 0] if (prop_attn and size is not None) else None
                attn_out, metric = size_aware_attention(blk.attn, blk.norm1(x), bias)
                num_tokens = x.shape[1]
                x = x + blk.drop_path1(blk.ls1(attn_out))
                merge = choose(_call, metric)
                if merge is not None:
                    if trace_source:
                        source = merge_source(merge, x, source)
                    x, size = merge_wavg(merge, x, size)
                after = MergedTokens(size, source if trace_source else None)
                entering[_index + 1] = after
                adapter.merged_tokens = after
                x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
                counter.record(_call.name, num_tokens, num_tokens, num_tokens, x.shape[1])
                return x

            patch.replace_forward(block, forward)

        if may_merge and hasattr(self.root, "forward_intermediates"):
            original = self.root.forward_intermediates

            def forward_intermediates(*args: Any, **kwargs: Any) -> Any:
                if kwargs.get("output_fmt", "NCHW") == "NCHW" and patch.active:
                    raise UnsupportedModelError(
                        f"{patch.method.name} merges tokens, so the intermediates no longer fill the patch grid and "
                        "cannot be returned as NCHW maps; call forward_intermediates(..., output_fmt='NLC') for the "
                        "token features (merged tokens, prefix tokens split off as usual)"
                    )
                return original(*args, **kwargs)

            patch.set_attr(self.root, "forward_intermediates", forward_intermediates)


# Copied from timm 1.0.31 timm.layers.Attention.forward; changes marked "tokred:".
def size_aware_attention(
    attn: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention.forward`` with an additive logit ``bias``; also returns the keys averaged over heads
    (ToMe's merge metric). With ``bias=None`` it computes exactly what timm computes.

    The bias goes into ``scaled_dot_product_attention`` as a float mask, so fused attention stays fused.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None:
        bias = bias.to(q.dtype)  # tokred: proportional attention's log(size)

    if attn.fused_attn:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0  # tokred: attn_mask=bias
        )
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias  # tokred
        out = attn.attn_drop(scores.softmax(dim=-1)) @ v

    out = out.transpose(1, 2).reshape(B, N, attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, k.mean(dim=1)  # tokred: the merge metric
