"""The real architectures of the denoisers people run, as keyword arguments of their diffusers classes, and the
inputs of one classifier-free-guidance step at a given resolution.

For speed measurements without downloads: the model is built from its configuration with random weights
(:func:`build`), on any device, including ``meta`` (no memory; for parameter counts and shape checks).
Random weights say nothing about quality, and for methods whose work depends on the activations (CA-ToMe's
threshold) nothing about how much they reduce on the trained model.

============  ======================================  ==================  ====================================
name          model                                   class               one CFG step (batch 2)
============  ======================================  ==================  ====================================
``sd15``      Stable Diffusion 1.5's U-Net (860M)     UNet2DConditionModel  latents, 77 CLIP tokens of 768
``sdxl``      SDXL base 1.0's U-Net (2.57B)           UNet2DConditionModel  + ``added_cond_kwargs`` (pooled 1280,
                                                                            time ids), 77 tokens of 2048
``sd3``       SD3-medium's MMDiT (2.03B)              SD3Transformer2DModel  16-channel latents, 77 CLIP + 256 T5
                                                                             tokens of 4096, pooled 2048
============  ======================================  ==================  ====================================

The configurations are those of the published ``config.json`` files (stable-diffusion-v1-5, stabilityai/
stable-diffusion-xl-base-1.0 ``unet/``, stabilityai/stable-diffusion-3-medium-diffusers ``transformer/``), written
out here so that no download is needed; options that equal diffusers' defaults are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def sd15_unet_config() -> dict[str, Any]:
    """Stable Diffusion 1.5's ``UNet2DConditionModel`` (diffusers' defaults are SD1.x's, plus the text width)."""
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def sdxl_unet_config() -> dict[str, Any]:
    """SDXL base 1.0's ``UNet2DConditionModel``: no attention at full resolution, 1/2/10 transformer layers per
    level, two text encoders' 768 + 1280 = 2048-wide tokens, and the ``text_time`` added conditioning (the
    pooled 1280-wide text embedding plus six size/crop numbers embedded to 256 each: 1280 + 6 * 256 = 2816)."""
    return dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),  # read by diffusers as the number of heads per level (64 channels each)
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_embed_type_num_heads=64,
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
    )


def sd3_medium_transformer_config() -> dict[str, Any]:
    """SD3-medium's ``SD3Transformer2DModel``: 2x2 patches of 16-channel latents, 24 joint blocks of 24 heads x 64
    (width 1536), T5/CLIP tokens of 4096 projected to 1536, pooled CLIP projections of 2048."""
    return dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=192,
    )


# --- one CFG step ----------------------------------------------------------------------------------------------
def _latent_side(resolution: int, vae_scale: int = 8) -> int:
    if resolution % vae_scale:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's scale factor {vae_scale}")
    return resolution // vae_scale


def sd15_unet_inputs(
    resolution: int = 512, batch: int = 2, seed: int = 0, device: Any = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """``UNet2DConditionModel.forward`` keyword arguments for one CFG step of SD1.5 (the batch holds the
    unconditional and conditional halves): random latents, timestep 500, 77 random CLIP tokens of 768."""
    g = torch.Generator().manual_seed(seed)
    side = _latent_side(resolution)
    return dict(
        sample=torch.randn(batch, 4, side, side, generator=g).to(device, dtype),
        timestep=torch.tensor(500, device=device),
        encoder_hidden_states=torch.randn(batch, 77, 768, generator=g).to(device, dtype),
    )


def sdxl_unet_inputs(
    resolution: int = 1024, batch: int = 2, seed: int = 0, device: Any = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """One CFG step of SDXL base: latents, 77 tokens of 2048 (CLIP-L and OpenCLIP-bigG side by side) and the
    ``added_cond_kwargs`` SDXL's pipeline passes: the pooled bigG projection (1280) and the time ids
    (original size, crop top-left, target size), here ``(resolution, resolution, 0, 0, resolution, resolution)``."""
    g = torch.Generator().manual_seed(seed)
    side = _latent_side(resolution)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    return dict(
        sample=torch.randn(batch, 4, side, side, generator=g).to(device, dtype),
        timestep=torch.tensor(500, device=device),
        encoder_hidden_states=torch.randn(batch, 77, 2048, generator=g).to(device, dtype),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, 1280, generator=g).to(device, dtype),
            "time_ids": time_ids.repeat(batch, 1).to(device, dtype),
        },
    )


def sd3_transformer_inputs(
    resolution: int = 1024,
    batch: int = 2,
    seed: int = 0,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    max_sequence_length: int = 256,
) -> dict[str, Any]:
    """One CFG step of SD3-medium: 16-channel latents, the joint text sequence of 77 CLIP tokens and
    ``max_sequence_length`` T5 tokens (the pipeline's default 256), 4096 wide, the pooled CLIP projections
    (768 + 1280 = 2048) and a timestep per sample (flow matching: 0..1000)."""
    g = torch.Generator().manual_seed(seed)
    side = _latent_side(resolution)
    return dict(
        hidden_states=torch.randn(batch, 16, side, side, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, 77 + max_sequence_length, 4096, generator=g).to(device, dtype),
        pooled_projections=torch.randn(batch, 2048, generator=g).to(device, dtype),
        timestep=torch.full((batch,), 500.0, device=device),
    )


# --- the table ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """A denoiser's class name (in ``diffusers``), configuration and CFG-step inputs; ``parameters`` is the
    parameter count of the published checkpoint (the tests check the configuration against it on the meta
    device)."""

    name: str
    description: str
    model_class: str
    config: Callable[[], dict[str, Any]]
    inputs: Callable[..., dict[str, Any]]
    default_resolution: int
    parameters: int


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("sd15", "Stable Diffusion 1.5 U-Net", "UNet2DConditionModel", sd15_unet_config,
                     sd15_unet_inputs, 512, 859_520_964),
        Architecture("sdxl", "SDXL base 1.0 U-Net", "UNet2DConditionModel", sdxl_unet_config, sdxl_unet_inputs,
                     1024, 2_567_463_684),
        Architecture("sd3", "SD3-medium MMDiT", "SD3Transformer2DModel", sd3_medium_transformer_config,
                     sd3_transformer_inputs, 1024, 2_028_328_000),
    )
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; valid: {', '.join(ARCHITECTURES)}") from None


def build(name: str, device: Any = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """The denoiser ``name`` with random weights (seeded) in eval mode; ``device="meta"`` allocates nothing."""
    import diffusers

    arch = get_architecture(name)
    cls = getattr(diffusers, arch.model_class)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(**arch.config())
    return (model if dtype == torch.float32 else model.to(dtype=dtype)).eval()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
