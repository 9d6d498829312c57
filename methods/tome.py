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
    * grids that do not match the latent size (odd sizes) are left unmerged instead of crashing;
    * ``max_downsample`` defaults to the U-Net's highest-resolution transformer level (tomesd: always 1, which
      on SDXL merges nothing), and a value that selects no block is an error at ``apply``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokred import Method, register_method
from tokred.adapters.diffusers_unet import DiffusersUNetAdapter
from tokred.adapters.timm_vit import TimmViTAdapter
from tokred.errors import InvalidOptionError
from tokred.layout import GridMergeLayout
from tokred.merge import alternate_matching, grid_destinations, grid_matching
from tokred.options import is_bool, is_int, is_number, number_in, option
from tokred.reduction import FULL_BLOCK, BlockCall, BlockPlan


def _is_r_schedule(v: Any) -> bool:
    if is_int(v):
        return v >= 0
    if isinstance(v, list):
        return all(is_int(x) and x >= 0 for x in v)
    if isinstance(v, tuple) and len(v) == 2:
        return is_int(v[0]) and v[0] >= 0 and is_number(v[1]) and -1 <= v[1] <= 1
    return False


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


@dataclass
class ToMeSDOptions(GridMergeLayout):
    ratio: float = option(
        0.5,
        valid="0 <= ratio <= 1 - 1/(sx*sy) (0.75 for 2x2 strides)",
        check=number_in(0.0, 1.0),
        doc="fraction of tokens merged; <= 0.5 recommended",
    )

    def validate(self) -> None:
        limit = 1 - 1 / (self.sx * self.sy)
        if self.ratio > limit + 1e-12:
            raise ValueError(
                f"option 'ratio'={self.ratio} exceeds the maximum 1 - 1/(sx*sy) = {limit:g} for sx={self.sx}, "
                f"sy={self.sy}; valid: 0 <= ratio <= {limit:g}"
            )


@register_method("tome")
class ToMe(Method):
    summary = "Token Merging: bipartite soft matching (ViT, arXiv 2210.09461; SD, arXiv 2303.17604)"
    options = {"timm_vit": ToMeViTOptions, "diffusers_unet": ToMeSDOptions}
    presets = {
        "timm_vit": {"r8": {"r": 8}, "r13": {"r": 13}, "r16-decreasing": {"r": (16, -1)}},
        "diffusers_unet": {"ratio0.3": {"ratio": 0.3}, "ratio0.5": {"ratio": 0.5}, "ratio0.6": {"ratio": 0.6}},
    }

    def check(self, adapter) -> None:
        if isinstance(adapter, TimmViTAdapter):
            self.schedule = parse_r(self.options.r, len(adapter.blocks))
        elif isinstance(adapter, DiffusersUNetAdapter):
            self.merging_blocks = adapter.blocks_up_to(self.options.max_downsample)

    def install(self, patch) -> None:
        if isinstance(patch.adapter, TimmViTAdapter):
            schedule, num_protected = self.schedule, patch.adapter.num_protected

            def choose(call: BlockCall, metric):
                r = schedule[call.index]
                return alternate_matching(metric, r, num_protected) if r > 0 else None

            patch.adapter.install_merging(
                patch, choose, self.options.prop_attn, self.options.trace_source, may_merge=any(schedule)
            )
        else:
            patch.adapter.install_blocks(patch, self.planner(patch.state), self.merging_blocks)

    def planner(self, state):
        opts: ToMeSDOptions = self.options

        def plan(call: BlockCall, x) -> BlockPlan:
            r = int(x.shape[1] * opts.ratio)
            if call.grid is None or r <= 0:
                return FULL_BLOCK
            # An odd batch cannot hold matching cond/uncond halves; random destinations would differ
            # between them and leave artifacts, so tomesd (and we) fall back to top-left.
            use_rand = opts.use_rand and x.shape[0] % 2 == 0
            generator = state.generator(x.device) if use_rand else None
            a_idx, b_idx = grid_destinations(call.grid.h, call.grid.w, opts.sx, opts.sy, generator, x.device)
            return opts.plan(grid_matching(x, a_idx, b_idx, r=r))

        return plan
