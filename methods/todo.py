"""ToDo: Token Downsampling for efficient high-resolution generation (Smith, Saxena, Saha; arXiv 2402.13573).

In the self-attention of the selected transformer blocks the queries keep every token, while the keys and values
are projected from the token grid downsampled by ``downsample_factor`` along each side (``h x w`` ->
``h//f x w//f``), so attention costs ``1/f**2`` of its dense cost and no unmerge is needed. Cross-attention and
the MLP are untouched. The downsampling acts on the attention input, before the key/value projections, as the
official code does (for the linear modes this equals downsampling the projected keys and values).

Options (official names and defaults)
    ``downsample_factor`` (2; 1 computes exactly the unpatched model), ``downsample_method`` (``"nearest-exact"``:
    one token per ``f x f`` window, its centre for odd ``f``; ``"nearest"``: the window's top-left token;
    ``"area"``: the window mean; ``"bilinear"``, ``"bicubic"``: ``F.interpolate``'s modes; ``"max_pool"``: the
    window maximum), ``timestep_threshold_stop`` (0.0: downsample while ``timestep / 1000`` is above it, so ``0.2``
    leaves the last fifth of the schedule dense). U-Net only: ``max_downsample``, the levels downsampled, as ToMe's.

Where we differ from the official code (github ethansmith2000/ImprovedTokenMerge) and the paper
    * Levels. The official code picks blocks by channel count (320 or 640: SD 1.x/2.x's two top levels) or by
      token count in its last version, downsamples level 1 by ``downsample_factor`` and level 2 by a second
      factor ``downsample_factor_level_2`` (default 1: off), which on SDXL (no attention at level 1) means nothing
      is downsampled by default. We take levels from the U-Net's architecture: ``max_downsample=None`` is the
      highest-resolution level with transformer blocks (1 on SD 1.x/2.x, the official default; 2 on SDXL), and
      ``max_downsample=2`` downsamples levels 1 and 2 by the same factor (no separate factor per level).
    * Time. The paper downsamples at every step. The official code's first release (``nearest-exact``, our
      default) switched to ToMe-style similarity merging of the keys and values once ``timestep / 1000 <= 0.2``;
      its demo turns that off and its last version removed it, keeping only ``timestep_threshold_stop`` (ours).
      We do not offer the similarity switch: the default follows the paper and the last official version.
    * Grids. A grid that does not fill the latent (odd sizes) or is smaller than the factor is left dense (the
      official code would fail); ``area`` on sides the factor does not divide averages uneven windows.
    * SD3 (``diffusers_mmdit``), beyond the paper: the image stream's keys and values in joint attention (and in
      SD3.5's second image self-attention) come from the downsampled patch grid; the text tokens are untouched.
    * PixArt-α/Σ and DiT-XL/2 (``diffusers_dit``), beyond the paper: self-attention's keys and values in every
      block come from the downsampled patch grid (PixArt's cross-attention to the text is untouched). At 1024 px
      PixArt-Σ's patch grid is 64 x 64, SD 1.5's top level at 512 px.
    * Flux.1 (``diffusers_flux``), beyond the paper: the same in the dual- and single-stream blocks (the image rows
      of the single-stream sequence). The keys carry rotary embeddings, and their tables (cos, sin) are
      downsampled with the same method as the tokens: ``nearest-exact`` / ``nearest`` give each key the phase of
      the token it was taken from; ``area``, ``bilinear``, ``bicubic`` interpolate the rotation factors as the
      tokens are interpolated (a window's mean rotation: the centre phase, damped at high frequencies, as if the
      rotated keys were averaged); ``max_pool`` uses ``area`` for the tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokred import Method, register_method
from tokred.adapters.diffusers_unet import DiffusersUNetAdapter
from tokred.layout import max_downsample_option
from tokred.options import int_at_least, number_in, one_of, option
from tokred.reduction import FULL_BLOCK, BlockCall, BlockPlan, Grid, KeyValue

DOWNSAMPLE_METHODS = ("nearest-exact", "nearest", "area", "bilinear", "bicubic", "max_pool")
ROTARY_METHOD = {"max_pool": "area"}  # how Flux's rotary tables are downsampled where it is not the tokens' method


def downsample(tokens: torch.Tensor, grid: Grid, factor: int, method: str) -> torch.Tensor:
    """Tokens [B, h*w, C] in row-major order on ``grid`` -> [B, (h//factor) * (w//factor), C]."""
    b, _, c = tokens.shape
    image = tokens.reshape(b, grid.h, grid.w, c).permute(0, 3, 1, 2)  # a channels-last view, no copy
    if method == "max_pool":
        small = F.max_pool2d(image, factor)
    else:
        small = F.interpolate(image, size=(grid.h // factor, grid.w // factor), mode=method)
    return small.permute(0, 2, 3, 1).reshape(b, -1, c)


@dataclass
class ToDoOptions:
    downsample_factor: int = option(
        2,
        valid="int >= 1",
        check=int_at_least(1),
        doc="keys/values from the grid downsampled this many times per side; 1: no change. The paper uses 2, 3, "
        "4 at 1024, 1536, 2048 px (SD 1.5); 2 recommended up to about 1024 px",
    )
    downsample_method: str = option(
        "nearest-exact",
        valid=", ".join(DOWNSAMPLE_METHODS),
        check=one_of(*DOWNSAMPLE_METHODS),
        doc="how a window becomes one key/value token: one token of it (nearest-exact: the centre), its mean "
        "(area), an interpolation, or its maximum (max_pool)",
    )
    timestep_threshold_stop: float = option(
        0.0,
        valid="0 <= value <= 1",
        check=number_in(0.0, 1.0),
        doc="downsample only while timestep/1000 > this; 0: every step (official default)",
    )


@dataclass
class ToDoUNetOptions(ToDoOptions):
    max_downsample: int | None = max_downsample_option(
        "downsample in the transformer blocks with at most this downsampling; None: the highest-resolution "
        "level with transformer blocks (1 on SD 1.x/2.x, the official default; 2 on SDXL)"
    )


class TimestepCutoff:
    """Whether the current denoiser call downsamples (its timestep is above ``timestep_threshold_stop``), decided
    by a pre-hook on the denoiser before the call, outside a compiled forward: the compiled forward reads this bool
    (two values, at most two graphs), not the timestep itself, which would be a guard on a new float at every step."""

    def __init__(self, stop: float) -> None:
        self.stop = stop
        self.downsampling = True

    def follow(self, timestep: float | None) -> None:
        self.downsampling = not (timestep is not None and timestep / 1000 <= self.stop)


@register_method("todo")
class ToDo(Method):
    kind = "downsample"
    compile_support = "fullgraph"  # the timestep cutoff is decided before the call (TimestepCutoff)
    summary = "ToDo: token downsampling of self-attention keys/values for diffusion (arXiv 2402.13573)"
    options = {"diffusers_unet": ToDoUNetOptions, "diffusers_mmdit": ToDoOptions, "diffusers_flux": ToDoOptions}
    options["diffusers_dit"] = ToDoOptions  # PixArt-α/Σ, DiT-XL/2: every block on the patch grid
    presets = {
        family: {
            "factor2": {"downsample_factor": 2},
            "factor2-area": {"downsample_factor": 2, "downsample_method": "area"},
            "factor3": {"downsample_factor": 3},
            "factor4": {"downsample_factor": 4},
        }
        for family in ("diffusers_unet", "diffusers_mmdit", "diffusers_dit", "diffusers_flux")
    }

    def check(self, adapter) -> None:
        if isinstance(adapter, DiffusersUNetAdapter):
            self.blocks: set[str] | None = adapter.blocks_up_to(self.options.max_downsample)
        else:
            self.blocks = None  # every joint block of an MMDiT, every block of a PixArt / DiT
        adapter.require_kv_hooks(self.blocks, "todo")

    def install(self, patch) -> None:
        cutoff, state = TimestepCutoff(self.options.timestep_threshold_stop), patch.state
        # after the run state's own pre-hook (registered at attach), which reads this call's timestep
        patch.register_forward_pre_hook(
            patch.adapter.root, lambda module, args, kwargs: cutoff.follow(state.last_timestep), with_kwargs=True,
            outside_compile=True,
        )
        patch.adapter.install_blocks(patch, self.planner(cutoff), self.blocks)

    def planner(self, cutoff: TimestepCutoff):
        factor, method = self.options.downsample_factor, self.options.downsample_method

        def plan(call: BlockCall, x: torch.Tensor) -> BlockPlan:
            grid = call.grid
            if factor == 1 or grid is None or min(grid.h, grid.w) < factor or not cutoff.downsampling:
                return FULL_BLOCK
            kv = KeyValue(
                tokens=lambda tokens: downsample(tokens, grid, factor, method),
                # Flux: the keys' rotary tables downsampled alike (a maximum of cos/sin is no rotation: area)
                positions=lambda table: downsample(table, grid, factor, ROTARY_METHOD.get(method, method)),
            )
            return BlockPlan(kv=kv, kv2=kv)  # kv2: SD3.5's second image self-attention

        return plan
