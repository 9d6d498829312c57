"""diffusers U-Nets (``UNet2DConditionModel``, alone or as ``pipeline.unet``).

The adapter finds the ``BasicTransformerBlock`` modules, tells each block's token grid from the latent
size, counts denoiser calls and generations (a pre-hook on the U-Net that reads ``sample`` and
``timestep`` positionally or by keyword; the pipeline's ``scheduler.set_timesteps`` starts a generation),
and offers :func:`planned_block_forward`, diffusers' block forward with a reduce/restore pair around each
sublayer, for methods that shrink the token set of self-attention, cross-attention or the MLP.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UnsupportedModelError
from ..merge import GridMerge, identity
from ..options import int_at_least, is_bool, one_of, option
from .base import Adapter, attach_denoiser_state, has_class_named

if TYPE_CHECKING:
    from ..patch import Patch

# The norm types whose forward planned_block_forward reproduces (those of SD 1.x/2.x and DiT-style blocks).
SUPPORTED_NORM_TYPES = ("layer_norm", "layer_norm_i2vgen", "ada_norm", "ada_norm_zero")

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SublayerPlan:
    """How one sublayer sees the tokens: ``reduce`` before it, ``restore`` on its output."""

    reduce: Reduce = identity
    restore: Reduce = identity


KEEP = SublayerPlan()


@dataclass(frozen=True)
class BlockPlan:
    attn: SublayerPlan = KEEP
    cross: SublayerPlan = KEEP
    mlp: SublayerPlan = KEEP


FULL_BLOCK = BlockPlan()

@dataclass
class GridMergeLayout:
    """ToMe-for-SD's layout options (tomesd's names and defaults), shared by the merging methods for U-Nets."""

    max_downsample: int = option(
        1, valid="1, 2, 4 or 8", check=one_of(1, 2, 4, 8), doc="merge in blocks with at most this downsampling"
    )
    sx: int = option(2, valid="int >= 1", check=int_at_least(1), doc="destination stride along x")
    sy: int = option(2, valid="int >= 1", check=int_at_least(1), doc="destination stride along y")
    use_rand: bool = option(True, valid="bool", check=is_bool, doc="random destination in each window")
    merge_attn: bool = option(True, valid="bool", check=is_bool, doc="merge for self-attention (recommended)")
    merge_crossattn: bool = option(False, valid="bool", check=is_bool, doc="merge for cross-attention")
    merge_mlp: bool = option(False, valid="bool", check=is_bool, doc="merge for the MLP (not recommended)")

    def plan(self, merge: GridMerge | None) -> BlockPlan:
        """The block plan that merges before (and unmerges after) the sublayers these options select."""
        if merge is None:
            return FULL_BLOCK
        sub = SublayerPlan(merge, merge.unmerge)
        return BlockPlan(
            attn=sub if self.merge_attn else KEEP,
            cross=sub if self.merge_crossattn else KEEP,
            mlp=sub if self.merge_mlp else KEEP,
        )


# planner(block, hidden_states) -> BlockPlan for this call of this block
Planner = Callable[[torch.nn.Module, torch.Tensor], BlockPlan]


class DiffusersUNetAdapter(Adapter):
    family = "diffusers_unet"
    description = "diffusers UNet2DConditionModel (Stable Diffusion 1.x/2.x), alone or as a pipeline's .unet"

    def __init__(self, container: Any, unet: torch.nn.Module) -> None:
        super().__init__(container, unet)
        self.blocks: list[tuple[str, torch.nn.Module]] = [
            (name, m) for name, m in unet.named_modules() if has_class_named(m, "BasicTransformerBlock")
        ]
        self.scheduler = getattr(container, "scheduler", None) if container is not unet else None

    @classmethod
    def match(cls, obj: Any) -> DiffusersUNetAdapter | None:
        unet = getattr(obj, "unet", None) if not isinstance(obj, torch.nn.Module) else obj
        if unet is not None and has_class_named(unet, "UNet2DConditionModel", "diffusers."):
            return cls(obj, unet)
        return None

    def check(self) -> None:
        if not self.blocks:
            raise UnsupportedModelError("this U-Net has no BasicTransformerBlock to reduce tokens in")
        for name, block in self.blocks:
            norm_type = getattr(block, "norm_type", "layer_norm")
            if norm_type not in SUPPORTED_NORM_TYPES:
                raise UnsupportedModelError(
                    f"block {name} has norm_type={norm_type!r}; supported: {', '.join(SUPPORTED_NORM_TYPES)}"
                )

    def attach(self, patch: Patch) -> None:
        # UNet2DConditionModel.forward(sample, timestep, encoder_hidden_states, ...)
        attach_denoiser_state(patch, self.root, self.scheduler, sample=("sample", 0), timestep=("timestep", 1))

    @staticmethod
    def grid(latent_size: tuple[int, int], num_tokens: int) -> tuple[int, int, int] | None:
        """(h, w, downsample) of a block with ``num_tokens`` tokens, or None if no grid fits.

        The downsample factor follows tomesd: ceil(sqrt(latent tokens // block tokens)); sides round up
        as the U-Net's strided convolutions do.
        """
        lh, lw = latent_size
        downsample = int(math.ceil(math.sqrt((lh * lw) // num_tokens)))
        h, w = int(math.ceil(lh / downsample)), int(math.ceil(lw / downsample))
        if h * w != num_tokens:
            return None
        return h, w, downsample

    def install_planned_blocks(self, patch: Patch, planner: Planner) -> None:
        """Replace every transformer block's forward by :func:`planned_block_forward` with ``planner``."""
        forward = planned_block_forward(planner)
        for _, block in self.blocks:
            patch.replace_forward(block, forward)


def planned_block_forward(planner: Planner) -> Callable[..., torch.Tensor]:
    """diffusers ``BasicTransformerBlock.forward`` (for :data:`SUPPORTED_NORM_TYPES`) with the plan's
    reduce/restore around self-attention, cross-attention and the MLP. A :data:`FULL_BLOCK` plan computes
    exactly what diffusers computes. The merge metric of ToMe-SD is the block input ``hidden_states``."""

    def forward(
        block: torch.nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        plan = planner(block, hidden_states)
        norm_type = block.norm_type

        if norm_type == "ada_norm":
            norm_hidden_states = block.norm1(hidden_states, timestep)
        elif norm_type == "ada_norm_zero":
            norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(
                hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype
            )
        else:
            norm_hidden_states = block.norm1(hidden_states)
        if block.pos_embed is not None:
            norm_hidden_states = block.pos_embed(norm_hidden_states)

        cross_attention_kwargs = dict(cross_attention_kwargs) if cross_attention_kwargs else {}
        cross_attention_kwargs.pop("scale", None)
        gligen_kwargs = cross_attention_kwargs.pop("gligen", None)

        attn_output = block.attn1(
            plan.attn.reduce(norm_hidden_states),
            encoder_hidden_states=encoder_hidden_states if block.only_cross_attention else None,
            attention_mask=attention_mask,
            **cross_attention_kwargs,
        )
        if norm_type == "ada_norm_zero":
            attn_output = gate_msa.unsqueeze(1) * plan.attn.restore(attn_output)
        else:
            attn_output = plan.attn.restore(attn_output)
        hidden_states = attn_output + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        if gligen_kwargs is not None:
            hidden_states = block.fuser(hidden_states, gligen_kwargs["objs"])

        if block.attn2 is not None:
            if norm_type == "ada_norm":
                norm_hidden_states = block.norm2(hidden_states, timestep)
            else:
                norm_hidden_states = block.norm2(hidden_states)
            if block.pos_embed is not None:
                norm_hidden_states = block.pos_embed(norm_hidden_states)
            attn_output = block.attn2(
                plan.cross.reduce(norm_hidden_states),
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                **cross_attention_kwargs,
            )
            hidden_states = plan.cross.restore(attn_output) + hidden_states

        norm_hidden_states = block.norm3(hidden_states)
        if norm_type == "ada_norm_zero":
            norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        norm_hidden_states = plan.mlp.reduce(norm_hidden_states)
        if block._chunk_size is not None:
            from diffusers.models.attention import _chunked_feed_forward

            ff_output = _chunked_feed_forward(block.ff, norm_hidden_states, block._chunk_dim, block._chunk_size)
        else:
            ff_output = block.ff(norm_hidden_states)
        if norm_type == "ada_norm_zero":
            ff_output = gate_mlp.unsqueeze(1) * plan.mlp.restore(ff_output)
        else:
            ff_output = plan.mlp.restore(ff_output)
        hidden_states = ff_output + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        return hidden_states

    return forward
