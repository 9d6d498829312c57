"""Shared fixtures for the full-size CPU benchmarks (random weights: speed only, never quality)."""

from __future__ import annotations

import pytest
import torch


def sd15_unet_config() -> dict:
    """Stable Diffusion 1.5's U-Net configuration (diffusers' defaults plus SD1.5's text width)."""
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


@pytest.fixture(scope="session")
def sd15_unet():
    """SD1.5's U-Net at random init (about 3.4 GB in fp32), built once per session."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**sd15_unet_config()).eval()


def unet_inputs(batch: int = 2, latent: int = 32, seed: int = 0) -> dict:
    """Denoiser inputs like one CFG step of SD1.5: latents, a timestep and 77 text tokens of width 768."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, latent, latent, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, 77, 768, generator=g),
    )
