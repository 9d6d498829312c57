"""Tiny Stable Diffusion XL models built offline for the tests: random weights, real diffusers classes.

The U-Net has SDXL's layout: no attention at full resolution (a plain ``DownBlock2D`` first), cross-attention
blocks at downsampling 2 and 4 with more than one transformer layer at the lowest level (SDXL: 1, 2, 10),
linear projections, per-level head counts and the ``text_time`` added conditioning (pooled text embedding
plus six micro-conditioning numbers, each embedded to ``addition_time_embed_dim``).
"""

from __future__ import annotations

import torch
from tiny_models import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_vae

TEXT_WIDTH = 32  # hidden size of each tiny text encoder; the U-Net's cross_attention_dim is their sum
POOLED_WIDTH = 32  # projection_dim of the second encoder: SDXL's pooled "text_embeds"
TIME_EMBED = 8  # addition_time_embed_dim (SDXL: 256)


def tiny_sdxl_unet(seed: int = 0, sample_size: int = 16):
    """A small UNet2DConditionModel with SDXL's block layout (16x16 latents: 8x8 tokens at level 2)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),  # SDXL's (5, 10, 20): diffusers reads it as the number of heads per level
        cross_attention_dim=2 * TEXT_WIDTH,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * TIME_EMBED,
        norm_num_groups=16,
    ).eval()


def sdxl_added_cond(batch: int, height: int, width: int, seed: int = 0) -> dict:
    """SDXL's ``added_cond_kwargs`` for a bare U-Net call: pooled text embeddings and the time ids
    (original size, crop offset, target size)."""
    g = torch.Generator().manual_seed(seed)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch, 1)
    return {"text_embeds": torch.randn(batch, POOLED_WIDTH, generator=g), "time_ids": time_ids}


def tiny_sdxl_pipeline(seed: int = 0):
    """A complete StableDiffusionXLPipeline: two tiny CLIP text encoders (the second with projection, whose
    pooled output is the U-Net's ``text_embeds``), a 4-channel VAE with scale factor 2, Euler. Call it with
    ``height=width=32`` for 16x16 latents."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    text_encoder = tiny_clip_text_encoder(tokenizer, width=TEXT_WIDTH)
    text_encoder_2 = tiny_clip_text_encoder(tokenizer_2, width=TEXT_WIDTH, projection_dim=POOLED_WIDTH)
    vae = tiny_vae(latent_channels=4, scaling_factor=0.13025)  # SDXL's VAE scaling factor
    unet = tiny_sdxl_unet(seed=seed)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_img2img(base):
    """``StableDiffusionXLImg2ImgPipeline`` on the base pipeline's components (shared U-Net and scheduler), as
    the ensemble-of-experts refiner step runs it (``denoising_start``)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(base, requires_aesthetics_score=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
