"""Tiny Stable Diffusion 3 models built offline for the tests: random weights, real diffusers classes."""

from __future__ import annotations

import torch
from tiny_models import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_vae


def tiny_sd3_transformer(
    seed: int = 0, num_layers: int = 2, dual_attention_layers: tuple[int, ...] = (), qk_norm: str | None = None
):
    """A small SD3Transformer2DModel: 16 latent channels, patch 2 (16x16 latents -> 8x8 = 64 image tokens),
    2 heads of 8 channels, 64-wide text input. ``dual_attention_layers`` gives SD3.5-style blocks and
    ``qk_norm="rms_norm"`` SD3.5's query/key normalisation."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=16,
        pooled_projection_dim=64,
        out_channels=16,
        pos_embed_max_size=16,
        dual_attention_layers=dual_attention_layers,
        qk_norm=qk_norm,
    ).eval()


def tiny_sd35_transformer(seed: int = 0):
    """SD3.5's block types in small: the first block dual-attention (SD3.5 medium's layout), qk rms-norm."""
    return tiny_sd3_transformer(seed=seed, num_layers=2, dual_attention_layers=(0,), qk_norm="rms_norm")


def tiny_sd3_pipeline(seed: int = 0, **transformer_kwargs):
    """A complete StableDiffusion3Pipeline (two tiny CLIP encoders with projection, no T5: the pipeline then
    uses zeros for it, a 16-channel VAE with scale factor 2, flow-matching Euler). Call it with
    ``height=width=32`` for 16x16 latents and a short ``max_sequence_length``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    text_encoder = tiny_clip_text_encoder(tokenizer, projection_dim=32)
    text_encoder_2 = tiny_clip_text_encoder(tokenizer_2, projection_dim=32)
    vae = tiny_vae(
        latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False
    )
    transformer = tiny_sd3_transformer(seed=seed, **transformer_kwargs)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_denoise(model, sample, text, pooled, timesteps, before_step=None) -> list:
    """A bare generation: one transformer call per timestep on ``sample + 0.1 * i`` (so every call differs) with
    fixed text tokens and pooled projections; ``before_step(i)`` (1-based) runs before call ``i``. The outputs,
    in order."""
    batch = sample.shape[0]
    outs = []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            if before_step is not None:
                before_step(i + 1)
            outs.append(
                model(
                    hidden_states=sample + 0.1 * i,
                    encoder_hidden_states=text,
                    pooled_projections=pooled,
                    timestep=torch.full((batch,), float(t)),
                ).sample
            )
    return outs
