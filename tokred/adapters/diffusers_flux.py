"""diffusers Flux.1: ``FluxTransformer2DModel`` (Flux.1-dev, Flux.1-schnell), alone or as ``pipeline.transformer``.

The model runs 19 dual-stream ``FluxTransformerBlock`` (image and text streams side by side, joint attention over
both, as SD3's joint blocks) and then 38 single-stream ``FluxSingleTransformerBlock`` (text and image tokens
concatenated, text first; attention and MLP in parallel, fused by one ``proj_out``). Queries and keys of both carry
rotary position embeddings (RoPE) from the token ids: the text tokens at 0, the image tokens at their (row, column)
on the packed 2x2 latent grid. The adapter runs every block through :func:`dual_forward` or :func:`single_forward`,
diffusers' block forwards with these reduction points, on the *image* tokens only (text tokens are never reduced):

* ``attn``: reduce/restore of the image queries (and of the keys/values, unless ``kv`` says otherwise);
* ``kv``: the image tokens the keys and values are projected from, and hooks on the projected keys and values
  (before the query/key RMS norm and RoPE, as diffusers orders them);
* ``mlp``: reduce/restore around the image feed-forward (dual) or the image rows of the MLP branch (single). In a
  single-stream block whose plan has the *same* ``Sublayer`` object for ``attn`` and ``mlp`` the whole parallel
  branch (attention, MLP and ``proj_out``) runs on the reduced rows and is restored once, after ``proj_out``;
* the denoiser's output (``proj_out``, the packed per-token noise) as tokens on the grid (:meth:`install_output`).

Rotary embeddings of reduced tokens. A reduced sequence gets its rotary tables from the plan:
``Sublayer.positions`` / ``KeyValue.positions`` map the image tokens' tables ``[B, N, 2*head_dim]`` (cos and sin
side by side) to the reduced tokens'. Selections (CAT's recomputed rows) take the selected tokens' rows; merges
(ToMe, CA-ToMe) take each merged token's *destination*'s rows (:meth:`tokred.merge.GridMerge.kept`), so a merged
token is rotated exactly as the destination it was averaged into, a phase the model was trained on, never an
average of phases. A plan that reduces tokens without saying where they stand is an error. Keys projected from the
queries' own tokens take the queries' tables; keys returned for every image token (CAT's cache) take every token's.
Unreduced calls (``FULL_BLOCK``) run diffusers' own ``FluxAttnProcessor``, bit-exactly; reduced ones run
:func:`flux_attention`, a copy of it that accepts per-sample rotary tables.

The image-token grid is read from ``img_ids`` (``FluxPipeline._prepare_latent_image_ids``: (0, row, col) in
row-major order); ids that are not such a grid (reference-image conditioning, offsets) leave the call unreduced.
On the meta device (shapes only, for FLOP counting) ids have no values: a square grid is assumed.
The timestep is counted on the 0-1000 scale (the pipeline passes ``t / 1000``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UnsupportedModelError
from ..reduction import FULL_BLOCK, BlockCall, BlockPlan, Grid, KeyValue, Planner, RowPlans, Sublayer, identity
from .base import Adapter, attach_denoiser_state, has_class_named, hook_prediction
from .diffusers_unet import _row

if TYPE_CHECKING:
    from ..patch import Patch

PROCESSORS = ("FluxAttnProcessor",)


class DiffusersFluxAdapter(Adapter):
    family = "diffusers_flux"
    description = "diffusers FluxTransformer2DModel (Flux.1-dev/schnell), alone or as a pipeline's .transformer"

    def __init__(self, container: Any, transformer: torch.nn.Module) -> None:
        super().__init__(container, transformer)
        modules = list(transformer.named_modules())
        self.dual_blocks = [(n, m) for n, m in modules if has_class_named(m, "FluxTransformerBlock")]
        self.single_blocks_list = [
            (n, m) for n, m in modules if has_class_named(m, "FluxSingleTransformerBlock")
        ]
        self.blocks = self.dual_blocks + self.single_blocks_list  # execution order: dual blocks, then single
        self.single_blocks = {n for n, _ in self.single_blocks_list}
        self._ids: torch.Tensor | None = None  # the img_ids the grid below was read from
        self._grid: Grid | None = None

    @classmethod
    def match(cls, obj: Any) -> DiffusersFluxAdapter | None:
        transformer = getattr(obj, "transformer", None) if not isinstance(obj, torch.nn.Module) else obj
        if transformer is not None and has_class_named(transformer, "FluxTransformer2DModel", "diffusers."):
            return cls(obj, transformer)
        return None

    def check(self) -> None:
        if not self.blocks:
            raise UnsupportedModelError("this FluxTransformer2DModel has no transformer block to reduce tokens in")
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        kinds = ((self.dual_blocks, FluxTransformerBlock), (self.single_blocks_list, FluxSingleTransformerBlock))
        for blocks, cls in kinds:
            for name, block in blocks:
                # dual_forward / single_forward reproduce diffusers' forwards; a subclass with its own would be replaced
                if type(block).forward is not cls.forward:
                    raise UnsupportedModelError(
                        f"block {name} is {type(block).__name__}, a {cls.__name__} with its own forward; tokred "
                        f"reproduces diffusers' {cls.__name__}.forward and cannot patch a different one"
                    )
        self.require_kv_hooks(None, "diffusers_flux")

    def require_kv_hooks(self, names: set[str] | None, method: str) -> None:
        """Refuse attention processors other than diffusers' default ``FluxAttnProcessor`` (IP-Adapter, custom ones)
        and fused projections: :func:`flux_attention` reproduces that processor with separate q/k/v projections."""
        for name, block in self.blocks:
            if names is not None and name not in names:
                continue
            processor = type(getattr(block.attn, "processor", None)).__name__
            if processor not in PROCESSORS or getattr(block.attn, "fused_projections", False):
                raise UnsupportedModelError(
                    f"{method}: {name}.attn uses {processor}; tokred needs diffusers' default FluxAttnProcessor "
                    "with separate to_q/to_k/to_v projections (undo fuse_qkv_projections / IP-Adapter / custom "
                    "processors first)"
                )

    def attach(self, patch: Patch) -> None:
        attach_denoiser_state(
            patch, self.container, self.root, sample=("hidden_states", 0), timestep=("timestep", 3),
            timestep_scale=1000.0,
        )
        state = patch.state

        def read_grid(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            ids = args[4] if len(args) > 4 else kwargs.get("img_ids")
            self._set_grid(ids)
            state.latent_size = None if self._grid is None else (self._grid.h, self._grid.w)

        patch.register_forward_pre_hook(self.root, read_grid, with_kwargs=True, outside_compile=True)

    def _set_grid(self, ids: torch.Tensor | None) -> None:
        """The image-token grid of ``img_ids`` [N, 3] (or [1, N, 3]), read once per ids tensor."""
        if ids is None:
            self._ids, self._grid = None, None
            return
        if ids is self._ids:
            return
        self._ids, self._grid = ids, None
        if ids.ndim == 3:
            ids = ids[0]
        if ids.ndim != 2 or ids.shape[-1] != 3 or ids.shape[0] == 0:
            return
        if ids.device.type == "meta":  # shapes only (FLOP counting): no values to read; a square grid is assumed
            side = math.isqrt(ids.shape[0])
            self._grid = Grid(side, side, 1) if side * side == ids.shape[0] else None
            return
        last = ids[-1].tolist()
        h, w = int(last[1]) + 1, int(last[2]) + 1
        if h * w != ids.shape[0]:
            return
        rows = torch.arange(h, device=ids.device).repeat_interleave(w)
        cols = torch.arange(w, device=ids.device).repeat(h)
        expected = torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(ids.dtype)
        if torch.equal(ids, expected):
            self._grid = Grid(h, w, 1)

    def grid(self, num_tokens: int) -> Grid | None:
        """The image-token grid of the current call, or None if ``num_tokens`` does not fill it."""
        grid = self._grid
        return grid if grid is not None and grid.tokens == num_tokens else None

    def install_blocks(self, patch: Patch, planner: Planner, names: set[str] | None = None) -> None:
        state, tokens = patch.state, patch.tokens
        for index, (name, block) in enumerate(self.blocks):
            if names is not None and name not in names:
                continue
            block_fn = single_forward if name in self.single_blocks else dual_forward

            def forward(blk: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, _name: str = name,
                        _index: int = index, _fn: Callable = block_fn,
                        **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
                if state.auxiliary:
                    plan = FULL_BLOCK
                else:
                    grid = self.grid(hidden_states.shape[1])
                    plan = planner(BlockCall(_name, _index, blk, 1, grid, state), hidden_states)
                if isinstance(plan, BlockPlan):
                    return _fn(blk, plan, hidden_states, *args, _count=(tokens, _name), **kwargs)
                return rows_forward(_fn, blk, plan, hidden_states, args, kwargs, (tokens, _name))

            patch.replace_forward(block, forward)

    def install_output(self, patch: Patch, fn: Callable[[torch.Tensor, Grid], torch.Tensor]) -> None:
        """``fn(tokens [B, N, C_out], grid)`` rewrites the per-token noise prediction (``proj_out``'s output)."""
        proj_out = getattr(self.root, "proj_out", None)
        if not isinstance(proj_out, torch.nn.Linear):
            raise UnsupportedModelError("this FluxTransformer2DModel has no proj_out Linear layer")
        hook_prediction(patch, proj_out, self.grid, fn)


def rows_forward(fn: Callable, block: torch.nn.Module, plans: RowPlans, hidden_states: torch.Tensor, args: tuple,
                 kwargs: dict, count: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """One plan per batch row (CA-ToMe's ``batch_independent``): each row through the block on its own, its
    per-sample arguments sliced alike (the rotary tables are shared by the batch)."""
    batch = hidden_states.shape[0]
    outs = []
    for i, plan in enumerate(plans.rows):
        row_args = [_row(a, i, batch) for a in args]
        row_kwargs = {k: _row(v, i, batch) for k, v in kwargs.items()}
        outs.append(fn(block, plan, hidden_states[i : i + 1], *row_args, _count=count, **row_kwargs))
    return torch.cat([o[0] for o in outs], dim=0), torch.cat([o[1] for o in outs], dim=0)


# --- rotary tables of reduced tokens ----------------------------------------------------------------------------


def image_tables(rotary: tuple[torch.Tensor, torch.Tensor], txt_len: int, batch: int) -> torch.Tensor:
    """The image tokens' rotary tables as one per-sample tensor [B, N, 2 * head_dim] (cos, then sin)."""
    cos, sin = rotary
    table = torch.cat([cos[txt_len:], sin[txt_len:]], dim=-1)
    return table[None].expand(batch, -1, -1)


def reduced_tables(sub: Sublayer, table: torch.Tensor, what: str) -> torch.Tensor:
    """The rotary tables of ``sub.reduce``'s output tokens (``sub.positions``)."""
    if sub.reduce is identity:
        return table
    if sub.positions is None:
        raise UnsupportedModelError(
            f"diffusers_flux: the method's plan reduces the image tokens of {what} but gives no Sublayer.positions, "
            "so the reduced tokens' rotary embeddings are unknown (see tokred.reduction.Sublayer)"
        )
    return sub.positions(table)


def key_tables(kv: KeyValue, q_table: torch.Tensor, full_table: torch.Tensor, num_keys: int) -> torch.Tensor:
    """The rotary tables of the image keys attention uses (see :class:`~tokred.reduction.KeyValue`)."""
    if kv.positions is not None:
        return kv.positions(full_table)
    if kv.keys is not None and num_keys == full_table.shape[1]:
        return full_table  # a keys hook that returns every image token keeps them in grid order (CAT's cache)
    if kv.tokens is None and kv.keys is None:
        return q_table
    raise UnsupportedModelError(
        "diffusers_flux: the method's plan changes the image keys but gives no KeyValue.positions, so their rotary "
        "embeddings are unknown (see tokred.reduction.KeyValue)"
    )


def split_tables(table: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return table[..., :head_dim], table[..., head_dim:]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers 0.42.1 ``apply_rotary_emb(x, (cos, sin), sequence_dim=1)`` (``use_real``, unbind dim -1) with
    per-sample tables: ``x`` [B, S, H, D], ``cos`` / ``sin`` [B, S, D]."""
    cos, sin = cos[:, :, None, :].to(x.device), sin[:, :, None, :].to(x.device)  # tokred: per-sample tables
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


# Adapted from diffusers 0.42.1 FluxAttnProcessor.__call__ (with _get_projections); changes marked "tokred:".
def flux_attention(
    attn: torch.nn.Module,
    img_q: torch.Tensor,
    img_kv: torch.Tensor,
    txt: torch.Tensor,
    dual: bool,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
    q_table: torch.Tensor | None,
    full_table: torch.Tensor | None,
    kv: KeyValue,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Attention of a dual-stream (``dual``: text projected with ``add_*_proj``) or single-stream block with the
    image queries from ``img_q`` and the image keys/values from ``img_kv`` (the same tensor when unchanged).
    Returns (text output, image output, number of image keys)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    txt_len = txt.shape[1]
    if dual:  # tokred: image and text projected apart (diffusers' _get_projections)
        query, key, value = attn.to_q(img_q), attn.to_k(img_kv), attn.to_v(img_kv)
    else:  # tokred: a single-stream block's text tokens are the first txt_len of its sequence
        query = attn.to_q(torch.cat([txt, img_q], dim=1))
        kv_in = torch.cat([txt, img_kv], dim=1)
        key, value = attn.to_k(kv_in), attn.to_v(kv_in)
    if kv.keys is not None:  # tokred: the keys/values point rewrites the projected image keys/values
        key = _image_rows(key, kv.keys, 0 if dual else txt_len)
    if kv.values is not None:
        value = _image_rows(value, kv.values, 0 if dual else txt_len)
    num_keys = key.shape[1] - (0 if dual else txt_len)

    query = query.unflatten(-1, (-1, attn.head_dim))
    key = key.unflatten(-1, (-1, attn.head_dim))
    value = value.unflatten(-1, (-1, attn.head_dim))

    query = attn.norm_q(query)
    key = attn.norm_k(key)

    if dual:
        encoder_query = attn.add_q_proj(txt).unflatten(-1, (-1, attn.head_dim))
        encoder_key = attn.add_k_proj(txt).unflatten(-1, (-1, attn.head_dim))
        encoder_value = attn.add_v_proj(txt).unflatten(-1, (-1, attn.head_dim))

        encoder_query = attn.norm_added_q(encoder_query)
        encoder_key = attn.norm_added_k(encoder_key)

        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)

    if rotary is not None:  # tokred: text tables, then the reduced image tokens' own
        head_dim = attn.head_dim
        batch = query.shape[0]
        txt_table = torch.cat([rotary[0][:txt_len], rotary[1][:txt_len]], dim=-1)[None].expand(batch, -1, -1)
        k_table = key_tables(kv, q_table, full_table, num_keys)
        query = rotate(query, *split_tables(torch.cat([txt_table, q_table], dim=1), head_dim))
        key = rotate(key, *split_tables(torch.cat([txt_table, k_table], dim=1), head_dim))

    processor = attn.processor
    hidden_states = dispatch_attention_fn(
        query,
        key,
        value,
        attn_mask=attention_mask,
        backend=processor._attention_backend,
        parallel_config=processor._parallel_config,
    )
    hidden_states = hidden_states.flatten(2, 3)
    hidden_states = hidden_states.to(query.dtype)

    encoder_hidden_states, hidden_states = hidden_states[:, :txt_len], hidden_states[:, txt_len:]
    if dual:
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
    return encoder_hidden_states, hidden_states, num_keys


def _image_rows(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], start: int) -> torch.Tensor:
    """``fn`` on the image rows ``x[:, start:]`` (a single-stream block's text rows come first)."""
    if start == 0:
        return fn(x)
    return torch.cat([x[:, :start], fn(x[:, start:])], dim=1)


def _attention_mask(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The attention mask of ``joint_attention_kwargs``; anything else is not reproduced under reduction."""
    other = sorted(k for k in kwargs if k != "attention_mask")
    if other:
        raise UnsupportedModelError(
            f"diffusers_flux: joint_attention_kwargs {other} are not supported while tokens are reduced (tokred "
            "reproduces the default FluxAttnProcessor, which takes attention_mask only)"
        )
    mask = kwargs.get("attention_mask")
    if mask is not None:
        raise UnsupportedModelError(
            "diffusers_flux: an attention_mask covers the unreduced sequence; it cannot be used while tokens are "
            "reduced"
        )
    return None


def _reduced_attention(block: torch.nn.Module, plan: BlockPlan, norm_img: torch.Tensor, txt: torch.Tensor,
                       dual: bool, rotary: Any, joint_attention_kwargs: dict
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The block's attention under ``plan`` (queries ``plan.attn``, keys/values ``plan.kv``): (text output, image
    output for the reduced queries, the reduced image tokens, image key count)."""
    mask = _attention_mask(joint_attention_kwargs)
    img_q = plan.attn.reduce(norm_img)
    img_kv = plan.kv.tokens(norm_img) if plan.kv.tokens is not None else img_q
    q_table = full_table = None
    if rotary is not None:
        full_table = image_tables(rotary, txt.shape[1], norm_img.shape[0])
        q_table = reduced_tables(plan.attn, full_table, "attention")
    txt_out, img_out, num_keys = flux_attention(
        block.attn, img_q, img_kv, txt, dual, rotary, q_table, full_table, plan.kv, mask
    )
    return txt_out, img_out, img_q, num_keys


# Copied from diffusers 0.42.1 FluxTransformerBlock.forward; changes marked "tokred:".
def dual_forward(
    block: torch.nn.Module,
    plan: BlockPlan,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
    _count: tuple[Any, str] | None = None,  # tokred: (TokenCounter, block name) to record the token counts in
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens = hidden_states.shape[1]  # tokred
    norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)

    norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
        encoder_hidden_states, emb=temb
    )
    joint_attention_kwargs = joint_attention_kwargs or {}

    # Attention.
    if plan.attn.is_identity and plan.kv.is_identity:  # tokred: unreduced: diffusers' own processor
        attention_outputs = block.attn(
            hidden_states=norm_hidden_states,
            encoder_hidden_states=norm_encoder_hidden_states,
            image_rotary_emb=image_rotary_emb,
            **joint_attention_kwargs,
        )
        attn_tokens = kv_tokens = num_tokens
    else:  # tokred: reduced image queries / keys / values, their rotary tables alike
        context_attn_output, attn_output, attn_input, kv_tokens = _reduced_attention(
            block, plan, norm_hidden_states, norm_encoder_hidden_states, True, image_rotary_emb, joint_attention_kwargs
        )
        attn_tokens = attn_input.shape[1]
        attention_outputs = (plan.attn.restore(attn_output), context_attn_output)

    if len(attention_outputs) == 2:
        attn_output, context_attn_output = attention_outputs
    elif len(attention_outputs) == 3:
        attn_output, context_attn_output, ip_attn_output = attention_outputs

    # Process attention outputs for the `hidden_states`.
    attn_output = gate_msa.unsqueeze(1) * attn_output
    hidden_states = hidden_states + attn_output

    norm_hidden_states = block.norm2(hidden_states)
    norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]

    mlp_input = plan.mlp.reduce(norm_hidden_states)  # tokred
    ff_output = plan.mlp.restore(block.ff(mlp_input))  # tokred
    ff_output = gate_mlp.unsqueeze(1) * ff_output

    hidden_states = hidden_states + ff_output
    if len(attention_outputs) == 3:
        hidden_states = hidden_states + ip_attn_output

    # Process attention outputs for the `encoder_hidden_states`.
    context_attn_output = c_gate_msa.unsqueeze(1) * context_attn_output
    encoder_hidden_states = encoder_hidden_states + context_attn_output

    norm_encoder_hidden_states = block.norm2_context(encoder_hidden_states)
    norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]

    context_ff_output = block.ff_context(norm_encoder_hidden_states)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)

    if _count is not None:  # tokred
        _count[0].record(_count[1], num_tokens, attn_tokens, kv_tokens, mlp_input.shape[1], None)
    return encoder_hidden_states, hidden_states


# Copied from diffusers 0.42.1 FluxSingleTransformerBlock.forward; changes marked "tokred:".
def single_forward(
    block: torch.nn.Module,
    plan: BlockPlan,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
    _count: tuple[Any, str] | None = None,  # tokred: (TokenCounter, block name) to record the token counts in
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens = hidden_states.shape[1]  # tokred
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

    residual = hidden_states
    norm_hidden_states, gate = block.norm(hidden_states, emb=temb)
    joint_attention_kwargs = joint_attention_kwargs or {}
    if plan.is_full:  # tokred: unreduced: diffusers' own computation
        mlp_hidden_states = block.act_mlp(block.proj_mlp(norm_hidden_states))
        attn_output = block.attn(
            hidden_states=norm_hidden_states,
            image_rotary_emb=image_rotary_emb,
            **joint_attention_kwargs,
        )
        hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
        hidden_states = block.proj_out(hidden_states)
        attn_tokens = kv_tokens = mlp_tokens = num_tokens
    else:  # tokred: the image rows reduced per plan; the text rows (the first text_seq_len) always whole
        norm_txt, norm_img = norm_hidden_states[:, :text_seq_len], norm_hidden_states[:, text_seq_len:]
        txt_out, img_out, attn_input, kv_tokens = _reduced_attention(
            block, plan, norm_img, norm_txt, False, image_rotary_emb, joint_attention_kwargs
        )
        attn_tokens = attn_input.shape[1]
        if plan.mlp is plan.attn:  # tokred: one reduction for the whole branch, restored after proj_out
            mlp_in = torch.cat([norm_txt, attn_input], dim=1)
            mlp_hidden_states = block.act_mlp(block.proj_mlp(mlp_in))
            out = block.proj_out(torch.cat([torch.cat([txt_out, img_out], dim=1), mlp_hidden_states], dim=2))
            hidden_states = torch.cat([out[:, :text_seq_len], plan.attn.restore(out[:, text_seq_len:])], dim=1)
            mlp_tokens = attn_tokens
        else:
            attn_output = torch.cat([txt_out, plan.attn.restore(img_out)], dim=1)
            mlp_img = plan.mlp.reduce(norm_img)
            mlp_hidden_states = block.act_mlp(block.proj_mlp(torch.cat([norm_txt, mlp_img], dim=1)))
            mlp_hidden_states = torch.cat(
                [mlp_hidden_states[:, :text_seq_len], plan.mlp.restore(mlp_hidden_states[:, text_seq_len:])], dim=1
            )
            hidden_states = block.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))
            mlp_tokens = mlp_img.shape[1]
    gate = gate.unsqueeze(1)
    hidden_states = gate * hidden_states  # tokred: proj_out applied above
    hidden_states = residual + hidden_states
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)

    encoder_hidden_states, hidden_states = hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    if _count is not None:  # tokred
        _count[0].record(_count[1], num_tokens, attn_tokens, kv_tokens, mlp_tokens, None)
    return encoder_hidden_states, hidden_states
