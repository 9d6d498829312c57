"""CAT pruning: Cluster-Aware Token pruning for text-to-image diffusion (Cheng, Chen, Jia; arXiv 2502.00433).

After ``t0`` full denoising steps, each step recomputes only a fraction ``alpha`` of the image tokens; every
other token takes its sublayer outputs, and its noise prediction, from a cache of earlier steps. Which tokens
are recomputed is decided from the model's own noise prediction ``n_t``:

1. **Reference.** The per-token noise prediction of call ``t0 - 1`` is kept as the reference ``n_t0``.
2. **Clustering, once** (call ``t0``). k-means with ``num_clusters`` clusters and seed ``kmeans_seed`` runs on
   ``0.05 * n_t + position`` per token (the position code holds row / h in the first half of the channels and
   column / w in the second), so clusters are spatially compact regions with similar noise.
3. **Noise relative magnitude.** Each step the change ``n_t - n_t0`` is max-pooled per cluster (channel-wise),
   and each token's own ``||n_t - n_t0||`` ranks it inside its cluster.
4. **Selection with distributional balance** (budget ``int(alpha * N)`` tokens for the next call). The first
   selection (call ``t0``) smooths the pooled change over neighbouring clusters on the token grid
   (``2 * mean + max`` over a cluster and the clusters it touches), then takes ``budget // 10`` most-changed
   tokens per cluster, best clusters first. Later selections take a quarter of the budget from the clusters
   with the largest (unsmoothed) change, with per-cluster quotas ``3q, 2q, q, q, ...`` (``q = int(budget // 5
   * 0.25)``) of most-changed tokens plus ``quota // 2`` stalest tokens in every cluster after the first;
   the other three quarters are the globally stalest tokens. Staleness is a decaying selection count
   ``f_t = 0.5 * f_(t-1) + [computed at t]``: the least recently computed tokens have the lowest count.
5. **Sparse compute** (calls after ``t0``). Queries, keys and values are projected for the selected tokens
   only; self-attention attends from them to *all* tokens, whose keys and values come from a cache in which
   the selected rows are overwritten. The feed-forward runs on the selected tokens only. Each sublayer's output
   (before its gate/residual) is cached per token; unselected tokens read it from the cache, so the residual
   stream of every token is still updated. At the output, unselected tokens get their previous noise
   prediction back. The selection for the next call is made from this call's noise prediction.

Options (paper symbols)
    ``t0`` (default 8; the official example: 8 of N=28 steps) the number of denoiser *calls* computed in full
    before pruning starts; ``alpha`` (default 0.3, the official ``select_factor``) the fraction of image tokens
    recomputed per pruned call; ``num_clusters`` (20) and ``kmeans_seed`` (0) the k-means of step 2. For the
    U-Net also ``max_downsample`` (below). ``alpha=1`` recomputes every token and is bit-identical to the
    unpatched model (the whole sparse path still runs). The paper reports a 50% compute reduction at 28 steps
    and 60% at 50 steps on SD3 with the defaults.

Where the paper and the official code differ (we follow the code)
    The paper's text was not available to us offline; these differences are against its overview figure and
    notation table. (a) The reference ``n_t0`` is the output of call ``t0 - 1`` (the code's counter 6 with stop
    index 5, i.e. ``t0 = 8``), and clustering plus the first selection happen on call ``t0``, the last full one.
    (b) The figure shows clustering, pooling and top-k at every step; the code clusters once, smooths over
    neighbouring clusters only at the first selection and uses the plain per-cluster maximum afterwards. (c) The
    code's quotas, the quarter/three-quarter split, the ``0.05`` feature weight, the 0.5 count decay and the count
    restart (while no cluster has been selected twice) do not appear in the figure or notation; we keep them as
    constants (:mod:`~tokred.methods.cat_pruning_select`). Beyond the paper *and* the code: (d) the selected set
    always has exactly ``int(alpha * N)`` tokens - the official eager code loses tokens where the cluster and stale
    parts overlap; we top it up with the next stalest tokens, as its ``torch.compile`` variant does; (e) ties in
    staleness are broken by larger change, then by index (the code leaves them to ``topk``); (f) k-means is our own
    batched torch implementation of scikit-learn's single run (greedy k-means++, Lloyd, same tolerance) instead of
    a scikit-learn call on the host; (g) positions come from the actual token grid, not a hard-coded 64 x 64.

Batches
    The official code takes the selection from batch item 1 (the conditional half of one CFG pair) and applies
    it to the whole batch, which is right only for batch 2. We select **per sample**: every sample (each prompt
    and each CFG half) has its own clusters, reference, counts and selection, all of the same size
    ``int(alpha * N)``, so gathers and scatters stay rectangular and any batch size works. No sample's
    selection or cache depends on another sample; the two halves of a CFG pair may recompute different tokens.

State
    Everything (reference, clusters, counts, selections, per-block caches) lives in ``patch.state.scratch`` and
    is dropped at every generation start; a call whose batch or token count differs from the cached one turns
    pruning off until the next generation. Inference only (the caches are updated in place).

SD3 / MMDiT (``diffusers_mmdit``)
    Faithful to the official SD3 code: in every ``JointTransformerBlock`` the image stream is pruned (joint
    attention with queries from the selected image tokens plus all text tokens, keys and values of all image
    tokens from the cache; the feed-forward on selected tokens; SD3.5's extra image self-attention ``attn2``
    the same way) while the text stream is computed in full. The noise prediction is the per-patch output of
    ``proj_out``. Requires diffusers' default ``JointAttnProcessor2_0``.

SD 1.x U-Net (``diffusers_unet``): our adaptation
    * Token map. The U-Net's noise output (64 x 64 x 4 at 512 px) has one position per token of the top-level
      transformer blocks (no downsampling: 2 down + 3 up blocks), so the selection is made on the output
      grid and maps one-to-one onto those blocks.
    * Sparse compute in the transformer blocks: self-attention queries, keys and values for the selected
      tokens with the other keys/values from the cache; cross-attention for the selected queries only (the 77
      text keys are recomputed, they are cheap); the feed-forward for the selected tokens. Convolutions,
      resampling, group norms and the transformers' proj_in/proj_out stay dense: a selected token's 3x3
      convolutions read its unselected neighbours and group norms read every token, so they have no
      per-token shortcut, and they are the part of the U-Net that does not grow with the token count squared.
    * Lower levels: ``max_downsample=1`` (default) runs the blocks at 32x32, 16x16 and 8x8 (at 512 px) dense:
      a coarse token mixes ``d x d`` output positions, so the noise change no longer identifies it, and
      recomputing every coarse token that covers a selected position would keep most of them (3/4 of the 2x2
      windows at ``alpha=0.3`` when the selection is spread out).
      ``max_downsample`` 2/4/8 extends pruning down to that downsampling with a pooled index map: the
      ``int(alpha * N_level)`` coarse tokens whose window holds the largest share of selected fine tokens
      (ties: the largest change) are recomputed. This saves more compute (the lower levels hold most of the
      U-Net's transformer FLOPs at 32x32 latents) at a quality risk the paper does not measure.
    * Steps: ``t0`` counts U-Net calls, as the official code's counter does. With 50-step DDIM (50 calls) the
      default ``t0=8`` computes calls 1-8 in full and prunes calls 9-50.
      PLMS (PNDM with ``skip_prk_steps``) makes 51 calls for 50 steps because its first timestep is evaluated
      twice; calls 1-8 (timesteps 1-7) are then full and 9-51 pruned. With CFG the pipeline's batch of 2 per
      prompt is one call.
    * Requires the blocks' self-attention to use diffusers' default ``AttnProcessor2_0`` without group or
      spatial norm (SD 1.x/2.x).
    * Measured (``benchmarks/test_cat_pruning.py``: SD1.5's U-Net, batch 2, ``alpha=0.3``): a pruned call
      costs 0.90 (32x32 latents) and 0.84 (64x64) of a full call's FLOPs with ``max_downsample=1``, 0.74 and
      0.69 with ``max_downsample=8``; over 50 steps with ``t0=8`` that is 13.5% (26%) fewer FLOPs at 512 px.
      The paper's 50-60% is for SD3, whose compute is all in token-wise transformer blocks; in the U-Net the
      convolutions stay dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tokred import Method, register_method
from tokred.adapters.diffusers_mmdit import DiffusersMMDiTAdapter
from tokred.adapters.diffusers_unet import FULL_BLOCK, BlockPlan, DiffusersUNetAdapter, SublayerPlan
from tokred.errors import UnsupportedModelError
from tokred.merge import identity
from tokred.options import int_at_least, is_number, one_of, option

from .cat_pruning_select import (
    cluster_adjacency,
    cluster_max,
    cluster_scores,
    clustering_features,
    kmeans,
    level_selection,
    select_tokens,
    update_counts,
)

SCRATCH_KEY = "cat_pruning"


# --- options -----------------------------------------------------------------------------------------------
@dataclass
class CatOptions:
    t0: int = option(
        8,
        valid="int >= 2",
        check=int_at_least(2),
        doc="denoiser calls computed in full before pruning (paper t0; the official example uses 8 of 28). The "
        "reference n_t0 is call t0-1's noise, clustering runs on call t0, pruning from call t0+1. Recommended: 8 "
        "(paper, 28 and 50 steps) up to about a third of the steps for more fidelity.",
    )
    alpha: float = option(
        0.3,
        valid="0 < alpha <= 1",
        check=lambda v: is_number(v) and 0 < v <= 1,
        doc="fraction of image tokens recomputed per pruned call (paper alpha, official select_factor; 0.3 in "
        "the paper). 1.0 recomputes all (identical to the unpatched model). 0.3-0.5 recommended.",
    )
    num_clusters: int = option(
        20, valid="int >= 1", check=int_at_least(1), doc="k-means clusters (official 20); capped at the tokens"
    )
    kmeans_seed: int = option(0, valid="int >= 0", check=int_at_least(0), doc="k-means seed (official 0)")


@dataclass
class CatUNetOptions(CatOptions):
    max_downsample: int = option(
        1,
        valid="1, 2, 4 or 8",
        check=one_of(1, 2, 4, 8),
        doc="prune transformer blocks with at most this downsampling; 1 = only the top level, whose tokens "
        "map one-to-one onto the noise output (recommended); 2-8 add lower levels with a pooled index map",
    )


# --- per-generation state ------------------------------------------------------------------------------------
class _Generation:
    """What CAT remembers during one generation (lives in ``patch.state.scratch``)."""

    def __init__(self) -> None:
        self.shape: tuple[int, int, int] | None = None  # (B, N, D) of the noise tokens
        self.disabled = False
        self.ref: torch.Tensor | None = None  # n_t0 [B, N, D] float32
        self.labels: torch.Tensor | None = None  # [B, N]
        self.counts: torch.Tensor | None = None  # [B, N] decayed selection counts
        self.hits: torch.Tensor | None = None  # [B, K] selections each cluster appeared in
        self.prev: torch.Tensor | None = None  # last returned noise tokens [B, N, D]
        self.change: torch.Tensor | None = None  # ||n_t - n_t0|| [B, N] behind the current selection
        self.sel: torch.Tensor | None = None  # [B, M] tokens to compute at call sel_step
        self.sel_step = -1
        self.blocks: dict[Any, dict[str, Any]] = {}  # block module -> cached activations


def _rows(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Rows ``sel`` [B, M] of ``x`` [B, N, C]."""
    return x.gather(1, sel[..., None].expand(-1, -1, x.shape[-1]))


def _put_rows(dst: torch.Tensor, sel: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Overwrite rows ``sel`` of ``dst`` [B, N, C] with ``src`` [B, M, C] in place; returns ``dst``."""
    return dst.scatter_(1, sel[..., None].expand(-1, -1, dst.shape[-1]), src.to(dst.dtype))


def _merge(cache: dict, key: str, out: torch.Tensor, sel: torch.Tensor | None, record: bool) -> torch.Tensor:
    """A sublayer's output for all tokens: fresh rows merged into the cache (pruned) or recorded (full)."""
    if sel is not None:
        return _put_rows(cache[key], sel, out)
    if record:
        cache[key] = out
    return out


def _heads_qkv(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of ``x`` [B, N, C] split into heads [B, H, N, d], with diffusers' q/k norms."""
    B = x.shape[0]
    query, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    head_dim = k.shape[-1] // attn.heads
    query = query.view(B, -1, attn.heads, head_dim).transpose(1, 2)
    k = k.view(B, -1, attn.heads, head_dim).transpose(1, 2)
    v = v.view(B, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return query, k, v


def _merge_kv(
    cache: dict, key: str, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor | None, record: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values [B, H, n, d] for all tokens: selected rows written into the cache, or the cache recorded."""
    if sel is not None:
        ck, cv = cache[key + ".k"], cache[key + ".v"]
        index = sel[:, None, :, None].expand(-1, ck.shape[1], -1, ck.shape[-1])
        return ck.scatter_(2, index, k.to(ck.dtype)), cv.scatter_(2, index, v.to(cv.dtype))
    if record:
        cache[key + ".k"], cache[key + ".v"] = k, v
    return k, v


class CatController:
    """Step logic shared by both model families: the reference, clustering, selection and output cache."""

    def __init__(self, options: CatOptions, state: Any) -> None:
        self.t0 = options.t0
        self.alpha = options.alpha
        self.num_clusters = options.num_clusters
        self.seed = options.kmeans_seed
        self.state = state

    def generation(self) -> _Generation:
        g = self.state.scratch.get(SCRATCH_KEY)
        if g is None:
            g = self.state.scratch[SCRATCH_KEY] = _Generation()
        return g

    def budget(self, n: int) -> int:
        return max(1, int(self.alpha * n))

    def recording(self) -> bool:
        """Whether full calls keep their activations (from call t0 on: the next call may be pruned)."""
        return self.state.step >= self.t0

    def selection(self, batch: int, n: int) -> torch.Tensor | None:
        """The tokens [B, M] to compute in this call on the noise grid of ``n`` tokens; None = compute all."""
        g = self.generation()
        if g.disabled or g.sel is None or g.sel_step != self.state.step or g.shape is None:
            return None
        if g.shape[0] != batch or g.shape[1] != n:
            return None
        return g.sel

    def block_cache(self, block: Any) -> dict[str, Any]:
        return self.generation().blocks.setdefault(block, {})

    def on_output(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Take the noise prediction tokens [B, h*w, D] of this call; return them with cached values for the
        tokens this call did not compute, after choosing the tokens of the next call."""
        g = self.generation()
        step = self.state.step
        if g.disabled or step < self.t0 - 1:
            return tokens
        with torch.no_grad():
            B, N, D = tokens.shape
            if g.shape is not None and g.shape != (B, N, D):
                # A different batch or resolution inside one generation: stop pruning until the next one.
                self.state.scratch[SCRATCH_KEY] = g = _Generation()
                g.disabled = True
                return tokens
            if step == self.t0 - 1 or g.ref is None:
                if step == self.t0 - 1:
                    g.shape, g.ref = (B, N, D), tokens.detach().float().clone()
                return tokens

            computed = g.sel if g.sel_step == step else None
            mask = None
            if computed is not None:
                mask = torch.zeros(B, N, dtype=torch.bool, device=tokens.device).scatter_(1, computed, True)
            change = tokens.float() - g.ref
            k = min(self.num_clusters, N)
            if g.labels is None:  # call t0: cluster once, first selection from the smoothed cluster change
                g.labels = kmeans(clustering_features(tokens, h, w), k, seed=self.seed)
                scores = cluster_scores(cluster_max(change, g.labels, k), cluster_adjacency(g.labels, h, w, k))
                g.counts = torch.zeros(B, N, device=tokens.device)
                g.hits = torch.zeros(B, k, device=tokens.device)
                first = True
            elif mask is not None:
                g.counts = update_counts(g.counts, mask, g.hits)
                scores = cluster_scores(cluster_max(change, g.labels, k))
                first = False
            else:  # a full call after t0 (should not happen): nothing to choose from any more
                return tokens

            change_norm = change.norm(dim=-1)
            sel = select_tokens(change_norm, g.labels, scores, g.counts, self.budget(N), first)
            g.hits += torch.zeros_like(g.hits).scatter_(1, g.labels.gather(1, sel), 1.0)
            g.sel, g.sel_step, g.change = sel, step + 1, change_norm

            out = tokens
            if mask is not None and computed.shape[1] < N:
                out = torch.where(mask[..., None], tokens, g.prev.to(tokens.dtype))
            g.prev = out.detach().clone()
            return out


# --- SD3 / MMDiT -----------------------------------------------------------------------------------------------
def _feed_forward(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    chunk = getattr(block, "_chunk_size", None)
    if chunk is not None and x.shape[block._chunk_dim] % chunk == 0:
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(block.ff, x, block._chunk_dim, chunk)
    return block.ff(x)


def _joint_attention(
    attn: torch.nn.Module,
    x: torch.Tensor,
    context: torch.Tensor | None,
    sel: torch.Tensor | None,
    cache: dict,
    key: str,
    record: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """diffusers' ``JointAttnProcessor2_0`` with the image keys/values merged with the cache.

    ``x`` holds the (normed) selected image tokens when ``sel`` is given, all of them otherwise; queries come
    from ``x`` (and the text tokens), keys and values from every image token (and the text tokens).
    """
    B = x.shape[0]
    query, k, v = _heads_qkv(attn, x)
    head_dim = k.shape[-1]
    k, v = _merge_kv(cache, key, k, v, sel, record)

    if context is not None:
        cq = attn.add_q_proj(context).view(B, -1, attn.heads, head_dim).transpose(1, 2)
        ck = attn.add_k_proj(context).view(B, -1, attn.heads, head_dim).transpose(1, 2)
        cv = attn.add_v_proj(context).view(B, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        query, k, v = torch.cat([query, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)

    out = F.scaled_dot_product_attention(query, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(B, -1, attn.heads * head_dim).to(query.dtype)
    context_out = None
    if context is not None:
        n = x.shape[1]
        out, context_out = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    return out, context_out


def _mmdit_block_forward(ctrl: CatController):
    """diffusers ``JointTransformerBlock.forward`` with CAT's pruned image stream (exact when nothing is pruned)."""

    def forward(
        block: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        B, N, _ = hidden_states.shape
        cache = ctrl.block_cache(block)
        sel = ctrl.selection(B, N)
        if sel is not None and cache.get("shape") != (B, N):
            sel = None  # this block has nothing cached yet: compute it in full and record
        record = sel is None and ctrl.recording()
        if record:
            cache.clear()
            cache["shape"] = (B, N)

        x = hidden_states if sel is None else _rows(hidden_states, sel)
        if block.use_dual_attention:
            norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_x2, gate_msa2 = block.norm1(x, emb=temb)
        else:
            norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
        if block.context_pre_only:
            norm_context = block.norm1_context(encoder_hidden_states, temb)
        else:
            norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
                encoder_hidden_states, emb=temb
            )

        attn_output, context_attn_output = _joint_attention(
            block.attn, norm_x, norm_context, sel, cache, "attn", record
        )
        attn_output = _merge(cache, "attn.out", attn_output, sel, record)
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output

        if block.use_dual_attention:
            attn_output2, _ = _joint_attention(block.attn2, norm_x2, None, sel, cache, "attn2", record)
            attn_output2 = _merge(cache, "attn2.out", attn_output2, sel, record)
            hidden_states = hidden_states + gate_msa2.unsqueeze(1) * attn_output2

        x = hidden_states if sel is None else _rows(hidden_states, sel)
        norm_x = block.norm2(x)
        norm_x = norm_x * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff_output = _merge(cache, "ff.out", _feed_forward(block, norm_x), sel, record)
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output

        if block.context_pre_only:
            encoder_hidden_states = None
        else:
            context_attn_output = c_gate_msa.unsqueeze(1) * context_attn_output
            encoder_hidden_states = encoder_hidden_states + context_attn_output
            norm_context = block.norm2_context(encoder_hidden_states)
            norm_context = norm_context * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            if block._chunk_size is not None:
                from diffusers.models.attention import _chunked_feed_forward

                context_ff_output = _chunked_feed_forward(
                    block.ff_context, norm_context, block._chunk_dim, block._chunk_size
                )
            else:
                context_ff_output = block.ff_context(norm_context)
            encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        return encoder_hidden_states, hidden_states

    return forward


# --- SD U-Net ------------------------------------------------------------------------------------------------------
def _unet_self_attention(
    attn: torch.nn.Module,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    sel: torch.Tensor | None,
    cache: dict,
    record: bool,
) -> torch.Tensor:
    """diffusers' ``AttnProcessor2_0`` for a 3-D self-attention input, keys/values merged with the cache."""
    residual = x
    B, n, _ = x.shape
    query, k, v = _heads_qkv(attn, x)
    head_dim = k.shape[-1]
    k, v = _merge_kv(cache, "attn1", k, v, sel, record)
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, k.shape[2] if sel is not None else n, B)
        attention_mask = attention_mask.view(B, attn.heads, -1, attention_mask.shape[-1])
        if sel is not None and attention_mask.shape[2] > 1:  # a mask per query: keep the selected queries' rows
            index = sel[:, None, :, None].expand(-1, attention_mask.shape[1], -1, attention_mask.shape[-1])
            attention_mask = attention_mask.gather(2, index)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(B, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


# --- the method ------------------------------------------------------------------------------------------------------
@register_method("cat_pruning")
class CatPruning(Method):
    summary = "CAT pruning: cluster-aware token pruning with cached outputs for diffusion (arXiv 2502.00433)"
    options = {"diffusers_mmdit": CatOptions, "diffusers_unet": CatUNetOptions}
    presets = {
        "diffusers_mmdit": {"paper": {"t0": 8, "alpha": 0.3}, "alpha0.5": {"t0": 8, "alpha": 0.5}},
        "diffusers_unet": {
            "alpha0.3": {"t0": 8, "alpha": 0.3},
            "alpha0.5": {"t0": 8, "alpha": 0.5},
        },
    }

    def check(self, adapter) -> None:
        if isinstance(adapter, DiffusersMMDiTAdapter):
            for name, block in adapter.blocks:
                attns = [("attn", block.attn)] + ([("attn2", block.attn2)] if block.use_dual_attention else [])
                for sub, attn in attns:
                    processor = type(getattr(attn, "processor", None)).__name__
                    if processor != "JointAttnProcessor2_0":
                        raise UnsupportedModelError(
                            f"cat_pruning: {name}.{sub} uses {processor}; it needs diffusers' default "
                            "JointAttnProcessor2_0 (undo fuse_qkv_projections / custom processors first)"
                        )
            if not isinstance(getattr(adapter.root, "proj_out", None), torch.nn.Linear):
                raise UnsupportedModelError("cat_pruning: the transformer has no proj_out Linear layer")
        elif isinstance(adapter, DiffusersUNetAdapter):
            for name, block in adapter.blocks:
                attn = block.attn1
                processor = type(getattr(attn, "processor", None)).__name__
                if processor != "AttnProcessor2_0" or attn.group_norm is not None or attn.spatial_norm is not None:
                    raise UnsupportedModelError(
                        f"cat_pruning: {name}.attn1 uses {processor} (group_norm={attn.group_norm is not None}, "
                        f"spatial_norm={attn.spatial_norm is not None}); it needs diffusers' default "
                        "AttnProcessor2_0 without group or spatial norm"
                    )
            if not isinstance(getattr(adapter.root, "conv_out", None), torch.nn.Module):
                raise UnsupportedModelError("cat_pruning: the U-Net has no conv_out layer")

    def install(self, patch) -> None:
        ctrl = CatController(self.options, patch.state)
        if isinstance(patch.adapter, DiffusersMMDiTAdapter):
            self._install_mmdit(patch, ctrl)
        else:
            self._install_unet(patch, ctrl)

    def _install_mmdit(self, patch, ctrl: CatController) -> None:
        adapter: DiffusersMMDiTAdapter = patch.adapter
        state = patch.state
        forward = _mmdit_block_forward(ctrl)
        for _, block in adapter.blocks:
            patch.replace_forward(block, forward)

        def proj_out_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            out = type(module).forward(module, x)
            if state.latent_size is None or out.ndim != 3:
                return out
            h, w = adapter.grid(state.latent_size)
            if h * w != out.shape[1]:
                return out
            return ctrl.on_output(out, h, w)

        patch.replace_forward(adapter.root.proj_out, proj_out_forward)

    def _install_unet(self, patch, ctrl: CatController) -> None:
        adapter: DiffusersUNetAdapter = patch.adapter
        state = patch.state
        max_downsample = self.options.max_downsample
        modes: dict[Any, tuple[torch.Tensor | None, dict, bool]] = {}  # block -> attn1 mode for this call

        def level_sel(batch: int, h: int, w: int, factor: int) -> torch.Tensor | None:
            lh, lw = state.latent_size
            top = ctrl.selection(batch, lh * lw)
            if top is None or factor == 1:
                return top
            if -(-lh // factor) * -(-lw // factor) != h * w:  # the pooled map must be this level's grid
                return None
            levels = state.call.setdefault("cat_levels", {})
            if factor not in levels:
                mask = torch.zeros(batch, lh * lw, dtype=torch.bool, device=top.device).scatter_(1, top, True)
                levels[factor] = level_selection(mask, ctrl.generation().change, lh, lw, factor, ctrl.budget(h * w))
            return levels[factor]

        def planner(block: torch.nn.Module, x: torch.Tensor) -> BlockPlan:
            modes.pop(block, None)
            B, n, _ = x.shape
            grid = adapter.grid(state.latent_size, n) if state.latent_size is not None else None
            if grid is None or grid[2] > max_downsample:
                return FULL_BLOCK
            h, w, factor = grid
            cache = ctrl.block_cache(block)
            sel = level_sel(B, h, w, factor)
            if sel is not None and cache.get("shape") != (B, n):
                sel = None
            if sel is None:
                if not ctrl.recording():
                    return FULL_BLOCK
                cache.clear()
                cache["shape"] = (B, n)
                modes[block] = (None, cache, True)

                def record(key: str) -> SublayerPlan:
                    return SublayerPlan(identity, lambda out: _merge(cache, key, out, None, True))

                return BlockPlan(attn=record("attn1.out"), cross=record("attn2.out"), mlp=record("ff.out"))

            modes[block] = (sel, cache, False)

            def gather(t: torch.Tensor) -> torch.Tensor:
                return _rows(t, sel)

            def merge(key: str) -> SublayerPlan:
                return SublayerPlan(gather, lambda out: _put_rows(cache[key], sel, out))

            return BlockPlan(attn=merge("attn1.out"), cross=merge("attn2.out"), mlp=merge("ff.out"))

        adapter.install_planned_blocks(patch, planner)

        for _, block in adapter.blocks:

            def attn1_forward(
                attn: torch.nn.Module,
                hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                _block: torch.nn.Module = block,
                **kwargs: Any,
            ) -> torch.Tensor:
                mode = modes.pop(_block, None)
                if mode is None or encoder_hidden_states is not None or hidden_states.ndim != 3:
                    return type(attn).forward(
                        attn,
                        hidden_states,
                        encoder_hidden_states=encoder_hidden_states,
                        attention_mask=attention_mask,
                        **kwargs,
                    )
                sel, cache, record = mode
                return _unet_self_attention(attn, hidden_states, attention_mask, sel, cache, record)

            patch.replace_forward(block.attn1, attn1_forward)

        def conv_out_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            out = type(module).forward(module, x)
            if out.ndim != 4:
                return out
            B, C, H, W = out.shape
            tokens = out.flatten(2).transpose(1, 2)
            new = ctrl.on_output(tokens, H, W)
            if new is tokens:
                return out
            return new.transpose(1, 2).reshape(B, C, H, W)

        patch.replace_forward(adapter.root.conv_out, conv_out_forward)
