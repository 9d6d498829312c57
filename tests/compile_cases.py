"""Tiny denoisers and a bare generation loop for the torch.compile checks (issue 20).

A *case* is a model family's tiny denoiser and the inputs of its calls: ``build()`` makes the model (the same
weights every time), ``call(model, step, t)`` runs one denoiser call of a classifier-free-guided generation
(batch 2, a tensor timestep as the pipelines pass it, a latent that changes every step). :func:`generate` runs
``steps`` such calls with the timestep walking down, as a sampler does, and returns the outputs.
Shared by ``tests/test_compile_diffusion.py`` and ``benchmarks/compile_matrix.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import tokred
import tokred.methods  # noqa: F401  (registers the built-in methods)

BATCH = 2  # classifier-free guidance: the unconditional and the conditional row


@dataclass(frozen=True)
class Case:
    family: str  # the tokred family
    label: str  # the architecture, for tables
    build: Callable[[], torch.nn.Module]
    call: Callable[[torch.nn.Module, int, torch.Tensor], torch.Tensor]


def _inputs(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sd15(layers_per_block: int = 2) -> Case:
    from tiny_models import tiny_sd_unet

    x, text = _inputs(1, BATCH, 4, 16, 16), _inputs(2, BATCH, 6, 32)

    def call(model, i, t):
        return model(x + 0.1 * i, t, encoder_hidden_states=text).sample

    label = "SD1.5 U-Net" + ("" if layers_per_block == 2 else f" ({layers_per_block} layer per block)")
    return Case("diffusers_unet", label, lambda: tiny_sd_unet(layers_per_block=layers_per_block), call)


def small_sd15() -> Case:
    """SD1.5's layout with one layer per block (half the blocks): the same code paths, half the tracing time."""
    return _sd15(layers_per_block=1)


def _sdxl() -> Case:
    from tiny_sdxl import TEXT_WIDTH, sdxl_added_cond, tiny_sdxl_unet

    x, text = _inputs(1, BATCH, 4, 16, 16), _inputs(2, BATCH, 6, 2 * TEXT_WIDTH)
    added = sdxl_added_cond(BATCH, 32, 32)

    def call(model, i, t):
        return model(x + 0.1 * i, t, encoder_hidden_states=text, added_cond_kwargs=added).sample

    return Case("diffusers_unet", "SDXL U-Net", tiny_sdxl_unet, call)


def _sd3() -> Case:
    from tiny_sd3 import tiny_sd3_transformer

    x, text, pooled = _inputs(1, BATCH, 16, 16, 16), _inputs(2, BATCH, 6, 64), _inputs(3, BATCH, 64)

    def call(model, i, t):
        return model(hidden_states=x + 0.1 * i, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=t.expand(BATCH)).sample

    return Case("diffusers_mmdit", "SD3 MMDiT", tiny_sd3_transformer, call)


def _pixart() -> Case:
    from tiny_dit import TEXT_WIDTH, pixart_added_cond, tiny_pixart_transformer

    x, text = _inputs(1, BATCH, 4, 16, 16), _inputs(2, BATCH, 6, TEXT_WIDTH)
    added = pixart_added_cond(BATCH, 128, 128)

    def call(model, i, t):
        return model(x + 0.1 * i, encoder_hidden_states=text, timestep=t.expand(BATCH), added_cond_kwargs=added).sample

    return Case("diffusers_dit", "PixArt-Σ DiT", tiny_pixart_transformer, call)


def _flux() -> Case:
    from tiny_flux import image_ids, smooth_tokens, tiny_flux_transformer

    g = torch.Generator().manual_seed(1)
    x = smooth_tokens(BATCH, 8, 8, 16, g)
    text, pooled = torch.randn(BATCH, 6, 32, generator=g), torch.randn(BATCH, 32, generator=g)
    img_ids, txt_ids = image_ids(8, 8), torch.zeros(6, 3)
    guidance = torch.full((BATCH,), 3.5)

    def call(model, i, t):
        return model(hidden_states=x + 0.1 * i, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=t.expand(BATCH) / 1000, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample

    return Case("diffusers_flux", "Flux.1 (dev layout)", tiny_flux_transformer, call)


def _vit() -> Case:
    """A DeiT-like tiny ViT; its "generation" is a run of classification batches (a new batch every call)."""
    from tiny_models import tiny_timm_vit

    images = _inputs(1, 8, 3, 32, 32)

    def call(model, i, t):
        return model(images + 0.1 * i)

    return Case("timm_vit", "ViT (DeiT-S layout)", lambda: tiny_timm_vit("vit_small_patch16_224"), call)


CASES: dict[str, Callable[[], Case]] = {"sd15": _sd15, "sdxl": _sdxl, "sd3": _sd3, "pixart": _pixart, "flux": _flux}
VIT_CASE = _vit
# Every registered method with timm ViT options (a new ViT method joins the checks and the matrix by registering).
VIT_METHODS = tuple(
    name for name in tokred.list_methods() if "timm_vit" in getattr(tokred.get_method(name), "options", {})
)

# The diffusion methods and compositions, with the options the checks use (the coverage matrix's: CAT prunes from
# call 3, the first-block cache reuses on these random weights, the broadcast's window spans the generation).
METHODS: dict[str, dict[str, Any]] = {
    "tome": {},
    "todo": {},
    "ca_tome": {},
    "cat_pruning": {"t0": 2},
    "deepcache": {},
    "first_block_cache": {"threshold": 0.5},
    "pab": {"spatial_attention_timestep_skip_range": (0, 1000)},
    "deepcache+tome": {},
    "deepcache+todo": {},
    "first_block_cache+todo": {"first_block_cache.threshold": 0.5},
}


def timesteps(steps: int) -> list[torch.Tensor]:
    """``steps`` timesteps from 999 down, as 0-d tensors (what a pipeline's scheduler yields)."""
    return [torch.tensor(999.0 * (steps - i) / steps) for i in range(steps)]


def generate(model: Any, case: Case, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """One generation of ``steps`` denoiser calls; the global RNG is seeded first (ToMe forks its random
    destinations from it), so two runs with the same seed draw the same."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return [case.call(model, i, t) for i, t in enumerate(timesteps(steps))]


def max_relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest ``|a - b| / max|a|`` over the calls (relative to each call's output scale)."""
    return max(float((x - y).abs().max() / x.abs().max().clamp_min(1e-12)) for x, y in zip(a, b, strict=True))
