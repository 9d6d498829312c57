"""Tiny PixArt-α/Σ and DiT models built offline for the tests: random weights, real diffusers classes."""

from __future__ import annotations

import torch
from tiny_models import tiny_vae

TEXT_WIDTH = 32  # the tiny T5 embeddings' width (PixArt's caption_channels; 4096 for the real T5-XXL)


def tiny_pixart_transformer(seed: int = 0, num_layers: int = 2, alpha: bool = False, sample_size: int = 16):
    """A small PixArtTransformer2DModel: 4 latent channels, patch 2 (16x16 latents -> 8x8 = 64 image tokens), 2
    heads of 12 channels (24 wide: PixArt-α's size conditions take a third each), learned sigma (8 output
    channels), ``TEXT_WIDTH``-wide captions. ``alpha=True`` is PixArt-α's layout (additional resolution and
    aspect-ratio conditions); else PixArt-Σ's (none)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        cross_attention_dim=24,
        sample_size=sample_size,
        patch_size=2,
        caption_channels=TEXT_WIDTH,
        use_additional_conditions=alpha,
        interpolation_scale=1,
    ).eval()


def tiny_dit_transformer(seed: int = 0, num_layers: int = 2, sample_size: int = 16):
    """A small DiTTransformer2DModel (class-conditional, ``ada_norm_zero``): 4 latent channels, patch 2, 2 heads of
    8 channels, learned sigma, 1000 classes."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()


def pixart_added_cond(batch: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """PixArt-α's additional conditions (resolution and aspect ratio), as its pipeline builds them."""
    return {
        "resolution": torch.tensor([[height, width]], dtype=torch.float32).repeat(batch, 1),
        "aspect_ratio": torch.tensor([[height / width]], dtype=torch.float32).repeat(batch, 1),
    }


def pixart_denoise(model, sample, text, timesteps, text_mask=None) -> list:
    """A bare generation: one transformer call per timestep on ``sample + 0.1 * i`` with fixed caption tokens."""
    batch = sample.shape[0]
    added = pixart_added_cond(batch, 8 * sample.shape[-2], 8 * sample.shape[-1])
    outs = []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            outs.append(
                model(
                    sample + 0.1 * i,
                    encoder_hidden_states=text,
                    encoder_attention_mask=text_mask,
                    timestep=torch.full((batch,), t),
                    added_cond_kwargs=added,
                ).sample
            )
    return outs


def dit_denoise(model, sample, labels, timesteps) -> list:
    """A bare class-conditional generation: one transformer call per timestep on ``sample + 0.1 * i``."""
    outs = []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            outs.append(model(sample + 0.1 * i, timestep=torch.full((sample.shape[0],), t), class_labels=labels).sample)
    return outs


def tiny_pixart_pipeline(seed: int = 0, alpha: bool = False):
    """A PixArtSigmaPipeline (``alpha=True``: PixArtAlphaPipeline) with the tiny transformer, a 4-channel VAE of
    scale factor 2 and DPM-Solver++ (the pipelines' scheduler). No tokenizer or T5: call it with
    ``prompt_embeds`` / ``negative_prompt_embeds`` and their masks (:func:`pixart_prompt`), ``height=width=32``
    (16x16 latents) and ``use_resolution_binning=False``."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    torch.manual_seed(seed)
    vae = tiny_vae(latent_channels=4)
    # PixArtAlphaPipeline passes the size conditions only to a transformer of sample_size 128 (PixArt-α 1024)
    transformer = tiny_pixart_transformer(seed=seed, alpha=alpha, sample_size=128 if alpha else 16)
    cls = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    pipe = cls(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_prompt(batch: int = 1, tokens: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    """Stand-ins for the T5 caption embeddings and masks of a prompt and the empty negative prompt."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    return {
        "prompt_embeds": torch.randn(batch, tokens, TEXT_WIDTH, generator=g),
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": torch.zeros(batch, tokens, TEXT_WIDTH),
        "negative_prompt_attention_mask": mask.clone(),
    }


def tiny_dit_pipeline(seed: int = 0):
    """A DiTPipeline (class-conditional) with the tiny transformer, a 4-channel VAE of scale factor 2 and DDIM."""
    from diffusers import DDIMScheduler, DiTPipeline

    torch.manual_seed(seed)
    vae = tiny_vae(latent_channels=4)
    transformer = tiny_dit_transformer(seed=seed)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
