"""ToMe: Token Merging, for ViTs (Bolya et al., arXiv 2210.09461) and Stable Diffusion (arXiv 2303.17604).

ViT (``timm_vit``)
    In every block, between attention and MLP, ``r`` tokens are merged by bipartite soft matching on the
    attention keys averaged over heads: tokens alternate into sets A and B, each A token picks its most
    similar B token, and the ``r`` most similar pairs are merged by a size-weighted average. The cls token
    (and a distillation or register token) is never merged and stays in front; ``r`` is capped at half the
    unprotected tokens. Proportional attention adds ``log(size)`` to the attention logits, as an additive
    mask to fused attention. Unlike the official code (pinned to timm 0.4.12), LayerScale and qk-norm are
    honoured, so ``r=0`` is bit-identical to the unpatched model, DeiT-3 included.

Stable Diffusion U-Net (``diffusers_unet``)
    In each transformer block with at most ``max_downsample`` downsampling (default: the highest-resolution
    level with transformer blocks: 1 on SD 1.x/2.x, exactly tomesd's default, and 2 on SDXL, whose full-
    resolution level has no attention), tokens are merged before
    self-attention (and optionally cross-attention and MLP) and unmerged after it. Destinations are one
    token per ``sy x sx`` window, random within the window (``use_rand``) or top-left; the metric is the
    block input. Options and defaults are tomesd's. Differences from tomesd, on purpose:

    * a ``ratio`` above ``1 - 1/(sx*sy)`` is an error (tomesd silently caps it);
    * the random destinations restart every generation, so the same seed gives the same image twice
      (tomesd's generator keeps advancing); the first generation matches tomesd under the same
      ``torch.manual_seed``;
    * the U-Net may be called with keyword arguments only (tomesd reads ``args[0]``);
    * grids that do not match the latent size (odd sizes) are left unmerged instead of crashing, and so are grids
      smaller than one ``sy x sx`` window; when that leaves a whole call unmerged (strides larger than the
      highest-resolution merging grid) a :class:`StrideTooLargeWarning` says so, once per patch;
    * ``max_downsample`` defaults to the U-Net's highest-resolution transformer level (tomesd: always 1, which
      on SDXL merges nothing), and a value that selects no block is an error at ``apply``;
    * options that merge for no sublayer (``merge_attn``, ``merge_crossattn`` and ``merge_mlp`` all False, or
      only ``merge_crossattn`` where the selected blocks have no cross-attention) are an error at ``apply``
      instead of a patch that does nothing.

Stable Diffusion 3 / 3.5 MMDiT (``diffusers_mmdit``): our extension
    ToMe for SD was published for U-Nets only; this applies its design to the image stream of every
    ``JointTransformerBlock`` (see :class:`MMDiTMergeLayout`). Tokens are matched on the block input, with
    one destination per ``sy x sx`` window of the 2-D patch grid (random within the window unless
    ``use_rand=False``), and ``int(ratio * N)`` image tokens are merged before joint attention and
    unmerged after it; the text tokens are never merged, so joint attention runs on ``N - r`` image tokens
    plus all text tokens, and the text queries attend to the merged image tokens (without proportional
    attention, as ToMe for SD has none). SD3.5's dual-attention blocks use the same merge for their second,
    image-only self-attention (``attn2``): both attentions read the same block input, so one matching
    serves both. ``merge_mlp`` (default False, as ToMe for SD) merges for the image feed-forward too.
    There is no ``max_downsample``: every MMDiT block runs on the same patch grid, so there are no levels
    to choose from. Skip-layer guidance's extra pass runs unmerged (the adapter marks it auxiliary).

PixArt-α/Σ and DiT-XL/2 (``diffusers_dit``): our extension
    ToMe for SD's design on the image tokens of every ``BasicTransformerBlock`` of the patch grid (see
    :class:`DiTMergeLayout`): ``int(ratio * N)`` tokens merged from the block input with one destination per
    ``sy x sx`` window (random unless ``use_rand=False``), before self-attention and unmerged after it; with
    ``merge_crossattn`` PixArt's cross-attention runs on the merged image queries (the T5 text tokens are keys
    and values only and never merged); ``merge_mlp`` for the feed-forward. ``merge_crossattn`` alone on DiT
    (no cross-attention) is an error. No ``max_downsample``: one grid, no levels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from tokred import Method, register_method
from tokred.adapters.diffusers_dit import DiffusersDiTAdapter
from tokred.adapters.diffusers_flux import DiffusersFluxAdapter
from tokred.adapters.diffusers_mmdit import DiffusersMMDiTAdapter
from tokred.adapters.diffusers_unet import DiffusersUNetAdapter
from tokred.adapters.timm_vit import TimmViTAdapter
from tokred.errors import InvalidOptionError, TokredWarning
from tokred.layout import GridMergeLayout
from tokred.merge import GridMerge, alternate_matching, grid_destinations, grid_matching
from tokred.options import int_at_least, is_bool, is_int, is_number, number_in, option
from tokred.reduction import FULL_BLOCK, KEEP, BlockCall, BlockPlan, Grid, Sublayer, TokenReduce


def _is_r_schedule(v: Any) -> bool:
    if is_int(v):
        return v >= 0
    if isinstance(v, list):
        return all(is_int(x) and x >= 0 for x in v)
    if isinstance(v, tuple) and len(v) == 2:
        return is_int(v[0]) and v[0] >= 0 and is_number(v[1]) and -1 <= v[1] <= 1
    return False


def _schedule_total(r: int | list[int] | tuple[int, float]) -> int:
    """What the user asked to merge per block at most: 0 only for the zero-strength schedules."""
    if isinstance(r, list):
        return sum(r)
    return r[0] if isinstance(r, tuple) else r


def parse_r(r: int | list[int] | tuple[int, float], num_layers: int) -> list[int]:
    """Per-layer merge counts, with the official semantics.

    * ``int``: the same ``r`` in every layer;
    * ``list``: one value per layer, padded with zeros;
    * ``(r, inflection)``: a linear schedule with the same total as constant ``r``, from
      ``r * (1 - inflection)`` at the first layer to ``r * (1 + inflection)`` at the last (rounded down):
      ``(r, -1)`` merges ``2r`` first and none last (the decreasing schedule), ``(r, 0)`` is constant.
    """
    if isinstance(r, list):
        if len(r) > num_layers:
            raise InvalidOptionError(f"tome: r has {len(r)} entries but the model has {num_layers} blocks")
        return list(r) + [0] * (num_layers - len(r))
    inflection = 0.0
    if isinstance(r, tuple):
        r, inflection = r
    first = int(r * (1.0 - inflection))
    last = 2 * r - first
    if num_layers == 1:
        return [first]
    step = (last - first) / (num_layers - 1)
    return [int(first + step * i) for i in range(num_layers)]


@dataclass
class ToMeViTOptions:
    r: Any = option(
        13,
        valid="int >= 0, list of ints >= 0 (one per block), or (r, inflection) with inflection in [-1, 1]",
        check=_is_r_schedule,
        doc="tokens merged per block; (r, -1) is the decreasing schedule. ViT-S/B: 8-16 keeps accuracy "
        "within about 1-2 points.",
    )
    prop_attn: bool = option(True, valid="bool", check=is_bool, doc="proportional attention: add log(size)")
    trace_source: bool = option(
        False, valid="bool", check=is_bool, doc="keep patch.adapter.merged_tokens.source: merged -> input tokens"
    )


def checked_schedule(
    method: str, r: int | list[int] | tuple[int, float], depth: int, verb: str = "merged"
) -> list[int]:
    """:func:`parse_r` for a ``depth``-block ViT, refusing an ``r`` that rounds down to 0 in every block (unless it
    asked for 0: the exact identity). Shared by the ViT methods that take ToMe's ``r``."""
    schedule = parse_r(r, depth)
    if not any(schedule) and _schedule_total(r) > 0:
        raise InvalidOptionError(
            f"{method}: r={r!r} rounds down to 0 in every one of the {depth} blocks, so nothing would be {verb}; "
            "use a larger r (or r=0 on purpose, the exact identity)"
        )
    return schedule


def check_ratio(ratio: float, sx: int, sy: int) -> None:
    """A ratio above ``1 - 1/(sx*sy)`` would merge destinations too (tomesd silently caps it)."""
    limit = 1 - 1 / (sx * sy)
    if ratio > limit + 1e-12:
        raise ValueError(
            f"option 'ratio'={ratio} exceeds the maximum 1 - 1/(sx*sy) = {limit:g} for sx={sx}, "
            f"sy={sy}; valid: 0 <= ratio <= {limit:g}"
        )


RATIO_VALID = "0 <= ratio <= 1 - 1/(sx*sy) (0.75 for 2x2 strides)"


@dataclass
class ToMeSDOptions(GridMergeLayout):
    ratio: float = option(
        0.5, valid=RATIO_VALID, check=number_in(0.0, 1.0), doc="fraction of tokens merged; <= 0.5 recommended"
    )

    def validate(self) -> None:
        check_ratio(self.ratio, self.sx, self.sy)
        require_some_sublayer(self)


def require_some_sublayer(opts: Any) -> None:
    """Options that merge for no sublayer reduce nothing: an error, not a silent no-op."""
    flags = [f for f in ("merge_attn", "merge_crossattn", "merge_mlp") if hasattr(opts, f)]
    if not any(getattr(opts, f) for f in flags):
        raise ValueError(
            f"{', '.join(flags[:-1])} and {flags[-1]} are False, so no sublayer would see merged tokens and nothing "
            "would be reduced; set at least one (merge_attn=True is the default and the recommended one)"
        )


def require_cross_attention(adapter: Any, names: set[str] | None, opts: Any, method: str) -> None:
    """``merge_crossattn`` as the only merged sublayer needs blocks (of ``names``; None: all) that have
    cross-attention."""
    if opts.merge_attn or opts.merge_mlp or not opts.merge_crossattn:
        return
    if not any(block.attn2 is not None for name, block in adapter.blocks if names is None or name in names):
        raise InvalidOptionError(
            f"{method}: merge_crossattn=True is the only merged sublayer, but none of the selected blocks has "
            "cross-attention, so nothing would be reduced; set merge_attn=True or merge_mlp=True"
        )


@dataclass
class MMDiTMergeLayout:
    """ToMe for SD's layout options on an MMDiT's image tokens (no levels, no cross-attention).

    One merge per block and call, from the block input on the 2-D patch grid, applied to the image tokens of
    joint attention (``attn``) and of SD3.5's second image self-attention (``attn2``) with ``merge_attn``, and
    of the image feed-forward with ``merge_mlp``. The text stream is never merged.
    """

    sx: int = option(2, valid="int >= 1", check=int_at_least(1), doc="destination stride along x (patch grid)")
    sy: int = option(2, valid="int >= 1", check=int_at_least(1), doc="destination stride along y (patch grid)")
    use_rand: bool = option(True, valid="bool", check=is_bool, doc="random destination in each window")
    merge_attn: bool = option(
        True, valid="bool", check=is_bool, doc="merge image tokens for joint attention and SD3.5's attn2"
    )
    merge_mlp: bool = option(False, valid="bool", check=is_bool, doc="merge for the image MLP (not recommended)")

    def plan(self, merge: GridMerge | None) -> BlockPlan:
        """The block plan that merges before (and unmerges after) the image sublayers these options select."""
        if merge is None:
            return FULL_BLOCK
        # positions: a merged token stands at its destination (Flux's rotary embeddings; ignored on SD3)
        sub = Sublayer(merge, merge.unmerge, positions=merge.kept)
        attn = sub if self.merge_attn else KEEP
        return BlockPlan(attn=attn, attn2=attn, mlp=sub if self.merge_mlp else KEEP)


@dataclass
class ToMeMMDiTOptions(MMDiTMergeLayout):
    ratio: float = option(
        0.5,
        valid=RATIO_VALID,
        check=number_in(0.0, 1.0),
        doc="fraction of image tokens merged (text tokens never are); untested on trained SD3 weights",
    )

    def validate(self) -> None:
        check_ratio(self.ratio, self.sx, self.sy)
        require_some_sublayer(self)


@dataclass
class DiTMergeLayout(MMDiTMergeLayout):
    """ToMe for SD's layout options on a DiT's image tokens (PixArt-α/Σ, DiT-XL/2: no levels, every block on the
    patch grid): merged from the block input with one destination per ``sy x sx`` window, before self-attention
    (``merge_attn``), cross-attention to the text (``merge_crossattn``, PixArt only: its image queries are
    merged, the text keys/values never are) and the MLP (``merge_mlp``), as ToMe for SD's U-Net options."""

    merge_crossattn: bool = option(
        False, valid="bool", check=is_bool, doc="merge the image queries of cross-attention (PixArt; DiT has none)"
    )

    plan = GridMergeLayout.plan  # the U-Net's sublayers (self-attention, cross-attention, MLP), not the MMDiT's


@dataclass
class ToMeDiTOptions(DiTMergeLayout):
    ratio: float = option(
        0.5,
        valid=RATIO_VALID,
        check=number_in(0.0, 1.0),
        doc="fraction of image tokens merged; untested on trained PixArt/DiT weights",
    )

    def validate(self) -> None:
        check_ratio(self.ratio, self.sx, self.sy)
        require_some_sublayer(self)


def has_windows(grid: Grid, sx: int, sy: int) -> bool:
    """Whether the grid holds at least one ``sy x sx`` window (a destination); a smaller grid (a tiny latent
    with large strides) is left unmerged instead of failing on an empty destination set."""
    return grid.h >= sy and grid.w >= sx


class StrideTooLargeWarning(TokredWarning):
    """``sx`` / ``sy`` larger than every merging block's token grid in a denoiser call: nothing is merged."""


class WindowCheck:
    """:func:`has_windows` for each block call of a grid-merging method, with one
    :class:`StrideTooLargeWarning` per patch at the first call in which no block can merge: the grid of the
    highest-resolution merging level (``finest_level``; the largest grid of the call) holds no ``sy x sx``
    window, so no coarser one does either. The grid is known only at call time (latents of any size), so this
    cannot be an error at ``apply``."""

    def __init__(self, method: str, sx: int, sy: int, finest_level: int = 1) -> None:
        self.method, self.sx, self.sy, self.finest_level = method, sx, sy, finest_level
        self.warned = False

    def __call__(self, call: BlockCall) -> bool:
        """Whether this block call's grid (not None) holds a destination window."""
        grid = call.grid
        if grid is None:
            return False
        if has_windows(grid, self.sx, self.sy):
            return True
        if not self.warned and call.level <= self.finest_level:
            self.warned = True
            warnings.warn(
                f"{self.method}: the destination stride sx={self.sx}, sy={self.sy} exceeds the {grid.h}x{grid.w} "
                f"token grid (h x w) of the highest-resolution merging blocks in this call, so no block merges "
                f"any token; use sx <= {grid.w} and sy <= {grid.h} (default sx=sy=2)",
                StrideTooLargeWarning,
                stacklevel=2,
            )
        return False


def finest_merging_level(adapter: Any, names: set[str] | None) -> int:
    """The highest-resolution level among the merging blocks (1 on an MMDiT: every block on the patch grid)."""
    if isinstance(adapter, DiffusersUNetAdapter) and names:
        return min(adapter.level[name] for name in names)
    return 1


@register_method("tome")
class ToMe(Method):
    kind = "merge"
    # Every family: torch.compile(model, fullgraph=True) (tests/test_compile_vit.py, tests/test_compile_diffusion.py);
    # random destinations are drawn through the run state's compiled draws (tokred.state.CompiledDraws).
    compile_support = "fullgraph"
    summary = "Token Merging: bipartite soft matching (ViT, arXiv 2210.09461; SD, arXiv 2303.17604)"
    options = {
        "timm_vit": ToMeViTOptions,
        "diffusers_unet": ToMeSDOptions,
        "diffusers_mmdit": ToMeMMDiTOptions,
        "diffusers_flux": ToMeMMDiTOptions,
    }
    options["diffusers_dit"] = ToMeDiTOptions  # PixArt-α/Σ, DiT-XL/2
    presets = {
        "timm_vit": {"r8": {"r": 8}, "r13": {"r": 13}, "r16-decreasing": {"r": (16, -1)}},
        "diffusers_unet": {"ratio0.3": {"ratio": 0.3}, "ratio0.5": {"ratio": 0.5}, "ratio0.6": {"ratio": 0.6},
                           "ratio0.75": {"ratio": 0.75}},
        "diffusers_mmdit": {"ratio0.3": {"ratio": 0.3}, "ratio0.5": {"ratio": 0.5}, "ratio0.75": {"ratio": 0.75}},
        "diffusers_flux": {"ratio0.3": {"ratio": 0.3}, "ratio0.5": {"ratio": 0.5}, "ratio0.75": {"ratio": 0.75}},
    }
    presets["diffusers_dit"] = {"ratio0.3": {"ratio": 0.3}, "ratio0.5": {"ratio": 0.5}, "ratio0.75": {"ratio": 0.75}}

    def check(self, adapter) -> None:
        if isinstance(adapter, TimmViTAdapter):
            self.schedule = checked_schedule("tome", self.options.r, len(adapter.blocks))
        elif isinstance(adapter, DiffusersUNetAdapter):
            self.merging_blocks = adapter.blocks_up_to(self.options.max_downsample)
            require_cross_attention(adapter, self.merging_blocks, self.options, "tome")
        elif isinstance(adapter, (DiffusersMMDiTAdapter, DiffusersFluxAdapter)):
            self.merging_blocks = None  # every joint/Flux block: they all run on the same patch grid
        elif isinstance(adapter, DiffusersDiTAdapter):
            self.merging_blocks = None  # every block of a PixArt / DiT runs on the same patch grid
            require_cross_attention(adapter, None, self.options, "tome")
        if not isinstance(adapter, TimmViTAdapter):
            self.finest_level = finest_merging_level(adapter, self.merging_blocks)

    def install(self, patch) -> None:
        if isinstance(patch.adapter, TimmViTAdapter):
            schedule, num_protected = self.schedule, patch.adapter.num_protected

            def plan(call: BlockCall, x) -> BlockPlan:
                r = schedule[call.index]
                if r <= 0:
                    return FULL_BLOCK
                return BlockPlan(tokens=TokenReduce(lambda scores: alternate_matching(scores.keys, r, num_protected)))

            patch.adapter.install_blocks(
                patch, plan, prop_attn=self.options.prop_attn, trace_source=self.options.trace_source,
                may_reduce=any(schedule),
            )  # fmt: skip
        else:
            patch.adapter.install_blocks(patch, self.planner(patch.state), self.merging_blocks)

    def planner(self, state):
        """Grid merging on a U-Net's or an MMDiT's image tokens (the layout options build the plan)."""
        opts: ToMeSDOptions | ToMeMMDiTOptions = self.options
        windows = WindowCheck("tome", opts.sx, opts.sy, getattr(self, "finest_level", 1))

        def plan(call: BlockCall, x) -> BlockPlan:
            r = int(x.shape[1] * opts.ratio)
            if call.grid is None or r <= 0 or not windows(call):
                return FULL_BLOCK
            # An odd batch cannot hold matching cond/uncond halves; random destinations would differ
            # between them and leave artifacts, so tomesd (and we) fall back to top-left.
            use_rand = opts.use_rand and x.shape[0] % 2 == 0
            generator = state.generator(x.device) if use_rand else None
            a_idx, b_idx = grid_destinations(call.grid.h, call.grid.w, opts.sx, opts.sy, generator, x.device)
            return opts.plan(grid_matching(x, a_idx, b_idx, r=r))

        return plan
