"""CA-ToMe: Cached Adaptive Token Merging (Saghatchian et al., arXiv 2501.00946; official package ``ca-tome``).

Two changes to ToMe for Stable Diffusion:

* **Adaptive (threshold) merging.** Instead of merging a fixed fraction of the tokens, every source token
  whose most similar destination reaches the cosine similarity ``threshold`` is merged. As in the official
  code the count ``r`` is the largest such count over the batch (so the classifier-free-guidance halves and
  co-batched prompts share one ``r``), and the ``r`` most similar sources of each sample are merged.
* **Cached pairs.** The merge pairs computed at one denoising step are kept and reused at the following
  steps until the next step listed in ``compute_on``. A reused step does no similarity, sort or random work:
  only the gathers and scatters of the cached merge run.

``torch.compile(denoiser, fullgraph=True)`` (diffusion families, issue 20) works with no island and eager's
result (within float rounding), as on ViTs (below): while compiling, the threshold's count is a size known only at
run time (an unbacked SymInt, bounded by ``torch._check``), so no guard is made on it, and a block caches its
matching as tensors whose shapes do not depend on the count (:func:`tokred.merge.threshold_grid_matching`: the
sources in merge order, their destinations, the count), from which a reusing call takes its pairs with the count
read again in the graph (:func:`tokred.merge.grid_merge_of`). The compute-or-reuse choice is made before the call,
outside the compiled forward (``CAToMeState.recompute``), and the random destinations are drawn through the run
state's compiled draws. A generation compiles three graphs whatever its length and counts: the first call (empty
cache), the reusing calls and the recomputing calls. A count of 0, where eager merges nothing, is a merge of 0
pairs: the tokens are reordered for the sublayer and put back after it (the same values up to float rounding).
Each merging block reads its count on the host once per call (``.item()``, a device synchronisation; eager reads it
on compute steps only). Under compile ``block_stats`` records the counts as 0-d tensors (``BlockStat.counts``;
``BlockStat.r`` reads them).

Steps are counted per generation from 1 (the first U-Net call), as the official pipeline counts them, so
the published schedules (:data:`CACHE_PRESETS`, equal to the official ``CacheConf`` lists) name the same
steps; their leading 0 never matches. When a block has no cached pairs (the first call of a generation, or
after a change of batch size, resolution or device) the pairs are computed whatever ``compute_on`` says:
this is what the official code does on the first call of its first image, where its cache is empty.

Stable Diffusion U-Net (``diffusers_unet``)
    The layout options and their defaults are ToMe-SD's (``max_downsample`` at the highest-resolution level
    with transformer blocks, ``sx=sy=2``, ``use_rand=True``, merge for self-attention only); ToMe's ``ratio``
    is replaced by ``threshold`` (default 0.7, the paper's) and ``compute_on`` (default ``"config_3"``, the
    paper's best schedule).
    With ``use_rand=False`` and ``batch_independent=False`` the outputs equal the official code's at every
    step (within float rounding). Differences from the official code, on purpose:

    * State resets every generation. The official package keeps the previous image's last pairs (and its
      random stream) and reuses them until the first step of ``compute_on`` of the next image; here the
      pairs and the random destinations start afresh with every ``pipe(...)`` call, so the same seed gives
      the same image twice. The first image matches the official one.
    * Shape changes are safe: a new batch size, resolution or device between calls recomputes the pairs
      instead of reusing pairs made for other tokens (the official code stops with a shape error).
    * ``batch_independent=True`` makes each row of the batch independent of the others: each row gets its
      own ``r`` and its own pairs, and merging blocks run once per row (a loop over the batch, slower for
      large batches). The random destinations are drawn once per block and compute step and shared by all
      rows, so the draw does not depend on the batch either; in this mode ``use_rand`` applies to odd
      batches too (ToMe-SD, and the default mode here, fall back to top-left destinations for odd batches,
      which would make a row's result depend on the batch size). A sample alone and in a batch then gives
      the same output up to the float rounding of the rest of the U-Net's batched kernels.
    * A threshold of 1 or more disables merging, as in the official code; thresholds outside [-1, 1] are
      an error.

    After each call, ``patch.method_state.block_stats`` maps each merging block's name to a
    :class:`BlockStat` (token count, merged count(s) and whether the pairs were computed or reused).
    ``max_downsample`` defaults to the highest-resolution level with transformer blocks (1 on SD 1.x/2.x, as
    the official code; 2 on SDXL).

Stable Diffusion 3 / 3.5 MMDiT (``diffusers_mmdit``): our extension
    CA-ToMe was published for the SD1.5 U-Net only. On an MMDiT it merges the image tokens of every
    ``JointTransformerBlock`` with ToMe's MMDiT layout (:class:`~tokred.methods.tome.MMDiTMergeLayout`: one
    destination per ``sy x sx`` window of the patch grid, matched on the block input; merged before joint
    attention and SD3.5's second self-attention ``attn2``, which share the block's one merge, unmerged after;
    text tokens never merged; ``merge_mlp`` optional), with the threshold count, the cached pairs
    (``compute_on``, counted in transformer calls: step 1 is the first) and ``batch_independent`` as on the
    U-Net. There is no ``max_downsample``: every block runs on the same patch grid. The published schedules
    were chosen for 50 PLMS steps on SD1.5; SD3's usual 28 flow-matching steps reach fewer of their entries,
    and no threshold has been tuned for SD3 (the block inputs of an MMDiT are not a U-Net's). Skip-layer
    guidance's extra pass runs unmerged and leaves the cache alone.

PixArt-α/Σ and DiT-XL/2 (``diffusers_dit``): our extension
    As on the MMDiT, with ToMe's DiT layout (:class:`~tokred.methods.tome.DiTMergeLayout`: one destination per
    ``sy x sx`` window of the patch grid, merged before self-attention, optionally before PixArt's cross-attention
    queries and the MLP; the T5 text tokens are never merged), the threshold count, cached pairs (``compute_on``
    in transformer calls) and ``batch_independent``. PixArt's default 20 DPM-Solver steps reach only the
    ``compute_on`` entries up to 20; no threshold has been tuned for these models.
Flux.1 (``diffusers_flux``): our extension
    As on the MMDiT, in the dual- and single-stream blocks (text tokens never merged; merged tokens rotated with
    their destination's rotary phase, as ToMe on Flux, see :mod:`tokred.methods.tome`). ``compute_on`` counts
    transformer calls: Flux.1-schnell's 4 steps reach none of ``config_3``'s entries after the first, so its pairs
    are computed once per generation and reused.

timm ViTs (``timm_vit``)
    ToMe's per-layer bipartite matching (alternating split, protected cls/distillation tokens, size-weighted
    averages, proportional attention) with ``r`` chosen in each layer by the threshold instead of a fixed
    schedule: ``r`` is the largest count over the batch of sources whose best key similarity reaches the
    threshold, capped at half the unprotected tokens. Caching across steps does not apply to
    classification (one forward, no denoising steps), so ``compute_on`` and the U-Net layout options are
    not options for ViTs; per-image ``r`` needs images run one at a time. The default threshold 0.7 is the
    SD value: ViT keys are often more similar than SD block inputs, so check accuracy (0.8-0.95 is a place
    to start); no value has been tuned for ViTs.

    ``torch.compile(vit, fullgraph=True)`` works (issue 20) with no island, no bucketing and the eager result
    (within float rounding): while compiling, the threshold's count is read in the graph as a size known only at
    run time (an unbacked SymInt, bounded by ``torch._check`` to ``0 <= r <= cap``), so the compiled model merges
    exactly eager's count with no guard on it: one graph per input shape, however the count varies. A count of 0,
    where eager merges nothing, is a merge of 0 pairs whose result is replaced by the unchanged tokens with a
    ``where`` (:class:`tokred.merge.EmptyMergeKeepsTokens`). The tokens a merge keeps are narrowed to a count of
    their own (a second run-time size, checked ``>= 1``): the merge's own expression of it, nested over the blocks,
    could not be proven nonzero after three merges (DeiT-S failed to compile with a data-dependent guard in
    attention). The two ``.item()`` reads are device synchronisations per block (eager reads one). Checked with
    ``aot_eager`` in the tests (tests/test_compile_vit.py) and with inductor on CPU (tiny ViT; DeiT-S, random
    weights, batch 8: within 1.1e-6 of eager).
    Inductor's CPU matmul lowering (torch 2.14) guards on such sizes, so on CPU the compiled matching computes
    its similarities as a product and a sum instead of a batched matmul (the same values up to float rounding:
    a near-tie between two sources' best similarities could then be ordered differently than in eager).

Speed measured on random weights says nothing about how many tokens a trained model merges at a given
threshold: the merge count depends on how similar the trained features are.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from tokred import Method, register_method
from tokred.adapters.base import require_concrete
from tokred.adapters.diffusers_dit import DiffusersDiTAdapter
from tokred.adapters.diffusers_flux import DiffusersFluxAdapter
from tokred.adapters.diffusers_mmdit import DiffusersMMDiTAdapter
from tokred.adapters.diffusers_unet import DiffusersUNetAdapter
from tokred.adapters.timm_vit import TimmViTAdapter
from tokred.layout import GridMergeLayout
from tokred.merge import (
    AlternateMerge,
    EmptyMergeKeepsTokens,
    GridMerge,
    alternate_matching,
    grid_destinations,
    grid_matching,
    grid_merge_of,
    threshold_grid_matching,
)
from tokred.method import MethodState
from tokred.options import is_bool, is_int, number_in, option
from tokred.reduction import FULL_BLOCK, BlockCall, BlockPlan, RowPlans, TokenReduce

from .tome import (
    DiTMergeLayout,
    MMDiTMergeLayout,
    WindowCheck,
    finest_merging_level,
    require_cross_attention,
    require_some_sublayer,
)

# The official CacheConf schedules (Table II of the paper); step 1 is the first U-Net call.
CACHE_PRESETS: dict[str, tuple[int, ...]] = {
    "config_1": (0, 1, 2, 3, 5, 10, 15, 25, 35),
    "config_2": (0, 10, 11, 12, 15, 20, 25, 30, 35, 45),
    "config_3": (0, 8, 11, 13, 20, 25, 30, 35, 45, 46, 47, 48, 49),
    "config_4": (0, 9, 13, 14, 15, 28, 29, 32, 36, 45),
    "adaptive": (0, 1, 5, 7, 10, 12, 15, 35, 40, 45, 46, 47, 48, 49, 50, 51),
    "config_five": (0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50),
}

MAX_STEP_LIST = 100_000  # a longer explicit list is a mistake (a range is kept as a range, never enumerated)
_STEP_LISTS = (list, tuple, set, frozenset)
COMPUTE_ON_VALID = (
    f"a preset name ({', '.join(CACHE_PRESETS)}; case-insensitive), a list of at most {MAX_STEP_LIST} step "
    "numbers (ints >= 0; the first U-Net call of a generation is step 1), or a range with start >= 0 and step > 0"
)


def _is_compute_on(v: Any) -> bool:
    if isinstance(v, str):
        return v.lower() in CACHE_PRESETS
    if isinstance(v, range):
        return v.start >= 0 and v.step > 0
    return isinstance(v, _STEP_LISTS) and len(v) <= MAX_STEP_LIST and all(is_int(s) and s >= 0 for s in v)


def resolve_compute_on(value: str | Collection[int]) -> Collection[int]:
    """The steps at which pairs are recomputed (supports ``in``), from a preset name, a list or a range."""
    if isinstance(value, str):
        return frozenset(CACHE_PRESETS[value.lower()])
    if isinstance(value, range):
        return value
    return frozenset(value)


THRESHOLD_DOC = (
    "cosine similarity a source token must reach with its best destination to be merged (the official "
    "apply_patch's r); lower merges more. 0.7 is the paper's value; >= 1 disables merging"
)


def _threshold() -> Any:
    return option(0.7, valid="-1 <= threshold <= 1", check=number_in(-1.0, 1.0), doc=THRESHOLD_DOC)


def _compute_on() -> Any:
    return option(
        "config_3",
        valid=COMPUTE_ON_VALID,
        check=_is_compute_on,
        doc="steps at which the merge pairs are recomputed; in between the last pairs are reused. "
        "config_3 is the paper's best",
    )


def _batch_independent() -> Any:
    return option(
        False,
        valid="bool",
        check=is_bool,
        doc="per-row r and pairs, so a sample's output does not depend on its batch (official: batch-max r)",
    )


@dataclass
class CAToMeSDOptions(GridMergeLayout):
    threshold: float = _threshold()
    compute_on: Any = _compute_on()
    batch_independent: bool = _batch_independent()

    def validate(self) -> None:
        require_some_sublayer(self)


@dataclass
class CAToMeMMDiTOptions(MMDiTMergeLayout):
    threshold: float = _threshold()
    compute_on: Any = _compute_on()
    batch_independent: bool = _batch_independent()

    def validate(self) -> None:
        require_some_sublayer(self)


@dataclass
class CAToMeDiTOptions(DiTMergeLayout):
    threshold: float = _threshold()
    compute_on: Any = _compute_on()
    batch_independent: bool = _batch_independent()

    def validate(self) -> None:
        require_some_sublayer(self)


@dataclass
class CAToMeViTOptions:
    threshold: float = option(
        0.7,
        valid="-1 <= threshold <= 1",
        check=number_in(-1.0, 1.0),
        doc="key cosine similarity a source must reach to be merged in each block; >= 1 disables merging. "
        "Untuned for ViTs: try 0.8-0.95 and check accuracy",
    )
    prop_attn: bool = option(True, valid="bool", check=is_bool, doc="proportional attention: add log(size)")
    trace_source: bool = option(
        False, valid="bool", check=is_bool, doc="keep patch.adapter.merged_tokens.source: merged -> input tokens"
    )


@dataclass(frozen=True)
class BlockStat:
    """What one merging block did in one call: its token count, the merged count (one entry for the
    batch, or one per row with ``batch_independent``) and whether the pairs were computed (not reused).

    Under torch.compile the counts are recorded as 0-d tensors (``counts``; a host read in the compiled graph would
    be a guard or a graph break); ``r`` reads them as ints either way."""

    tokens: int
    counts: tuple[int | torch.Tensor, ...]
    computed: bool

    @property
    def r(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.counts)


@dataclass
class CAToMeState(MethodState):
    """``pairs``: per block name, the shape key and the cached merges (one per generation); ``block_stats``:
    per merging block, what it did in the last call."""

    # the cached entries: eager, the merges (None: nothing merged); compiled, tensors (see _matching)
    pairs: dict[str, tuple[tuple, tuple[Any, ...]]] = field(default_factory=dict)
    block_stats: dict[str, BlockStat] = field(default_factory=dict)
    # Whether this call recomputes the pairs (its step is in ``compute_on``), decided before the call: a compiled
    # forward reads this bool rather than the step, which would be a guard on a new int at every step.
    recompute: bool = True
    run: Any = field(default=None, repr=False)  # the run state (set by install on diffusion models)
    compute_on: Any = frozenset()

    def reset(self) -> None:
        self.pairs.clear()
        self.block_stats.clear()

    def begin_call(self) -> None:
        self.block_stats.clear()
        self.recompute = self.run is None or self.run.step in self.compute_on


def threshold_alternate_matching(
    metric: torch.Tensor, threshold: float, num_protected: int
) -> AlternateMerge | EmptyMergeKeepsTokens | None:
    """ToMe's ViT bipartite matching with ``r`` = the batch maximum of sources reaching ``threshold``
    (capped at half the unprotected tokens, as ToMe caps it); a threshold of 1 or more merges nothing. While
    torch.compile traces, a merge whose count is known at run time only (see the module docstring)."""
    if threshold >= 1:
        return None
    return alternate_matching(metric, num_protected=num_protected, threshold=threshold)


def _matching(metric: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, threshold: float) -> Any:
    """What a block caches for one row set: eager, the merge itself (None: nothing reaches the threshold); while
    torch.compile traces, the matching as tensors whose shapes do not depend on the count
    (:func:`tokred.merge.threshold_grid_matching`), so that a later compiled call reusing it has no guard on it."""
    if torch.compiler.is_compiling():
        return threshold_grid_matching(metric, a_idx, b_idx, threshold)
    return grid_matching(metric, a_idx, b_idx, threshold=threshold)


def _merge_of(entry: Any) -> GridMerge | None:
    return entry if entry is None or isinstance(entry, GridMerge) else grid_merge_of(entry)


def _count_of(entry: Any) -> int | torch.Tensor:
    """The merged count of a cached entry: an int, or under torch.compile the 0-d count tensor (not read on the host
    in the graph; ``BlockStat.r`` reads it when asked)."""
    if entry is None or isinstance(entry, GridMerge):
        return 0 if entry is None else entry.r
    order, _, count, a_idx, _ = entry
    return count.clamp(max=a_idx.shape[1])


@register_method("ca_tome")
class CAToMe(Method):
    kind = "merge"
    # The threshold's merge count is a size known only at run time (an unbacked SymInt bounded by torch._check), on
    # every family: one graph per compute-or-reuse decision, no graph break (tests/test_compile_vit.py,
    # tests/test_compile_diffusion.py).
    compile_support = "fullgraph"
    summary = "Cached Adaptive ToMe: threshold merging, pairs reused between steps (arXiv 2501.00946)"
    options = {
        "timm_vit": CAToMeViTOptions,
        "diffusers_unet": CAToMeSDOptions,
        "diffusers_mmdit": CAToMeMMDiTOptions,
        "diffusers_flux": CAToMeMMDiTOptions,
    }
    options["diffusers_dit"] = CAToMeDiTOptions  # PixArt-α/Σ, DiT-XL/2
    # Each family's presets are a ladder, mild to strong (the leaderboard joins them in this order): a lower
    # similarity threshold merges more, down to 0.2, where every block merges its cap (half its tokens).
    presets = {
        "timm_vit": {"threshold0.9": {"threshold": 0.9}, "threshold0.8": {"threshold": 0.8},
                     "threshold0.5": {"threshold": 0.5}},
        # The paper's best cache schedule at four thresholds; other schedules via options=compute_on.
        "diffusers_unet": {
            "config_3-threshold0.9": {"compute_on": "config_3", "threshold": 0.9},
            "config_3": {"compute_on": "config_3"},
            "config_3-threshold0.5": {"compute_on": "config_3", "threshold": 0.5},
            "config_3-threshold0.2": {"compute_on": "config_3", "threshold": 0.2},
        },
        "diffusers_mmdit": {
            "config_3-threshold0.9": {"compute_on": "config_3", "threshold": 0.9},
            "config_3": {"compute_on": "config_3"},
            "config_3-threshold0.5": {"compute_on": "config_3", "threshold": 0.5},
        },
        "diffusers_flux": {
            "config_3": {"compute_on": "config_3"},
            "config_3-threshold0.9": {"compute_on": "config_3", "threshold": 0.9},
        },
    }
    presets["diffusers_dit"] = {
        "config_3": {"compute_on": "config_3"},
        "config_3-threshold0.9": {"compute_on": "config_3", "threshold": 0.9},
    }
    State = CAToMeState
    random_weights_caveat = (
        "CA-ToMe's merge count depends on trained features (a similarity threshold); on random weights this row "
        "shows the count it actually merged (see tokens), not what trained weights would give"
    )

    def check(self, adapter) -> None:
        require_concrete(adapter.root, "ca_tome")  # the merge count is read from the activations
        if isinstance(adapter, DiffusersUNetAdapter):
            self.merging_blocks = adapter.blocks_up_to(self.options.max_downsample)
            require_cross_attention(adapter, self.merging_blocks, self.options, "ca_tome")
        elif isinstance(adapter, (DiffusersMMDiTAdapter, DiffusersFluxAdapter)):
            self.merging_blocks = None  # every joint/Flux block: they all run on the same patch grid
        elif isinstance(adapter, DiffusersDiTAdapter):
            self.merging_blocks = None  # every block of a PixArt / DiT runs on the same patch grid
            require_cross_attention(adapter, None, self.options, "ca_tome")
        if not isinstance(adapter, TimmViTAdapter):
            self.finest_level = finest_merging_level(adapter, self.merging_blocks)

    def install(self, patch) -> None:
        if isinstance(patch.adapter, TimmViTAdapter):
            threshold, num_protected = self.options.threshold, patch.adapter.num_protected

            point = TokenReduce(lambda scores: threshold_alternate_matching(scores.keys, threshold, num_protected))

            def plan(call: BlockCall, x: torch.Tensor) -> BlockPlan:
                return BlockPlan(tokens=point)

            patch.adapter.install_blocks(
                patch, plan, prop_attn=self.options.prop_attn, trace_source=self.options.trace_source,
                may_reduce=threshold < 1,
            )  # fmt: skip
        else:
            patch.adapter.install_blocks(patch, self.planner(patch.state), self.merging_blocks)

    def planner(self, state):
        """Threshold merging with cached pairs on a U-Net's or an MMDiT's image tokens."""
        opts: CAToMeSDOptions | CAToMeMMDiTOptions = self.options
        st: CAToMeState = state.method
        st.run, st.compute_on = state, resolve_compute_on(opts.compute_on)
        windows = WindowCheck("ca_tome", opts.sx, opts.sy, getattr(self, "finest_level", 1))

        def plan(call: BlockCall, x: torch.Tensor) -> BlockPlan | RowPlans:
            if opts.threshold >= 1 or call.grid is None or not windows(call):
                return FULL_BLOCK
            grid = call.grid
            key = (x.shape[0], x.shape[1], grid.h, grid.w, x.device)
            cached = st.pairs.get(call.name)
            computed = cached is None or cached[0] != key or st.recompute
            if computed:
                # Default mode follows ToMe-SD: an odd batch cannot hold matching CFG halves, so destinations
                # fall back to top-left. Batch-independent mode must not depend on the batch, so it does not.
                use_rand = opts.use_rand and (opts.batch_independent or x.shape[0] % 2 == 0)
                generator = state.generator(x.device) if use_rand else None
                a_idx, b_idx = grid_destinations(grid.h, grid.w, opts.sx, opts.sy, generator, x.device)
                rows = [x[i : i + 1] for i in range(x.shape[0])] if opts.batch_independent else [x]
                entries = tuple(_matching(row, a_idx, b_idx, opts.threshold) for row in rows)
                st.pairs[call.name] = (key, entries)
            else:
                entries = cached[1]
            merges = tuple(_merge_of(entry) for entry in entries)
            st.block_stats[call.name] = BlockStat(x.shape[1], tuple(_count_of(e) for e in entries), computed)
            if len(merges) == 1:
                return opts.plan(merges[0])
            return RowPlans(tuple(opts.plan(m) for m in merges))

        return plan
