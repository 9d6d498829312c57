"""Tiny models built offline for the tests: random weights, real classes, real loading paths."""

from __future__ import annotations

import torch


def tiny_sd_unet(cross_attention_dim: int = 32, sample_size: int = 16, seed: int = 0, **overrides):
    """A small UNet2DConditionModel with SD 1.5's block layout: three cross-attention down blocks and a
    plain one, mirrored going up, two layers per block (so 2 + 3 top-level transformer blocks). ``overrides``
    replace entries of that configuration."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return UNet2DConditionModel(**{**config, **overrides}).eval()


def tiny_sd2_unet(cross_attention_dim: int = 32, sample_size: int = 16, seed: int = 0):
    """A small UNet2DConditionModel with SD 2.x's differences from SD 1.5: linear projections in and out of the
    transformers, a head count per level (SD2's ``attention_head_dim=(5, 10, 20, 20)``, read by diffusers as
    heads) and upcast attention (SD 2.1)."""
    return tiny_sd_unet(
        cross_attention_dim, sample_size, seed,
        attention_head_dim=(2, 4, 8, 8), use_linear_projection=True, upcast_attention=True,
    )  # fmt: skip


def _byte_alphabet() -> list[str]:
    # The printable byte-to-unicode alphabet of GPT-2/CLIP BPE, so any text tokenizes to known symbols.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    symbols = _byte_alphabet()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_clip_text_encoder(tokenizer, width: int = 32, projection_dim: int | None = None):
    """A 2-layer CLIP text encoder on :func:`tiny_clip_tokenizer`'s vocabulary; with ``projection_dim`` the
    ``CLIPTextModelWithProjection`` whose pooled output SDXL and SD3 use."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **({} if projection_dim is None else {"projection_dim": projection_dim}),
    )
    return (CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection)(config).eval()


def tiny_vae(latent_channels: int, **config):
    """A 2-level ``AutoencoderKL`` (scale factor 2) with ``latent_channels`` and the model's own extras
    (scaling/shift factors, quant convs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=latent_channels,
        norm_num_groups=16,
        layers_per_block=1,
        **config,
    ).eval()


def tiny_sd_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """A complete StableDiffusionPipeline (tokenizer, text encoder, VAE, U-Net) small enough for CPU tests."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = tiny_clip_text_encoder(tokenizer)
    vae = tiny_vae(latent_channels=4)
    unet = tiny_sd_unet(cross_attention_dim=32, seed=seed)
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    sched = cls(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )
    if scheduler == "ddim":
        sched.register_to_config(clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_timm_vit(name: str, seed: int = 0, **overrides):
    """A timm model of architecture ``name`` (its own class and variant flags: LayerScale, registers, class
    token or none, pooling, pre-norm) at a tiny size: 32x32 images in 4x4 patches (64 patch tokens), two blocks
    of width 48 with 3 heads, random weights."""
    import timm

    torch.manual_seed(seed)
    kwargs = dict(pretrained=False, img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=3, num_classes=10)
    return timm.create_model(name, **{**kwargs, **overrides}).eval()
