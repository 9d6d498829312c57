"""diffusers MMDiTs: ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5), alone or as ``pipeline.transformer``.

The adapter finds the ``JointTransformerBlock`` modules (image and text streams side by side, joint attention
over both), counts denoiser calls and generations with the same hook as the U-Net adapter
(``SD3Transformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)``), and
runs every block through :func:`planned_forward`, diffusers' block forward with these reduction points:

* ``attn``: reduce/restore of the *image* tokens around joint attention (the text tokens are never reduced);
* ``kv``: the image tokens the image stream's keys and values are projected from, and hooks on the projected
  keys and values (``attn.to_k`` / ``attn.to_v``; the text stream's ``add_k_proj`` / ``add_v_proj`` are
  untouched), so diffusers' own ``JointAttnProcessor2_0`` computes the attention;
* ``attn2`` / ``kv2``: the same for SD3.5's second image self-attention (dual-attention blocks);
* ``mlp``: reduce/restore around the image feed-forward;
* the denoiser's output (``proj_out``, per-patch noise) as tokens on the patch grid (:meth:`install_output`).

The image tokens are row-major over the patch grid, as ``PatchEmbed`` flattens it: ``Grid(h, w)`` with
``h, w = latent / patch_size``. SD3.5's skip-layer guidance makes a second transformer call per step with
``skip_layers``: that call is *auxiliary*, runs unreduced and is not counted as a step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UnsupportedModelError
from ..reduction import (
    FULL_BLOCK,
    BlockCall,
    BlockPlan,
    Grid,
    Planner,
    RowPlans,
    install_kv_routing,
    kv_source,
    projected_kv,
)
from .base import Adapter, attach_denoiser_state, has_class_named, hook_prediction
from .diffusers_unet import _row, feed_forward

if TYPE_CHECKING:
    from ..patch import Patch

KV_PROCESSORS = ("JointAttnProcessor2_0",)


class DiffusersMMDiTAdapter(Adapter):
    family = "diffusers_mmdit"
    description = "diffusers SD3Transformer2DModel (Stable Diffusion 3/3.5), alone or as a pipeline's .transformer"

    def __init__(self, container: Any, transformer: torch.nn.Module) -> None:
        super().__init__(container, transformer)
        self.blocks = [(n, m) for n, m in transformer.named_modules() if has_class_named(m, "JointTransformerBlock")]
        self.patch_size = int(transformer.config.patch_size)

    @classmethod
    def match(cls, obj: Any) -> DiffusersMMDiTAdapter | None:
        transformer = getattr(obj, "transformer", None) if not isinstance(obj, torch.nn.Module) else obj
        if transformer is not None and has_class_named(transformer, "SD3Transformer2DModel", "diffusers."):
            return cls(obj, transformer)
        return None

    def check(self) -> None:
        if not self.blocks:
            raise UnsupportedModelError("this SD3Transformer2DModel has no JointTransformerBlock to reduce tokens in")
        from diffusers.models.attention import JointTransformerBlock

        for name, block in self.blocks:
            # planned_forward reproduces JointTransformerBlock.forward; a subclass with its own would be replaced
            if type(block).forward is not JointTransformerBlock.forward:
                raise UnsupportedModelError(
                    f"block {name} is {type(block).__name__}, a JointTransformerBlock with its own forward; tokred "
                    "reproduces diffusers' JointTransformerBlock.forward and cannot patch a different one"
                )

    def attach(self, patch: Patch) -> None:
        attach_denoiser_state(
            patch,
            self.container,
            self.root,
            sample=("hidden_states", 0),
            timestep=("timestep", 3),
            auxiliary_kwarg="skip_layers",
        )

    def grid(self, latent_size: tuple[int, int] | None, num_tokens: int) -> Grid | None:
        """The image-token grid for a latent of ``latent_size`` (patchified, row-major), or None if
        ``num_tokens`` does not fill it."""
        if latent_size is None:
            return None
        h, w = latent_size[0] // self.patch_size, latent_size[1] // self.patch_size
        return Grid(h, w, 1) if h * w == num_tokens else None

    def require_kv_hooks(self, names: set[str] | None, method: str) -> None:
        """Refuse blocks whose attention does not project image keys/values with ``to_k``/``to_v``."""
        for name, block in self.blocks:
            if names is not None and name not in names:
                continue
            attns = [("attn", block.attn)] + ([("attn2", block.attn2)] if block.use_dual_attention else [])
            for sub, attn in attns:
                processor = type(getattr(attn, "processor", None)).__name__
                if processor not in KV_PROCESSORS or getattr(attn, "fused_projections", False):
                    raise UnsupportedModelError(
                        f"{method}: {name}.{sub} uses {processor}; it needs diffusers' default JointAttnProcessor2_0 "
                        "with separate to_k/to_v projections (undo fuse_qkv_projections / custom processors first)"
                    )

    def install_blocks(self, patch: Patch, planner: Planner, names: set[str] | None = None) -> None:
        state, tokens = patch.state, patch.tokens
        for index, (name, block) in enumerate(self.blocks):
            if names is not None and name not in names:
                continue

            def forward(blk: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, _name: str = name,
                        _index: int = index, **kwargs: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
                if state.auxiliary:
                    plan = FULL_BLOCK
                else:
                    grid = self.grid(state.latent_size, hidden_states.shape[1])
                    plan = planner(BlockCall(_name, _index, blk, 1, grid, state), hidden_states)
                if isinstance(plan, BlockPlan):
                    return planned_forward(blk, plan, hidden_states, *args, _count=(tokens, _name), **kwargs)
                return rows_forward(blk, plan, hidden_states, args, kwargs, (tokens, _name))

            patch.replace_forward(block, forward)
            for attn in (block.attn, getattr(block, "attn2", None)):
                if attn is not None:
                    install_kv_routing(patch, attn)

    def install_output(self, patch: Patch, fn: Callable[[torch.Tensor, Grid], torch.Tensor]) -> None:
        """``fn(tokens [B, N, p*p*C], grid)`` rewrites the per-patch noise prediction (``proj_out``'s output)."""
        proj_out = getattr(self.root, "proj_out", None)
        if not isinstance(proj_out, torch.nn.Linear):
            raise UnsupportedModelError("this SD3Transformer2DModel has no proj_out Linear layer")
        hook_prediction(patch, proj_out, lambda n: self.grid(patch.state.latent_size, n), fn)


def rows_forward(
    block: torch.nn.Module, plans: RowPlans, hidden_states: torch.Tensor, args: tuple, kwargs: dict, count: tuple
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One plan per batch row (CA-ToMe's ``batch_independent``): each row through the block on its own, its
    per-sample arguments (text stream, ``temb``, batched ``joint_attention_kwargs`` such as IP-Adapter
    embeddings) sliced alike."""
    batch = hidden_states.shape[0]
    outs = []
    for i, plan in enumerate(plans.rows):
        row_args = [_row(a, i, batch) for a in args]
        row_kwargs = {k: _row(v, i, batch) for k, v in kwargs.items()}
        outs.append(planned_forward(block, plan, hidden_states[i : i + 1], *row_args, _count=count, **row_kwargs))
    encoder = None if outs[0][0] is None else torch.cat([o[0] for o in outs], dim=0)
    return encoder, torch.cat([o[1] for o in outs], dim=0)


# Copied from diffusers 0.42.1 JointTransformerBlock.forward; changes marked "tokred:".
def planned_forward(
    block: torch.nn.Module,
    plan: BlockPlan,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    joint_attention_kwargs: dict[str, Any] | None = None,
    _count: tuple[Any, str] | None = None,  # tokred: (TokenCounter, block name) to record the token counts in
) -> tuple[torch.Tensor | None, torch.Tensor]:
    joint_attention_kwargs = joint_attention_kwargs or {}
    num_tokens = hidden_states.shape[1]  # tokred
    if block.use_dual_attention:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden_states2, gate_msa2 = block.norm1(
            hidden_states, emb=temb
        )
    else:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)

    if block.context_pre_only:
        norm_encoder_hidden_states = block.norm1_context(encoder_hidden_states, temb)
    else:
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
            encoder_hidden_states, emb=temb
        )

    # tokred: the image queries see plan.attn.reduce's tokens; plan.kv gives the image keys/values
    attn_input = plan.attn.reduce(norm_hidden_states)
    kv_input = plan.kv.tokens(norm_hidden_states) if plan.kv.tokens is not None else None
    seen_kv: list[int] = []
    with kv_source(block.attn, kv_input), projected_kv(block.attn, plan.kv, seen_kv):
        attn_output, context_attn_output = block.attn(
            hidden_states=attn_input,
            encoder_hidden_states=norm_encoder_hidden_states,
            **joint_attention_kwargs,
        )
    attn_output = plan.attn.restore(attn_output)  # tokred

    attn_output = gate_msa.unsqueeze(1) * attn_output
    hidden_states = hidden_states + attn_output

    if block.use_dual_attention:
        attn2_input = plan.attn2.reduce(norm_hidden_states2)  # tokred
        kv2_input = plan.kv2.tokens(norm_hidden_states2) if plan.kv2.tokens is not None else None  # tokred
        with kv_source(block.attn2, kv2_input), projected_kv(block.attn2, plan.kv2):  # tokred
            attn_output2 = block.attn2(hidden_states=attn2_input, **joint_attention_kwargs)
        attn_output2 = plan.attn2.restore(attn_output2)  # tokred
        attn_output2 = gate_msa2.unsqueeze(1) * attn_output2
        hidden_states = hidden_states + attn_output2

    norm_hidden_states = block.norm2(hidden_states)
    norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    mlp_input = plan.mlp.reduce(norm_hidden_states)  # tokred
    ff_output = plan.mlp.restore(feed_forward(block, mlp_input))  # tokred: restore; chunking that fits
    ff_output = gate_mlp.unsqueeze(1) * ff_output

    hidden_states = hidden_states + ff_output

    if block.context_pre_only:
        encoder_hidden_states = None
    else:
        context_attn_output = c_gate_msa.unsqueeze(1) * context_attn_output
        encoder_hidden_states = encoder_hidden_states + context_attn_output

        norm_encoder_hidden_states = block.norm2_context(encoder_hidden_states)
        norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        if block._chunk_size is not None:
            from diffusers.models.attention import _chunked_feed_forward

            context_ff_output = _chunked_feed_forward(
                block.ff_context, norm_encoder_hidden_states, block._chunk_dim, block._chunk_size
            )
        else:
            context_ff_output = block.ff_context(norm_encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output

    if _count is not None:  # tokred
        kv_tokens = seen_kv[0] if seen_kv else (kv_input.shape[1] if kv_input is not None else attn_input.shape[1])
        _count[0].record(_count[1], num_tokens, attn_input.shape[1], kv_tokens, mlp_input.shape[1], None)
    return encoder_hidden_states, hidden_states
