"""ToMe-for-SD's layout options (tomesd's names and defaults), shared by the grid-merging methods (ToMe and
CA-ToMe on U-Nets): which levels merge, the destination stride, random destinations, which sublayers see the
merged tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .merge import GridMerge
from .options import int_at_least, is_bool, one_of, option, optional
from .reduction import FULL_BLOCK, KEEP, BlockPlan, Sublayer

MAX_DOWNSAMPLE_VALID = (
    "None (the highest-resolution level with transformer blocks: 1 on SD 1.x/2.x, 2 on SDXL), 1, 2, 4 or 8"
)


def max_downsample_option(doc: str) -> Any:
    """The U-Net level option every method shares (None: the adapter's default level); ``doc`` says what acts."""
    return option(None, valid=MAX_DOWNSAMPLE_VALID, check=optional(one_of(1, 2, 4, 8)), doc=doc)


@dataclass
class GridMergeLayout:
    max_downsample: int | None = max_downsample_option(
        "merge in the transformer blocks with at most this downsampling; None: the highest-resolution level "
        "that has transformer blocks (tomesd's 1 on SD 1.x/2.x)"
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
        sub = Sublayer(merge, merge.unmerge)
        return BlockPlan(
            attn=sub if self.merge_attn else KEEP,
            cross=sub if self.merge_crossattn else KEEP,
            mlp=sub if self.merge_mlp else KEEP,
        )
