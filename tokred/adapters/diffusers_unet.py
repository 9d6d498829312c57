"""diffusers U-Nets (``UNet2DConditionModel``: Stable Diffusion 1.x, 2.x, SDXL), alone or as ``pipeline.unet``.

The adapter finds the ``BasicTransformerBlock`` modules and the downsampling *level* each one runs at (from
the U-Net's architecture: ``down_blocks.i`` at ``2**i``, the mid block at the lowest resolution, ``up_blocks``
mirrored), counts denoiser calls and generations, and runs every block through :func:`block_forward`,
diffusers' block forward with the reduction points of :mod:`tokred.reduction`:

* ``attn`` / ``cross`` / ``mlp``: reduce/restore around self-attention, cross-attention and the MLP;
* ``kv``: the tokens self-attention's keys and values come from, and hooks on the projected keys and values
  (the library's own attention processor then computes attention);
* the denoiser's output (``conv_out``) as tokens on the latent grid (:meth:`DiffusersUNetAdapter.install_output`);
* whole modules of the down/mid/up path skipped on some calls, one feature reused from an earlier call
  (:meth:`DiffusersUNetAdapter.install_module_cache`, DeepCache's point; :meth:`DiffusersUNetAdapter.unet_parts`).

Levels: SD 1.x/2.x have transformer blocks at levels 1, 2, 4 (and 8 in the mid block of some configs); SDXL
at 2 and 4 only. :meth:`DiffusersUNetAdapter.default_level` is the highest-resolution level with transformer
blocks (1 on SD 1.x/2.x, 2 on SDXL); methods reduce the blocks at levels up to their ``max_downsample``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidOptionError, UnsupportedModelError
from ..method import MethodState
from ..reduction import FULL_BLOCK, BlockCall, BlockPlan, Grid, Planner, RowPlans, projected_kv
from .base import Adapter, attach_denoiser_state, grid_for, has_class_named

if TYPE_CHECKING:
    from ..patch import Patch

# The norm types of BasicTransformerBlock that block_forward reproduces (all that diffusers 0.42 has).
SUPPORTED_NORM_TYPES = (
    "layer_norm",
    "layer_norm_i2vgen",
    "ada_norm",
    "ada_norm_zero",
    "ada_norm_single",
    "ada_norm_continuous",
)
# Attention processors that project keys and values with attn.to_k / attn.to_v (where the kv hooks act).
KV_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "XFormersAttnProcessor", "AttnProcessorNPU")

_DOWN = re.compile(r"(?:^|\.)down_blocks\.(\d+)\.")
_UP = re.compile(r"(?:^|\.)up_blocks\.(\d+)\.")


def block_level(name: str, num_levels: int) -> int:
    """The downsampling a U-Net transformer block runs at, from its module name."""
    if m := _DOWN.search(name):
        return 2 ** int(m.group(1))
    if m := _UP.search(name):
        return 2 ** (num_levels - 1 - int(m.group(1)))
    return 2 ** (num_levels - 1)  # mid block: the lowest resolution


# --- whole modules reused across calls (DeepCache) ------------------------------------------------------------------


@dataclass(frozen=True)
class UNetPart:
    """A module of the U-Net's down, mid or up path, numbered as DeepCache numbers it.

    ``block`` counts the levels from the top: ``down_blocks[i]`` and ``up_blocks[n - 1 - i]`` are block ``i``, the
    mid block is block ``n``. ``layer`` counts a block's layers from its skip connection's top: in a down block
    ``resnets[j]`` and ``attentions[j]`` are layer ``j`` and the downsampler is ``len(resnets)``; in an up block
    ``resnets[j]`` and ``attentions[j]`` are layer ``len(resnets) - 1 - j`` and the upsampler is layer 0. A whole
    block has ``layer=None``. Up layer ``k`` consumes the output of down layer ``k - 1`` of the same block (layer
    0: the block's input) through the skip connection.
    """

    kind: str  # "down", "mid" or "up"
    block: int
    layer: int | None
    name: str  # the module's name in the U-Net
    module: torch.nn.Module


class ModuleCache(MethodState):
    """What :meth:`DiffusersUNetAdapter.install_module_cache` keeps between the calls of one generation: the kept
    outputs (a copy of the feature's, the shapes of the others'), whether the current call reuses them, the
    ``sample`` shape they were computed for and each transformer block's token count."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.outputs: dict[str, Any] = {}
        self.reuse = False
        self.sample_shape: tuple[int, ...] | None = None
        self.block_tokens: dict[str, int] = {}


@dataclass(frozen=True)
class _Empty:
    """The shape of a kept output that is never read: an uninitialised tensor stands in for it."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


class DiffusersUNetAdapter(Adapter):
    family = "diffusers_unet"
    description = (
        "diffusers UNet2DConditionModel (Stable Diffusion 1.x/2.x, SDXL), alone or as a pipeline's .unet"
    )

    def __init__(self, container: Any, unet: torch.nn.Module) -> None:
        super().__init__(container, unet)
        num_levels = len(getattr(unet, "down_blocks", ())) or 1
        self.blocks = [(n, m) for n, m in unet.named_modules() if has_class_named(m, "BasicTransformerBlock")]
        self.level: dict[str, int] = {name: block_level(name, num_levels) for name, _ in self.blocks}
        # the blocks install_blocks runs through block_forward (which records their token counts itself)
        self.planned: set[str] = set()

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
        attach_denoiser_state(patch, self.container, self.root, sample=("sample", 0), timestep=("timestep", 1))

    # --- levels -----------------------------------------------------------------------------------------
    def levels(self) -> list[int]:
        """The downsampling levels that have transformer blocks, highest resolution first."""
        return sorted(set(self.level.values()))

    def default_level(self) -> int:
        """The highest-resolution level with transformer blocks: 1 on SD 1.x/2.x, 2 on SDXL."""
        return self.levels()[0]

    def blocks_up_to(self, max_downsample: int | None, option: str = "max_downsample") -> set[str]:
        """Names of the blocks at levels <= ``max_downsample`` (None: :meth:`default_level`); an error at apply
        time when that selects no block."""
        limit = self.default_level() if max_downsample is None else max_downsample
        names = {name for name, level in self.level.items() if level <= limit}
        if not names:
            levels = ", ".join(map(str, self.levels()))
            raise InvalidOptionError(
                f"{option}={max_downsample} selects no transformer block of this U-Net: its transformer blocks "
                f"run at downsampling {levels}; use {option}>={self.levels()[0]} or leave it unset (default: "
                f"{self.default_level()}, the highest-resolution level with transformer blocks)"
            )
        return names

    def require_kv_hooks(self, names: set[str], method: str) -> None:
        """Refuse blocks whose self-attention does not project keys/values with ``to_k``/``to_v`` (fused
        projections, custom processors), where the ``kv`` point cannot act."""
        require_attn1_kv_hooks(self.blocks, names, method)

    # --- reduction points --------------------------------------------------------------------------------
    def install_blocks(self, patch: Patch, planner: Planner, names: set[str] | None = None) -> None:
        """Run the blocks (those in ``names``; default all) through :func:`block_forward` with ``planner``."""
        for index, (name, block) in enumerate(self.blocks):
            if names is None or name in names:
                patch.replace_forward(block, block_forward(patch, planner, name, index, self.level[name]))
                self.planned.add(name)

    # --- deprecated (tokred 0.2's interface; removed in 0.4) --------------------------------------------------
    @staticmethod
    def grid(latent_size: tuple[int, int], num_tokens: int) -> tuple[int, int, int] | None:
        """Deprecated: ``(h, w, downsample)`` of a block with ``num_tokens`` tokens for a latent of
        ``latent_size``, or None, with tokred 0.2's rule (downsample ``ceil(sqrt(latent tokens // block
        tokens))``, sides rounded up). Use the planner's ``call.grid`` (a :class:`~tokred.reduction.Grid`;
        ``call.level`` is the block's downsampling)."""
        warnings.warn(
            "DiffusersUNetAdapter.grid(latent_size, n) is deprecated and will be removed in tokred 0.4; use the "
            "planner's call.grid (tokred.reduction.Grid: h, w, downsample) and call.level instead",
            DeprecationWarning,
            stacklevel=2,
        )
        lh, lw = latent_size
        if num_tokens <= 0:
            return None
        downsample = int(math.ceil(math.sqrt((lh * lw) // num_tokens))) or 1
        hw = grid_for(latent_size, num_tokens, downsample)
        return None if hw is None else (hw[0], hw[1], downsample)

    def install_planned_blocks(self, patch: Patch, planner: Callable[[torch.nn.Module, torch.Tensor], Any]) -> None:
        """Deprecated (tokred 0.2): ``planner(block, hidden_states) -> BlockPlan`` for every block. Use
        :meth:`install_blocks` with ``planner(call, hidden_states)`` (``call.module`` is the block)."""
        warnings.warn(
            "DiffusersUNetAdapter.install_planned_blocks(patch, planner) is deprecated and will be removed in tokred "
            "0.4; use install_blocks(patch, planner, names=None) with planner(call, hidden_states), where "
            "call.module is the block",
            DeprecationWarning,
            stacklevel=2,
        )
        self.install_blocks(patch, lambda call, x: planner(call.module, x))

    def install_output(self, patch: Patch, fn: Callable[[torch.Tensor, Grid], torch.Tensor]) -> None:
        """``fn(tokens [B, H*W, C], grid)`` rewrites the U-Net's noise prediction (``conv_out``'s output) as
        tokens on the latent grid, in every counted call."""
        state = patch.state

        def after_conv_out(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if out.ndim != 4 or state.auxiliary:
                return None
            b, c, h, w = out.shape
            tokens = out.flatten(2).transpose(1, 2)
            new = fn(tokens, Grid(h, w, 1))
            return None if new is tokens else new.transpose(1, 2).reshape(b, c, h, w)

        conv_out = getattr(self.root, "conv_out", None)
        if not isinstance(conv_out, torch.nn.Module):
            raise UnsupportedModelError("this U-Net has no conv_out layer to read the noise prediction from")
        patch.register_forward_hook(conv_out, after_conv_out)

    # --- whole modules reused across calls (DeepCache) ----------------------------------------------------------
    def unet_parts(self) -> list[UNetPart]:
        """The U-Net's down/mid/up blocks and their resnets, attentions and samplers (see :class:`UNetPart`), in
        execution order (a block before its layers)."""
        unet, parts = self.root, []
        for i, block in enumerate(unet.down_blocks):
            parts.append(UNetPart("down", i, None, f"down_blocks.{i}", block))
            resnets, attentions = list(block.resnets), list(getattr(block, "attentions", None) or [])
            for j, resnet in enumerate(resnets):
                parts.append(UNetPart("down", i, j, f"down_blocks.{i}.resnets.{j}", resnet))
                if j < len(attentions):
                    parts.append(UNetPart("down", i, j, f"down_blocks.{i}.attentions.{j}", attentions[j]))
            for k, sampler in enumerate(getattr(block, "downsamplers", None) or []):
                parts.append(UNetPart("down", i, len(resnets), f"down_blocks.{i}.downsamplers.{k}", sampler))
        if unet.mid_block is not None:
            parts.append(UNetPart("mid", len(unet.down_blocks), None, "mid_block", unet.mid_block))
        for u, block in enumerate(unet.up_blocks):
            i = len(unet.up_blocks) - 1 - u
            parts.append(UNetPart("up", i, None, f"up_blocks.{u}", block))
            resnets, attentions = list(block.resnets), list(getattr(block, "attentions", None) or [])
            for j, resnet in enumerate(resnets):
                parts.append(UNetPart("up", i, len(resnets) - 1 - j, f"up_blocks.{u}.resnets.{j}", resnet))
                if j < len(attentions):
                    name = f"up_blocks.{u}.attentions.{j}"
                    parts.append(UNetPart("up", i, len(resnets) - 1 - j, name, attentions[j]))
            for k, sampler in enumerate(getattr(block, "upsamplers", None) or []):
                parts.append(UNetPart("up", i, 0, f"up_blocks.{u}.upsamplers.{k}", sampler))
        return parts

    def install_module_cache(
        self,
        patch: Patch,
        names: list[str],
        feature: str,
        reuse_step: Callable[[], bool],
        cache: ModuleCache,
    ) -> None:
        """Skip the modules ``names`` (:class:`UNetPart` names, none inside another) on the calls that reuse.

        Before each counted call, ``reuse_step()`` (the method's schedule) says whether the call may reuse; it does
        when the modules ran earlier in this generation for a ``sample`` of the same shape. Then none of them runs:
        ``feature`` returns a copy of its output of the last call that ran it, every other one uninitialised tensors
        of its last outputs' shapes. The caller chooses ``names`` so that only ``feature``'s output reaches a module
        that runs (DeepCache's rule does: the others feed only skipped modules, or concatenations whose results a
        skipped module discards). On the other calls the modules run, keeping a copy of ``feature``'s output (copied
        in and out, so that in-place consumers such as FreeU's scaling cannot change it) and the others' shapes.

        Token counts: every transformer block records its tokens when it runs, and 0 computed tokens in each
        sublayer when a skipped module holds it. A block that also runs a planner (:meth:`install_blocks`, the token
        method of a composition) records what its planned forward computed instead, so no call is counted twice.
        """
        from torch.utils._pytree import tree_map_only

        counter = patch.tokens
        modules = dict(self.root.named_modules())

        def before_unet(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            sample = args[0] if args else kwargs.get("sample")
            shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else None
            cache.reuse = feature in cache.outputs and shape == cache.sample_shape and bool(reuse_step())
            if not cache.reuse:
                cache.sample_shape = shape

        patch.register_forward_pre_hook(self.root, before_unet, with_kwargs=True, outside_compile=True)

        def block_runs(name: str, block: torch.nn.Module) -> Callable[..., None]:
            def before_block(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                hidden_states = args[0] if args else kwargs["hidden_states"]
                n = cache.block_tokens[name] = int(hidden_states.shape[1])
                if name not in self.planned:  # a planned forward records its own (reduced) counts
                    counter.record(name, n, n, n, n, n if block.attn2 is not None else None)

            return before_block

        for name, block in self.blocks:
            patch.register_forward_pre_hook(block, block_runs(name, block), with_kwargs=True)

        def cached_forward(name: str, module: torch.nn.Module) -> Callable[..., Any]:
            run = vars(module).get("forward") or type(module).forward.__get__(module)  # an instance forward stays
            inner = [(n, b.attn2 is not None) for n, b in self.blocks if n.startswith(name + ".")]
            if name == feature:
                keep = lambda out: tree_map_only(torch.Tensor, torch.clone, out)  # a copy, read when reused
            else:
                keep = lambda out: tree_map_only(torch.Tensor, lambda t: _Empty(t.shape, t.dtype, t.device), out)

            def forward(mod: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
                if cache.reuse and name in cache.outputs:
                    for block_name, cross in inner:
                        counter.record(block_name, cache.block_tokens.get(block_name, 0), 0, 0, 0, 0 if cross else None)
                    kept = cache.outputs[name]
                    if name == feature:
                        return tree_map_only(torch.Tensor, torch.clone, kept)
                    return tree_map_only(_Empty, lambda e: torch.empty(e.shape, dtype=e.dtype, device=e.device), kept)
                out = run(*args, **kwargs)
                cache.outputs[name] = keep(out)
                return out

            return forward

        for name in names:
            patch.replace_forward(modules[name], cached_forward(name, modules[name]))


def require_attn1_kv_hooks(blocks: list[tuple[str, torch.nn.Module]], names: set[str] | None, method: str) -> None:
    """Refuse ``BasicTransformerBlock``s (of ``blocks``; those in ``names``, None: all) whose self-attention does
    not project keys/values with ``to_k``/``to_v`` (fused projections, custom processors), where the ``kv`` point
    cannot act."""
    for name, block in blocks:
        if names is not None and name not in names:
            continue
        attn = block.attn1
        processor = type(getattr(attn, "processor", None)).__name__
        if (
            processor not in KV_PROCESSORS
            or getattr(attn, "fused_projections", False)
            or block.only_cross_attention
            or attn.group_norm is not None
            or attn.spatial_norm is not None
        ):
            raise UnsupportedModelError(
                f"{method}: {name}.attn1 uses {processor} (fused={getattr(attn, 'fused_projections', False)}, "
                f"only_cross_attention={block.only_cross_attention}, group_norm={attn.group_norm is not None}, "
                f"spatial_norm={attn.spatial_norm is not None}); it needs self-attention with separate "
                f"to_k/to_v projections and one of the processors {', '.join(KV_PROCESSORS)} (undo "
                "fuse_qkv_projections / custom processors first)"
            )


def feed_forward(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's feed-forward, chunked over tokens as diffusers' ``set_chunk_feed_forward`` asks, except that a
    reduced token count the chunk size does not divide runs in one piece (the same result: it is token-wise)."""
    chunk = getattr(block, "_chunk_size", None)
    if chunk is not None and x.shape[block._chunk_dim] % chunk == 0:
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(block.ff, x, block._chunk_dim, chunk)
    return block.ff(x)


def _row(value: Any, i: int, batch: int) -> Any:
    """Row ``i`` of a per-sample block argument; anything not batched (None, scalars) passes unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[i : i + 1]
    if isinstance(value, dict):
        return {k: _row(v, i, batch) for k, v in value.items()}
    return value


def unet_grid(latent_size: tuple[int, int] | None, num_tokens: int, level: int) -> Grid | None:
    """A U-Net block's token grid at ``level`` (see :func:`~tokred.adapters.base.grid_for`)."""
    hw = grid_for(latent_size, num_tokens, level)
    return Grid(hw[0], hw[1], level) if hw is not None else None


def block_forward(
    patch: Patch,
    planner: Planner,
    name: str,
    index: int,
    level: int,
    grid: Callable[[tuple[int, int] | None, int, int], Grid | None] = unet_grid,
) -> Callable[..., torch.Tensor]:
    """The forward of one ``BasicTransformerBlock`` (see :func:`planned_forward`), planned per call. ``grid(latent_size,
    num_tokens, level)`` gives the block's token grid: the U-Net's levels by default; the DiT adapter passes its
    patch grid."""
    state, tokens = patch.state, patch.tokens

    def forward(block: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if state.auxiliary:
            plan: BlockPlan | RowPlans = FULL_BLOCK
        else:
            call_grid = grid(state.latent_size, hidden_states.shape[1], level)
            plan = planner(BlockCall(name, index, block, level, call_grid, state), hidden_states)
        if isinstance(plan, BlockPlan):
            return planned_forward(block, plan, hidden_states, *args, _count=(tokens, name), **kwargs)
        # One plan per row: each row through the block on its own, its arguments sliced alike.
        batch = hidden_states.shape[0]
        outs = []
        for i, row_plan in enumerate(plan.rows):
            row_args = [_row(a, i, batch) for a in args]
            row_kwargs = {k: (v if k == "cross_attention_kwargs" else _row(v, i, batch)) for k, v in kwargs.items()}
            outs.append(planned_forward(block, row_plan, hidden_states[i : i + 1], *row_args, _count=(tokens, name),
                                        **row_kwargs))
        return torch.cat(outs, dim=0)

    return forward


# Copied from diffusers 0.42.1 BasicTransformerBlock.forward; changes marked "tokred:".
def planned_forward(
    block: torch.nn.Module,
    plan: BlockPlan,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    timestep: torch.LongTensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    class_labels: torch.LongTensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    _count: tuple[Any, str] | None = None,  # tokred: (TokenCounter, block name) to record the token counts in
) -> torch.Tensor:
    norm_type = block.norm_type
    batch_size = hidden_states.shape[0]
    num_tokens = hidden_states.shape[1]  # tokred

    if norm_type == "ada_norm":
        norm_hidden_states = block.norm1(hidden_states, timestep)
    elif norm_type == "ada_norm_zero":
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(
            hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype
        )
    elif norm_type in ["layer_norm", "layer_norm_i2vgen"]:
        norm_hidden_states = block.norm1(hidden_states)
    elif norm_type == "ada_norm_continuous":
        norm_hidden_states = block.norm1(hidden_states, added_cond_kwargs["pooled_text_emb"])
    elif norm_type == "ada_norm_single":
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + timestep.reshape(batch_size, 6, -1)
        ).chunk(6, dim=1)
        norm_hidden_states = block.norm1(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_msa) + shift_msa
    else:
        raise ValueError("Incorrect norm used")

    if block.pos_embed is not None:
        norm_hidden_states = block.pos_embed(norm_hidden_states)

    cross_attention_kwargs = cross_attention_kwargs.copy() if cross_attention_kwargs is not None else {}
    gligen_kwargs = cross_attention_kwargs.pop("gligen", None)

    # tokred: the queries see plan.attn.reduce's tokens; keys/values come from plan.kv
    attn_input = plan.attn.reduce(norm_hidden_states)
    kv_input = plan.kv.tokens(norm_hidden_states) if plan.kv.tokens is not None else None
    if block.only_cross_attention:
        kv_input = encoder_hidden_states
    seen_kv: list[int] = []
    with projected_kv(block.attn1, plan.kv, seen_kv):
        attn_output = block.attn1(
            attn_input,
            encoder_hidden_states=kv_input,
            attention_mask=attention_mask,
            **cross_attention_kwargs,
        )
    attn_output = plan.attn.restore(attn_output)  # tokred

    if norm_type == "ada_norm_zero":
        attn_output = gate_msa.unsqueeze(1) * attn_output
    elif norm_type == "ada_norm_single":
        attn_output = gate_msa * attn_output

    hidden_states = attn_output + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)

    if gligen_kwargs is not None:
        hidden_states = block.fuser(hidden_states, gligen_kwargs["objs"])

    cross_tokens = None  # tokred
    if block.attn2 is not None:
        if norm_type == "ada_norm":
            norm_hidden_states = block.norm2(hidden_states, timestep)
        elif norm_type in ["ada_norm_zero", "layer_norm", "layer_norm_i2vgen"]:
            norm_hidden_states = block.norm2(hidden_states)
        elif norm_type == "ada_norm_single":
            norm_hidden_states = hidden_states
        elif norm_type == "ada_norm_continuous":
            norm_hidden_states = block.norm2(hidden_states, added_cond_kwargs["pooled_text_emb"])
        else:
            raise ValueError("Incorrect norm")

        if block.pos_embed is not None and norm_type != "ada_norm_single":
            norm_hidden_states = block.pos_embed(norm_hidden_states)

        cross_input = plan.cross.reduce(norm_hidden_states)  # tokred
        cross_tokens = cross_input.shape[1]
        attn_output = block.attn2(
            cross_input,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **cross_attention_kwargs,
        )
        hidden_states = plan.cross.restore(attn_output) + hidden_states  # tokred: restore

    if norm_type == "ada_norm_continuous":
        norm_hidden_states = block.norm3(hidden_states, added_cond_kwargs["pooled_text_emb"])
    elif not norm_type == "ada_norm_single":
        norm_hidden_states = block.norm3(hidden_states)

    if norm_type == "ada_norm_zero":
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]

    if norm_type == "ada_norm_single":
        norm_hidden_states = block.norm2(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp) + shift_mlp

    mlp_input = plan.mlp.reduce(norm_hidden_states)  # tokred
    ff_output = plan.mlp.restore(feed_forward(block, mlp_input))  # tokred: restore; chunking that fits

    if norm_type == "ada_norm_zero":
        ff_output = gate_mlp.unsqueeze(1) * ff_output
    elif norm_type == "ada_norm_single":
        ff_output = gate_mlp * ff_output

    hidden_states = ff_output + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)

    if _count is not None:  # tokred
        kv_tokens = seen_kv[0] if seen_kv else (kv_input.shape[1] if kv_input is not None else attn_input.shape[1])
        _count[0].record(_count[1], num_tokens, attn_input.shape[1], kv_tokens, mlp_input.shape[1], cross_tokens)
    return hidden_states


# tokred 0.2 defined these here; they live in tokred.reduction / tokred.layout now (deprecated aliases, until 0.4).
_MOVED = {
    "SublayerPlan": ("tokred.reduction", "Sublayer"),
    "KEEP": ("tokred.reduction", "KEEP"),
    "GridMergeLayout": ("tokred.layout", "GridMergeLayout"),
}


def __getattr__(name: str) -> Any:
    moved = _MOVED.get(name)
    if moved is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, new = moved
    warnings.warn(
        f"tokred.adapters.diffusers_unet.{name} is deprecated and will be removed in tokred 0.4; use {module}.{new}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), new)
