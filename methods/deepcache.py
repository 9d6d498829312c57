"""DeepCache: accelerating diffusion models for free (Ma, Fang, Wang; arXiv 2312.00858).

A U-Net's deep features change slowly from one denoising step to the next. On a *full* step the whole U-Net runs
and the feature entering the shallow part of one up block is kept; on the other steps only the shallow branch
runs: the down path as far as that branch, then the kept feature in place of everything deeper (the rest of the
down path, the mid block, the deeper up blocks), then the rest of the up path. The skipped modules are whole
resnets, transformers, samplers and blocks, so their tokens are not reduced but not computed at all.

Options (official names and defaults, official code github.com/horseee/DeepCache, ``DeepCacheSDHelper``)
    ``cache_interval`` (3): a full step every ``cache_interval`` denoiser calls, the others reuse; 1 is the unpatched
    model. The paper uses 2 to 10 on SD 1.5 (quality drops slowly; 3 to 5 recommended; DDIM 100 steps takes up
    to 10). ``cache_branch_id`` (0): which skip branch stays live, ``cache_block_id = branch // 3`` (the level,
    from the top) and ``cache_layer_id = branch % 3`` (the layer of that level's up block, counted from its skip
    connection's top); 0, the shallowest, skips the most and is what the paper recommends; larger ids keep more
    of the U-Net (SD 1.x/2.x: 0 to 11, SDXL: 0 to 8). ``uniform`` (True): full steps at calls 1, 1 + k, 1 + 2k,
    ... (k = ``cache_interval``). ``uniform=False`` is the paper's non-uniform schedule (its Fig. 6, for large
    intervals), ``pow`` (1.4) and ``center`` (15) shaping it as in the official pipeline: with N the
    generation's steps and S = ceil(N / k) full steps wanted, the full steps (0-based) are 0 and ``center +
    trunc(Re(x ** p))`` for the distinct values between the first and the last, where x runs over S + 1 evenly
    spaced points from ``(-center) ** (1/p)`` to ``(N - center) ** (1/p)`` (principal complex roots); p starts at
    ``pow`` and drops by 0.02 until exactly S steps come out (an error when it reaches 1). Full steps are dense
    around step ``center`` and sparse at both ends. It needs N, so it needs a pipeline (its scheduler).

Where we differ from the official helper (``DeepCacheSDHelper`` of the ``DeepCache`` 0.1.1 package)
    * The step. The helper finds the step as the index of the U-Net's positional timestep in
      ``pipe.scheduler.timesteps``; we count denoiser calls (``patch.state.step``, reset every generation). The
      two agree on every scheduler that gives each call its own timestep (DDIM, PNDM, Euler, DPM-Solver++, ...),
      on the first generation after ``apply`` (also img2img) and on every text-to-image generation (tested equal
      to the helper). They differ where the helper's lookup is a quirk: on schedulers that repeat timesteps
      (Heun, DPM2: the helper gives both calls of a step the index of the first), and on later img2img
      generations of another strength (the helper keeps counting from the first generation's start, so their
      first call may reuse the previous image's features); ours always starts a generation with a full step.
      A bare U-Net works too (the helper needs a pipeline); so does a U-Net called with keyword arguments only.
    * The schedule. The helper supports only the uniform one; ``uniform=False`` follows the official pipeline
      (``pipeline_stable_diffusion.py``), counting N as the generation's denoiser calls.
    * What is kept. The helper keeps the output of every wrapped module; we keep a copy of the one feature that
      is read and the shapes of the others (the skipped modules return uninitialised tensors of those shapes to
      computations whose results are discarded), so the cache costs one feature map. The copy is made in and out,
      so in-place consumers (FreeU's backbone scaling, T2I-Adapter's ``sample +=``) cannot change it; the helper
      keeps the tensor itself, and FreeU's in-place scaling compounds on it at every reused step.
    * A call whose ``sample`` shape differs from the last full step's (a new batch size or resolution within a
      generation) runs in full instead of reusing features of another shape.
    * Paused calls (``patch.pause()``) run the unpatched model and leave the cache and the step count alone.

Token counts: every transformer block records its tokens when it runs; on a reusing call, the blocks inside the
skipped modules record 0 computed tokens in every sublayer (their means over a generation show the saving).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokred import Method, register_method
from tokred.adapters.base import pipeline_scheduler
from tokred.adapters.diffusers_unet import DiffusersUNetAdapter, ModuleCache, UNetPart
from tokred.errors import InvalidOptionError, UnsupportedModelError
from tokred.options import int_at_least, is_bool, is_number, option

# The block classes whose forward runs its layers as unet_parts numbers them (SD 1.x/2.x, SDXL).
SUPPORTED_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "UNetMidBlock2D",
                    "CrossAttnUpBlock2D", "UpBlock2D")  # fmt: skip


@dataclass
class DeepCacheOptions:
    cache_interval: int = option(
        3,
        valid="int >= 1",
        check=int_at_least(1),
        doc="a full step every this many denoiser calls, the others reuse the deep feature; 1: the unpatched "
        "model. The paper uses 2 to 10; 3 to 5 recommended (quality drops slowly with it)",
    )
    cache_branch_id: int = option(
        0,
        valid="int >= 0, below 3 x the U-Net's up blocks",
        check=int_at_least(0),
        doc="the skip branch that stays live: level branch // 3 from the top, layer branch % 3 of its up block; "
        "0 (shallowest, fastest) recommended; SD 1.x/2.x 0-11, SDXL 0-8",
    )
    uniform: bool = option(
        True,
        valid="bool",
        check=is_bool,
        doc="full steps every cache_interval calls; False: the paper's non-uniform schedule (pow, center), "
        "which needs a pipeline",
    )
    pow: float = option(
        1.4,
        valid="number > 1",
        check=lambda v: is_number(v) and v > 1,
        doc="non-uniform schedule only: the exponent that concentrates full steps around center (lowered by "
        "0.02 until the schedule has ceil(steps / cache_interval) full steps); official 1.4",
    )
    center: int = option(
        15,
        valid="int >= 0",
        check=int_at_least(0),
        doc="non-uniform schedule only: the step (0-based) around which full steps are densest; official 15",
    )


class DeepCacheState(ModuleCache):
    """The kept outputs (:class:`~tokred.adapters.diffusers_unet.ModuleCache`) and this generation's non-uniform
    full steps (0-based; None until the first call computes them)."""

    def reset(self) -> None:
        super().reset()
        self.full_steps: frozenset[int] | None = None


def nonuniform_full_steps(steps: int, cache_interval: int, center: int, power: float) -> list[int]:
    """The 0-based full steps of the paper's non-uniform schedule for a generation of ``steps`` denoiser calls
    (the official pipeline's ``sample_from_quad_center``; see the module docstring for the formula)."""
    import numpy as np  # diffusers' own dependency, present wherever a U-Net is

    wanted = -(-steps // cache_interval)
    while power > 1:
        points = np.linspace((-center) ** (1 / power), (steps - center) ** (1 / power), wanted + 1)
        values = np.unique(np.real(points**power).astype(np.int32))  # truncated towards zero, sorted, distinct
        full = [0] + [int(v) + center for v in values[1:-1]]
        if len(full) == wanted:
            return full
        power -= 0.02
    raise InvalidOptionError(
        f"deepcache: no non-uniform schedule of {wanted} full steps in {steps} steps with center={center}; "
        "lower center or raise pow (or use uniform=True)"
    )


def skipped(part: UNetPart, block_id: int, layer_id: int) -> bool:
    """Whether the official helper's rule skips ``part`` on a reusing step (a whole block counts as layer 0): the
    mid block and every level deeper than ``block_id``; at that level, down layers from ``layer_id`` on and up
    layers above ``layer_id``."""
    if part.kind == "mid" or part.block > block_id:
        return True
    if part.block < block_id:
        return False
    layer = part.layer or 0
    return layer >= layer_id if part.kind == "down" else layer > layer_id


@register_method("deepcache")
class DeepCache(Method):
    kind = "cache"
    # the reuse decision is made before the call (a pre-hook outside the compiled graph): two graphs, full and reusing
    compile_support = "fullgraph"
    summary = "DeepCache: reuse the U-Net's deep features across steps, run only the shallow branch (arXiv 2312.00858)"
    options = {"diffusers_unet": DeepCacheOptions}
    # a ladder, mild to strong: a full step every 2, 3 or 5 denoiser calls
    presets = {"diffusers_unet": {f"interval{k}": {"cache_interval": k, "cache_branch_id": 0} for k in (2, 3, 5)}}
    refusals = {
        "diffusers_dit": "U-Net only: it caches the deep features behind a U-Net's skip connections, which a DiT "
        "does not have",
    }
    State = DeepCacheState

    def warmup_calls(self) -> int:
        return 0  # the first call is a full one, as every cache_interval-th is: no steady state to reach

    def cycle_calls(self) -> int | None:
        # uniform: one full call and cache_interval - 1 reusing ones, the same in every window of that many calls;
        # the non-uniform schedule has no period (its full steps depend on the generation's length)
        return self.options.cache_interval if self.options.uniform else None

    def check(self, adapter: DiffusersUNetAdapter) -> None:
        unet = adapter.root
        for part in adapter.unet_parts():
            if part.layer is None and type(part.module).__name__ not in SUPPORTED_BLOCKS:
                raise UnsupportedModelError(
                    f"deepcache: {part.name} is a {type(part.module).__name__}; supported blocks: "
                    f"{', '.join(SUPPORTED_BLOCKS)} (the SD 1.x/2.x and SDXL U-Nets)"
                )
        branch = self.options.cache_branch_id
        self.block_id, self.layer_id = branch // 3, branch % 3
        ups = len(unet.up_blocks)
        if self.block_id >= ups or self.layer_id >= len(unet.up_blocks[ups - 1 - self.block_id].resnets):
            raise InvalidOptionError(
                f"deepcache: cache_branch_id={branch} names level {self.block_id}, layer {self.layer_id}; this "
                f"U-Net has {ups} up blocks of {[len(b.resnets) for b in reversed(unet.up_blocks)]} layers (from "
                f"the top); valid: 0 <= cache_branch_id < {3 * ups} with branch % 3 below the level's layers"
            )
        if not self.options.uniform and pipeline_scheduler(adapter.container, unet) is None:
            raise InvalidOptionError(
                "deepcache: uniform=False needs each generation's number of steps, which a pipeline's scheduler "
                "gives; apply it to the pipeline, not to the bare U-Net (or use uniform=True)"
            )
        parts = [p for p in adapter.unet_parts() if skipped(p, self.block_id, self.layer_id)]
        whole = {(p.kind, p.block) for p in parts if p.layer is None}
        self.names = [p.name for p in parts if p.layer is None or (p.kind, p.block) not in whole]
        self.feature = self.names[-1]  # the last skipped module: its output enters the live up layers

    def install(self, patch) -> None:
        patch.adapter.install_module_cache(patch, self.names, self.feature, self.reuse_step(patch), patch.method_state)

    def reuse_step(self, patch):
        state, cache = patch.state, patch.method_state
        interval, uniform = self.options.cache_interval, self.options.uniform
        center, power = self.options.center, float(self.options.pow)

        def reuse() -> bool:
            if interval == 1:
                return False
            if uniform:
                return (state.step - 1) % interval != 0
            if cache.full_steps is None:
                if state.expected_calls is None:
                    raise InvalidOptionError(
                        "deepcache: uniform=False needs the generation's number of steps and the pipeline's "
                        "scheduler gave none"
                    )
                cache.full_steps = frozenset(nonuniform_full_steps(state.expected_calls, interval, center, power))
            return state.step - 1 not in cache.full_steps

        return reuse
