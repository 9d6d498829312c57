"""EViT: keep the attentive tokens, fuse the inattentive ones (Liang et al., ICLR 2022; youweiliang/evit).

At each block in ``drop_loc`` (0-based; default 3, 6, 9: the 4th, 7th and 10th blocks of a 12-block ViT, and
``depth * k // 4`` for k = 1, 2, 3 at other depths), after attention, the class token's attention over the other
tokens (averaged over heads) ranks them: the ``ceil(keep_rate * (N - p))`` most attended are kept (``p`` the
prefix tokens: cls, distillation, registers) and, with ``fuse_token`` (default, as the official evaluation
command), the others are fused into one token, ``sum_j a_j x_j`` with ``a_j`` their class-token attention; it
joins the end and is an ordinary token from then on (a later drop may drop or fuse it again). The MLP and every
later block run on the reduced tokens.

Official options and defaults: ``keep_rate`` 0.7 (``--base_keep_rate``; the published DeiT-S models use 0.5-0.9),
``drop_loc`` (3, 6, 9 on 12 blocks), ``fuse_token`` True. DeiT-S at 0.7: 3.0 GMACs against 4.6 (the official
README); tokred counts 3.03 (``tests/test_vit_baselines.py``).

Where we differ from the official code (which is also the paper's description)
    * The class token's attention row is computed next to timm's fused attention (query 0 against all keys,
      its FLOPs counted) instead of switching the whole layer to explicit attention.
    * Distillation and register tokens are prefix tokens, kept in front and never dropped (the official code,
      written for DeiT with one class token, ranks every token after index 0).
    * ``fuse_mean=True`` (ours, off by default) divides the fused token by the sum of its weights: the
      attention-weighted *mean* of the dropped tokens instead of the official weighted sum.
    * Models without a class token (SigLIP's MAP head, average pooling) are refused: there is no class
      attention to rank by.

EViT was trained with the token reduction in place; applied to a model trained without it (training-free, as
here on pretrained timm weights) it loses more accuracy than the published fine-tuned models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tokred import Method, register_method
from tokred.adapters.timm_vit import TimmViTAdapter
from tokred.errors import InvalidOptionError, UnsupportedModelError
from tokred.merge import TokenSelect
from tokred.options import is_bool, is_int, number_in, option, optional
from tokred.reduction import FULL_BLOCK, AttentionScores, BlockCall, BlockPlan, TokenReduce


def _is_locations(v: Any) -> bool:
    return isinstance(v, list | tuple) and all(is_int(i) and i >= 0 for i in v)


@dataclass
class EViTOptions:
    keep_rate: float = option(
        0.7,
        valid="0 < keep_rate <= 1",
        check=number_in(0.0, 1.0),
        doc="fraction of the non-prefix tokens kept at each drop location; 1 keeps all (the exact identity). "
        "Published: 0.5-0.9 on DeiT-S (0.7: 3.0 GMACs)",
    )
    drop_loc: Any = option(
        None,
        valid="None, or a list or tuple of block indices (0-based ints, each < depth)",
        check=optional(_is_locations),
        doc="the blocks after whose attention tokens are dropped; None: depth * k // 4 for k = 1, 2, 3 (3, 6, 9 "
        "on 12 blocks, the official locations)",
    )
    fuse_token: bool = option(True, valid="bool", check=is_bool, doc="fuse the dropped tokens into one token")
    fuse_mean: bool = option(
        False, valid="bool", check=is_bool, doc="fused token as the weighted mean, not the official weighted sum"
    )

    def validate(self) -> None:
        if self.keep_rate <= 0:
            raise ValueError(f"option 'keep_rate'={self.keep_rate} keeps no token; valid: 0 < keep_rate <= 1")


def evit_selection(scores: AttentionScores, keep_rate: float, fuse: bool, fuse_mean: bool) -> TokenSelect | None:
    """The tokens kept (prefix first, then the most attended by the class token, most attended first) and the
    fused token's members and weights; None when ``keep_rate`` keeps every token."""
    p = scores.num_protected
    b, n = scores.cls_attention.shape
    candidates = n - p
    left = math.ceil(keep_rate * candidates)
    if left >= candidates:
        return None
    attn = scores.cls_attention[:, p:]
    order = attn.argsort(dim=1, descending=True, stable=True)  # topk(sorted=True) with a defined tie order
    prefix = torch.arange(p, device=attn.device).expand(b, p)
    keep = torch.cat([prefix, order[:, :left] + p], dim=1)
    if not fuse:
        return TokenSelect(keep)
    dropped = order[:, left:]
    weight = attn.gather(1, dropped)
    if fuse_mean:
        weight = weight / weight.sum(dim=1, keepdim=True)
    return TokenSelect(keep, dropped + p, weight)


@register_method("evit")
class EViT(Method):
    summary = "EViT: keep the tokens the class token attends to most, fuse the rest into one (ICLR 2022)"
    compile_support = "fullgraph"  # torch.compile(vit, fullgraph=True): tests/test_compile_vit.py
    kind = "prune"
    options = {"timm_vit": EViTOptions}
    # A ladder, mild to clearly degrading: 0.9-0.5 is the published fine-tuned range; training-free, 0.5 still
    # ties with the unreduced model on the embedded digits ViT (64 patches) and 0.3 loses a few points of top-1.
    presets = {
        "timm_vit": {"keep0.9": {"keep_rate": 0.9}, "keep0.7": {"keep_rate": 0.7}, "keep0.5": {"keep_rate": 0.5},
                     "keep0.3": {"keep_rate": 0.3}}
    }

    def check(self, adapter) -> None:
        if not isinstance(adapter, TimmViTAdapter):
            return
        if not adapter.has_class_token():
            raise UnsupportedModelError(
                "evit ranks tokens by the class token's attention, and this ViT has no class token (MAP or average "
                "pooling); use a method that needs no class token (tome, tofu, pitome)"
            )
        depth = len(adapter.blocks)
        drop_loc = self.options.drop_loc
        self.locations = sorted({depth * k // 4 for k in (1, 2, 3)}) if drop_loc is None else sorted(set(drop_loc))
        bad = [i for i in self.locations if i >= depth]
        if bad:
            raise InvalidOptionError(
                f"evit: drop_loc {bad} beyond the model's {depth} blocks; valid: block indices 0..{depth - 1}"
            )

    def install(self, patch) -> None:
        opts = self.options
        locations = set(self.locations) if opts.keep_rate < 1 else set()
        point = TokenReduce(
            lambda scores: evit_selection(scores, opts.keep_rate, opts.fuse_token, opts.fuse_mean), cls_attention=True
        )

        def plan(call: BlockCall, x: torch.Tensor) -> BlockPlan:
            return BlockPlan(tokens=point) if call.index in locations else FULL_BLOCK

        patch.adapter.install_blocks(patch, plan, prop_attn=False, may_reduce=bool(locations))
