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
    Everything (reference, clusters, counts, selections, per-block caches) lives in the typed
    :class:`CatState` (``patch.method_state``) and is dropped at every generation start; a call whose batch or
    token count differs from the cached one turns pruning off until the next generation. A generation of at
    most ``t0`` denoiser calls (4- or 8-step schedules, img2img at low strength, a short hand-written loop)
    prunes nothing: a :class:`CatNoPruningWarning` says so, naming ``t0``, once per generation: at its first
    call when the pipeline's scheduler reports the number of calls, else when it ends (the next generation
    starts, or the patch is removed). ``t0`` does not scale with the number of steps by itself (set it, e.g.
    to a third of the steps). Calls the adapter marks auxiliary (SD3.5 skip-layer guidance's second pass) run
    unreduced and do not count.

torch.compile
    ``torch.compile(denoiser, fullgraph=True)`` compiles the whole forward as one graph, with one compilation per
    phase of the schedule, never per step (3 over a generation with ``t0=2``: the reference call, the clustering
    call, the pruned calls; up to 4 with larger ``t0``, whose first calls do nothing). Everything that reads the
    step or makes a data-dependent choice runs in the denoiser's own hooks, which ``torch.compile(module)`` runs
    outside the compiled frame (``torch.compiler.disable``, ``Patch.register_forward_pre_hook`` /
    ``register_forward_hook(..., outside_compile=True)``): before the call the schedule decides what this call does
    (the tokens it computes, whether full blocks record, what the output hook does) and makes the block caches;
    after the call k-means (scikit-learn's data-dependent iterations, its own CPU generator, unchanged) and the
    selection for the next call run on the noise prediction the forward kept. The compiled forward reads only
    those decisions and the state's tensors (the selection, the row caches, the reference, the previous output):
    sparse compute, cache updates, the output replacement. Eager runs the same code in the same order, so its
    outputs are unchanged. In compiled calls the cached keys/values are rewritten by output hooks on ``to_k`` /
    ``to_v`` registered once at ``apply`` (:func:`~tokred.reduction.install_projected_kv_routing`), not per call.
    Compiling a module *around* the denoiser inlines the denoiser's hooks: graph breaks there, as for every
    diffusion method.

Gradients
    Without gradients (``torch.no_grad()``, ``torch.inference_mode()``, pipelines) the caches are updated in
    place. Under autograd (gradients enabled and a parameter or input requiring them) a pruned call's output
    carries gradients through the tokens it recomputed; the tokens taken from the cache are constants (their
    values come from earlier calls, whose graphs are not kept), so the gradient is that of this call's
    computation with the cache held fixed, a truncated gradient. The caches then keep detached copies.

SD3 / MMDiT (``diffusers_mmdit``)
    Faithful to the official SD3 code: in every ``JointTransformerBlock`` the image stream is pruned (joint
    attention with queries from the selected image tokens plus all text tokens, keys and values of all image
    tokens from the cache; the feed-forward on selected tokens; SD3.5's extra image self-attention ``attn2``
    the same way) while the text stream is computed in full. The noise prediction is the per-patch output of
    ``proj_out``. Requires diffusers' default ``JointAttnProcessor2_0`` (the adapter's key/value point).

PixArt-Σ / PixArt-α / DiT-XL/2 (``diffusers_dit``)
    PixArt-Σ is the paper's second model; the official code covers SD3 only, so this applies its SD3 scheme to
    PixArt's ``BasicTransformerBlock``s: in every block self-attention runs with queries, keys and values of
    the selected image tokens only, the other tokens' keys and values from the cache; cross-attention to the
    T5 text for the selected image queries only (the text keys/values are recomputed, they are cheap: 300
    tokens); the feed-forward on the selected tokens; unselected tokens take each sublayer's cached output
    (before the ``ada_norm_single`` gates, which are per-sample, not per-token, and applied fresh). The noise
    prediction is ``proj_out``'s per-patch output (DiT: ``proj_out_2``), ``patch_size**2 * out_channels`` values
    per token: with learned sigma (PixArt, DiT) that is the noise and the variance, both read by the selection
    and both reused for unselected tokens. DiT-XL/2 (class-conditional, no cross-attention) takes the same path;
    the paper does not evaluate it. The paper reports a 50% (28 steps) to 60% (50 steps) MACs reduction on
    PixArt-Σ; ``benchmarks/dit_flops.py`` counts ours at 1024 px: a pruned call (``alpha=0.3``) costs 0.305 of a
    full one, so with ``t0=8`` a generation saves 49.6% of the MACs at 28 steps and 58.4% at 50 (41.7% at the
    pipeline's default 20 steps).
Flux.1 (``diffusers_flux``): our adaptation of the SD3 design
    The official code targets SD3 (and PixArt-Sigma); Flux's dual-stream blocks are SD3's joint blocks with rotary
    embeddings and are pruned the same way (image queries of the selected tokens, image keys/values of all tokens
    from the cache, image feed-forward on the selected tokens; text stream in full). In the single-stream blocks
    attention and MLP form one parallel branch fused by ``proj_out``: the selected image rows (with all text rows)
    go through the whole branch, ``proj_out`` included, and its output (before the gate) is the one cached
    sublayer output; keys/values of the unselected image tokens come from the cache, as in the dual blocks. Cached
    keys are kept before the RMS norm and RoPE (where diffusers' ``to_k`` leaves them) and rotated with every
    token's phase; the selected queries with their own. The noise prediction is ``proj_out``'s packed per-token
    output on the 2x2-packed latent grid. Flux.1-schnell's 4 steps are at most ``t0=8``: nothing is pruned (a
    :class:`CatNoPruningWarning`); use e.g. ``t0=2`` there.

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
    * Levels: ``max_downsample`` defaults to the highest-resolution level with transformer blocks (1 on SD
      1.x/2.x; 2 on SDXL, whose full-resolution level has no attention). Only a pruned full-resolution level
      (``1``) replaces unselected tokens' noise output with the previous one; when only coarser levels prune
      (SDXL's default), the noise output is the U-Net's own, and when no block prunes it is never touched.
    * Lower levels: ``max_downsample=1`` (SD 1.x default) runs the blocks at 32x32, 16x16 and 8x8 (at 512 px) dense:
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
    * Requires the blocks' self-attention to project keys and values with separate ``to_k``/``to_v`` (diffusers'
      default ``AttnProcessor2_0``), without group or spatial norm (SD 1.x/2.x, SDXL): the adapter's key/value
      point rewrites those projections and diffusers' own processor computes the attention.
    * Measured (``benchmarks/test_cat_pruning.py``: SD1.5's U-Net, batch 2, ``alpha=0.3``): a pruned call
      costs 0.90 (32x32 latents) and 0.84 (64x64) of a full call's FLOPs with ``max_downsample=1``, 0.74 and
      0.69 with ``max_downsample=8``; over 50 steps with ``t0=8`` that is 13.5% (26%) fewer FLOPs at 512 px.
      The paper's 50-60% is for SD3, whose compute is all in token-wise transformer blocks; in the U-Net the
      convolutions stay dense.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from tokred import Method, register_method
from tokred.adapters.base import require_concrete
from tokred.adapters.diffusers_unet import DiffusersUNetAdapter
from tokred.errors import TokredWarning
from tokred.layout import max_downsample_option
from tokred.method import MethodState
from tokred.options import int_at_least, is_number, option
from tokred.reduction import (
    FULL_BLOCK,
    BlockCall,
    BlockPlan,
    Grid,
    KeyValue,
    RowCache,
    install_projected_kv_routing,
    recompute_rows,
    record_output,
)

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


class CatNoPruningWarning(TokredWarning):
    """A generation too short for CAT's schedule: at most ``t0`` denoiser calls, so nothing is pruned."""


# --- options -----------------------------------------------------------------------------------------------
@dataclass
class CatOptions:
    t0: int = option(
        8,
        valid="int >= 2",
        check=int_at_least(2),
        doc="denoiser calls computed in full before pruning (paper t0; the official example uses 8 of 28). The "
        "reference n_t0 is call t0-1's noise, clustering runs on call t0, pruning from call t0+1. Recommended: 8 "
        "(paper, 28 and 50 steps) up to about a third of the steps for more fidelity; a generation of at most t0 "
        "calls prunes nothing (with a warning).",
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
    max_downsample: int | None = max_downsample_option(
        "prune transformer blocks with at most this downsampling; None: the highest-resolution level with "
        "transformer blocks (1 on SD 1.x/2.x, whose tokens map one-to-one onto the noise output; 2 on SDXL); "
        "higher values add lower levels with a pooled index map"
    )


# --- state ---------------------------------------------------------------------------------------------------
@dataclass
class BlockCache:
    """One block's cached activations: sublayer outputs and self-attention keys/values of all tokens."""

    shape: tuple[int, int] | None = None  # (B, N) the caches hold
    attn: RowCache = field(default_factory=RowCache)
    k: RowCache = field(default_factory=RowCache)
    v: RowCache = field(default_factory=RowCache)
    cross: RowCache = field(default_factory=RowCache)
    attn2: RowCache = field(default_factory=RowCache)
    k2: RowCache = field(default_factory=RowCache)
    v2: RowCache = field(default_factory=RowCache)
    mlp: RowCache = field(default_factory=RowCache)


@dataclass
class CatState(MethodState):
    """What CAT remembers during one generation (``patch.method_state``); shapes: ``B`` samples, ``N`` noise
    tokens, ``D`` noise channels, ``K`` clusters, ``M`` selected tokens."""

    shape: tuple[int, int, int] | None = None  # (B, N, D) of the noise tokens
    disabled: bool = False
    mismatched: bool = False  # this call's noise tokens had another shape: pruning stops after the call
    ref: torch.Tensor | None = None  # n_t0 [B, N, D] float32
    labels: torch.Tensor | None = None  # [B, N]
    counts: torch.Tensor | None = None  # [B, N] decayed selection counts
    hits: torch.Tensor | None = None  # [B, K] selections each cluster appeared in
    prev: torch.Tensor | None = None  # last returned noise tokens [B, N, D]
    change: torch.Tensor | None = None  # ||n_t - n_t0|| [B, N] behind the current selection
    sel: torch.Tensor | None = None  # [B, M] tokens to compute at call sel_step
    sel_step: int = -1
    pending: torch.Tensor | None = None  # the last call's noise tokens [B, N, D], not yet selected from
    pending_grid: Grid | None = None  # their grid
    blocks: dict[str, BlockCache] = field(default_factory=dict)  # block name -> cached activations
    levels: dict[int, torch.Tensor] = field(default_factory=dict)  # this call's pooled selections per level

    def reset(self) -> None:
        fresh = CatState()
        self.__dict__.update(fresh.__dict__)

    def begin_call(self) -> None:
        self.levels.clear()


# --- the policy ----------------------------------------------------------------------------------------------
class CatPolicy:
    """Step logic shared by every model family: the reference, clustering, selection, the output cache and the
    block plans.

    The work is split so that ``torch.compile(denoiser, fullgraph=True)`` traces the forward as one graph per
    phase of the schedule. Outside the compiled frame, :meth:`before_call` (a pre-hook on the denoiser) reads the
    step and leaves this call's decisions in plain attributes, and :meth:`after_call` (a forward hook) makes the
    data-dependent choices (k-means, the selection for the next call) from the noise prediction the forward kept.
    Inside the forward, :meth:`plan` and :meth:`on_output` only read those decisions and do tensor work (sparse
    compute, caches, the output replacement, keeping the noise prediction). Every computation happens in the
    order it had when the output hook selected, so eager outputs are unchanged by the split.
    """

    def __init__(
        self, options: CatOptions, state: Any, replace_output: bool, branch_blocks: Any = (),
        block_names: Any = (),
    ) -> None:
        self.t0 = options.t0
        self.alpha = options.alpha
        self.num_clusters = options.num_clusters
        self.seed = options.kmeans_seed
        self.state = state
        self.st: CatState = state.method
        self.replace_output = replace_output  # False when the pruned blocks do not map onto the output tokens
        # blocks whose attention and MLP are one parallel branch (Flux's single-stream blocks): one cached output
        self.branch_blocks = frozenset(branch_blocks)
        self.block_names = tuple(block_names)  # the pruned blocks (their caches are made before the call)
        # Generations too short to prune, followed here: the run state forgets a generation when the next starts.
        self.generation = -1  # the generation of the last counted call seen
        self.calls = 0  # its counted calls so far
        self.warned_generation = -1  # the generation a CatNoPruningWarning was issued for
        # This call's decisions, made by before_call (the compiled forward reads only these, never the step):
        self.sel_now: torch.Tensor | None = None  # the tokens computed in this call (None: all)
        self.recording_now = False  # full blocks keep their activations
        self.output_phase = SKIP  # what on_output does

    def warn_too_short(self, calls: int, known_ahead: bool) -> None:
        """One :class:`CatNoPruningWarning` for the current generation of ``calls`` denoiser calls."""
        if self.warned_generation == self.generation:
            return
        self.warned_generation = self.generation
        if calls <= 2:
            advice = "CAT needs at least 3 denoiser calls per generation (t0 >= 2 full calls, then pruned ones)"
        else:
            advice = f"pass a smaller t0, e.g. t0={max(2, calls // 3)}"
        what = (
            f"this generation makes {calls} denoiser calls, at most t0={self.t0}, so nothing is pruned"
            if known_ahead
            else f"a generation made {calls} denoiser calls, at most t0={self.t0}, so nothing was pruned"
        )
        warnings.warn(f"cat_pruning: {what} (CAT computes calls 1..t0 in full); {advice}", CatNoPruningWarning,
                      stacklevel=3)

    def finish(self) -> None:
        """The generation of the last counted call ended (the next one started, or the patch is removed): warn
        if it made at most ``t0`` calls and nobody said so at its start."""
        if 0 < self.calls <= self.t0:
            self.warn_too_short(self.calls, known_ahead=False)
        self.calls = 0

    def budget(self, n: int) -> int:
        return max(1, int(self.alpha * n))

    # --- before the call (outside a compiled forward) -----------------------------------------------------------
    def before_call(self) -> None:
        """The denoiser's pre-hook, after the run state counted the call: this call's decisions (:attr:`sel_now`,
        :attr:`recording_now`, :attr:`output_phase`) and the block caches (a selection the previous call's forward
        hook did not make is made first)."""
        st, state = self.st, self.state
        self.sel_now, self.recording_now, self.output_phase = None, False, SKIP
        if state.auxiliary:  # a second pass of the step: the adapters run it unreduced
            return
        step = state.step
        if state.generation != self.generation:  # a new generation: the previous one has ended
            self.finish()
            self.generation = state.generation
        self.calls = step
        if step == 1 and state.expected_calls is not None and state.expected_calls <= self.t0:
            self.warn_too_short(state.expected_calls, known_ahead=True)
        self.after_call(step - 1)  # normally done by the previous call's forward hook
        for name in self.block_names:
            if name not in st.blocks:
                st.blocks[name] = BlockCache()
        if st.disabled:
            self.recording_now = step >= self.t0
            return
        self.sel_now = st.sel if st.sel_step == step else None
        self.recording_now = step >= self.t0
        if step < self.t0 - 1:
            return
        if step == self.t0 - 1:
            self.output_phase = REFERENCE
        elif st.ref is not None and (st.labels is None or self.sel_now is not None):
            self.output_phase = SELECT
        # else: no reference yet, or a full call after t0 (should not happen): nothing to choose from any more

    def after_call(self, step: int | None = None) -> None:
        """The denoiser's forward hook (outside a compiled forward): the selection for the next call from this
        call's noise prediction (:meth:`select`), or, after a call whose noise tokens changed shape, pruning off
        until the next generation."""
        st = self.st
        if st.mismatched:
            # A different batch or resolution inside one generation: stop pruning until the next one.
            st.reset()
            st.disabled = True
        if st.pending is not None:
            self.select(self.state.step if step is None else step)

    def select(self, step: int) -> None:
        """Choose the tokens of call ``step + 1`` from call ``step``'s noise prediction (``st.pending``)."""
        st = self.st
        tokens, grid = st.pending, st.pending_grid
        st.pending = st.pending_grid = None
        with torch.no_grad():
            B, N, _ = tokens.shape
            computed = st.sel if st.sel_step == step else None
            mask = None
            if computed is not None:
                mask = torch.zeros(B, N, dtype=torch.bool, device=tokens.device).scatter_(1, computed, True)
            change = tokens.float() - st.ref
            k = min(self.num_clusters, N)
            if st.labels is None:  # call t0: cluster once, first selection from the smoothed cluster change
                st.labels = kmeans(clustering_features(tokens, grid.h, grid.w), k, seed=self.seed)
                scores = cluster_scores(
                    cluster_max(change, st.labels, k), cluster_adjacency(st.labels, grid.h, grid.w, k)
                )
                st.counts = torch.zeros(B, N, device=tokens.device)
                st.hits = torch.zeros(B, k, device=tokens.device)
                first = True
            else:
                st.counts = update_counts(st.counts, mask, st.hits)
                scores = cluster_scores(cluster_max(change, st.labels, k))
                first = False
            change_norm = change.norm(dim=-1)
            sel = select_tokens(change_norm, st.labels, scores, st.counts, self.budget(N), first)
            st.hits += torch.zeros_like(st.hits).scatter_(1, st.labels.gather(1, sel), 1.0)
            st.sel, st.sel_step, st.change = sel, step + 1, change_norm

    # --- inside the forward -------------------------------------------------------------------------------------
    def selection(self, batch: int, n: int) -> torch.Tensor | None:
        """The tokens [B, M] to compute in this call on the noise grid of ``n`` tokens; None = compute all."""
        st, sel = self.st, self.sel_now
        if sel is None or st.shape is None or st.shape[0] != batch or st.shape[1] != n:
            return None
        return sel

    def level_selection(self, batch: int, grid: Grid) -> torch.Tensor | None:
        """This call's selection for a block grid ``downsample`` times coarser than the noise grid."""
        if grid.downsample == 1:  # the noise grid itself (U-Net top level, every MMDiT block)
            return self.selection(batch, grid.tokens)
        lh, lw = self.state.latent_size
        top = self.selection(batch, lh * lw)
        if top is None:
            return None
        if grid.downsample not in self.st.levels:
            mask = torch.zeros(batch, lh * lw, dtype=torch.bool, device=top.device).scatter_(1, top, True)
            self.st.levels[grid.downsample] = level_selection(
                mask, self.st.change, lh, lw, grid.downsample, self.budget(grid.tokens)
            )
        return self.st.levels[grid.downsample]

    def plan(self, call: BlockCall, x: torch.Tensor) -> BlockPlan:
        """Record a full call's activations, or recompute the selected rows and take the rest from the cache."""
        if call.grid is None:
            return FULL_BLOCK
        B, n = x.shape[0], x.shape[1]
        cache = self.st.blocks.get(call.name)
        if cache is None:  # a block the pre-hook did not know: made here (a graph break under torch.compile)
            cache = self.st.blocks[call.name] = BlockCache()
        sel = self.level_selection(B, call.grid)
        if sel is not None and cache.shape != (B, n):
            sel = None  # this block has nothing cached yet: compute it in full and record
        if sel is None:
            if not self.recording_now:
                return FULL_BLOCK
            cache.shape = (B, n)
            attn = record_output(cache.attn)
            return BlockPlan(
                attn=attn,
                kv=KeyValue(keys=cache.k.record, values=cache.v.record),
                cross=record_output(cache.cross),
                attn2=record_output(cache.attn2),
                kv2=KeyValue(keys=cache.k2.record, values=cache.v2.record),
                mlp=attn if call.name in self.branch_blocks else record_output(cache.mlp),
            )
        attn = recompute_rows(sel, cache.attn)
        return BlockPlan(
            attn=attn,
            kv=KeyValue(keys=lambda k: cache.k.update(sel, k), values=lambda v: cache.v.update(sel, v)),
            cross=recompute_rows(sel, cache.cross),
            attn2=recompute_rows(sel, cache.attn2),
            kv2=KeyValue(keys=lambda k: cache.k2.update(sel, k), values=lambda v: cache.v2.update(sel, v)),
            mlp=attn if call.name in self.branch_blocks else recompute_rows(sel, cache.mlp),
        )

    def on_output(self, tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Take the noise prediction tokens [B, h*w, D] of this call; return them with cached values for the
        tokens this call did not compute, and keep them for the next call's selection (:meth:`select`)."""
        st, phase = self.st, self.output_phase
        if phase == SKIP:
            return tokens
        B, N, D = tokens.shape
        if st.shape is not None and st.shape != (B, N, D):
            st.mismatched = True  # pruning stops after this call (after_call)
            return tokens
        if phase == REFERENCE:
            st.shape, st.ref = (B, N, D), tokens.detach().float().clone()
            return tokens
        computed = self.sel_now
        out = tokens
        if computed is not None and self.replace_output and computed.shape[1] < N:
            with torch.no_grad():
                mask = torch.zeros(B, N, dtype=torch.bool, device=tokens.device).scatter_(1, computed, True)
            # the returned tokens keep the gradient of the rows this call computed
            out = torch.where(mask[..., None], tokens, st.prev.to(tokens.dtype))
        st.prev = out.detach().clone()
        st.pending, st.pending_grid = tokens.detach().clone(), grid
        return out


SKIP, REFERENCE, SELECT = 0, 1, 2  # CatPolicy.output_phase: leave the output / keep it as n_t0 / select after it


# --- the method ------------------------------------------------------------------------------------------------------
@register_method("cat_pruning")
class CatPruning(Method):
    kind = "prune"
    # the schedule, k-means and the selection run in hooks outside the compiled forward (see "torch.compile")
    compile_support = "fullgraph"
    summary = "CAT pruning: cluster-aware token pruning with cached outputs for diffusion (arXiv 2502.00433)"
    options = {"diffusers_mmdit": CatOptions, "diffusers_unet": CatUNetOptions, "diffusers_flux": CatOptions}
    options["diffusers_dit"] = CatOptions  # PixArt-α/Σ (the paper's second model), DiT-XL/2
    # ladders, mild to strong: alpha is the share of tokens recomputed each pruned step, down to 0.1
    presets = {
        "diffusers_mmdit": {"alpha0.5": {"t0": 8, "alpha": 0.5}, "paper": {"t0": 8, "alpha": 0.3},
                            "alpha0.1": {"t0": 8, "alpha": 0.1}},
        "diffusers_flux": {"alpha0.5": {"t0": 8, "alpha": 0.5}, "paper": {"t0": 8, "alpha": 0.3},
                           "alpha0.1": {"t0": 8, "alpha": 0.1}},
        "diffusers_unet": {
            "alpha0.5": {"t0": 8, "alpha": 0.5},
            "alpha0.3": {"t0": 8, "alpha": 0.3},
            "alpha0.1": {"t0": 8, "alpha": 0.1},
        },
    }
    presets["diffusers_dit"] = {"alpha0.5": {"t0": 8, "alpha": 0.5}, "paper": {"t0": 8, "alpha": 0.3},
                                "alpha0.1": {"t0": 8, "alpha": 0.1}}
    State = CatState

    def warmup_calls(self) -> int:
        """The ``t0`` full calls of a generation: call ``t0 + 1`` is the first pruned one."""
        return int(self.options.t0)

    def check(self, adapter) -> None:
        require_concrete(adapter.root, "cat_pruning")  # k-means and the selection read the activations
        if isinstance(adapter, DiffusersUNetAdapter):
            self.pruned_blocks: set[str] | None = adapter.blocks_up_to(self.options.max_downsample)
            self.replace_output = any(adapter.level[name] == 1 for name in self.pruned_blocks)
        else:
            self.pruned_blocks, self.replace_output = None, True
        adapter.require_kv_hooks(self.pruned_blocks, "cat_pruning")

    def install(self, patch) -> None:
        adapter = patch.adapter
        names = [n for n, _ in adapter.blocks if self.pruned_blocks is None or n in self.pruned_blocks]
        policy = CatPolicy(
            self.options, patch.state, self.replace_output, getattr(adapter, "single_blocks", ()), names
        )
        # after the run state's own pre-hook (registered at attach), which counts this call
        patch.register_forward_pre_hook(
            adapter.root, lambda module, args, kwargs: policy.before_call(), with_kwargs=True, outside_compile=True
        )
        # the selection at the end of the call, outside the compiled forward
        patch.register_forward_hook(adapter.root, lambda module, args, out: policy.after_call(), outside_compile=True)
        for name, block in adapter.blocks if adapter.family != "diffusers_flux" else ():  # Flux: own attention
            if name in names:  # the cached keys/values through slots, not per-call hooks (torch.compile)
                for attn in (getattr(block, "attn1", None), getattr(block, "attn", None)):
                    if attn is not None and hasattr(attn, "to_k"):
                        install_projected_kv_routing(patch, attn)
                attn2 = getattr(block, "attn2", None)
                if attn2 is not None and hasattr(attn2, "to_k") and getattr(block, "use_dual_attention", False):
                    install_projected_kv_routing(patch, attn2)
        adapter.install_blocks(patch, policy.plan, self.pruned_blocks)
        patch.adapter.install_output(patch, policy.on_output)
        patch.on_remove(policy.finish)  # a bare loop's last generation ends with the patch
