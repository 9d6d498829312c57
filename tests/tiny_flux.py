"""Tiny Flux.1 models built offline for the tests: random weights, the real diffusers classes."""

from __future__ import annotations

import torch


def tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = True, num_layers: int = 2, num_single_layers: int = 2):
    """A small FluxTransformer2DModel in Flux.1's layout: dual-stream then single-stream blocks, 2 heads of 16
    channels (rotary axes 4 + 6 + 6, as Flux's 16 + 56 + 56 in small), 16 input channels (a 4-channel latent
    packed 2x2), 32-wide T5-like text and 32-wide pooled CLIP input; ``guidance_embeds`` True is dev's layout,
    False schnell's."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def image_ids(h: int, w: int) -> torch.Tensor:
    """FluxPipeline's image ids of an h x w packed grid: (0, row, col), row-major."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def smooth_tokens(batch: int, h: int, w: int, channels: int, g: torch.Generator) -> torch.Tensor:
    """Packed latent tokens [B, h*w, C] with spatial structure (neighbouring tokens alike)."""
    import torch.nn.functional as F

    coarse = torch.randn(batch, channels, max(h // 4, 1), max(w // 4, 1), generator=g)
    image = F.interpolate(coarse, size=(h, w), mode="bilinear") + 0.1 * torch.randn(batch, channels, h, w, generator=g)
    return image.permute(0, 2, 3, 1).reshape(batch, h * w, channels)


def flux_denoise(model, timesteps=(0.9, 0.8, 0.7), batch: int = 1, h: int = 8, w: int = 8, txt_len: int = 6,
                 seed: int = 0, before_step=None) -> list[torch.Tensor]:
    """A bare generation: one transformer call per timestep (Flux's 0-1 scale) on ``sample + 0.1 * i`` with fixed
    text tokens, pooled projections and (for dev's layout) guidance 3.5. The outputs, in order."""
    g = torch.Generator().manual_seed(seed)
    sample = smooth_tokens(batch, h, w, model.config.in_channels, g)
    text = torch.randn(batch, txt_len, model.config.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, model.config.pooled_projection_dim, generator=g)
    kwargs = {"guidance": torch.full((batch,), 3.5)} if model.config.guidance_embeds else {}
    img_ids, txt_ids = image_ids(h, w), torch.zeros(txt_len, 3)
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
                    img_ids=img_ids,
                    txt_ids=txt_ids,
                    **kwargs,
                ).sample
            )
    return outs


def tiny_t5(width: int = 32):
    """A T5 tokenizer (word-level over a small vocabulary, unknown words -> ``<unk>``, ``</s>`` appended, as T5's)
    and a 1-layer ``T5EncoderModel`` of ``width``, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in "a an the photo of cat dog red blue green astronaut riding horse on moon".split():
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=512)
    config = T5Config(vocab_size=len(vocab), d_model=width, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    return tokenizer, T5EncoderModel(config).eval()


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True, text_encoders: bool = False):
    """A FluxPipeline of the tiny transformer, a 4-channel VAE (scale factor 2; the pipeline packs its latents 2x2)
    and flow-matching Euler with Flux's dynamic shift. ``text_encoders``: a tiny CLIP (pooled, 32) and a tiny T5
    (32-wide tokens), so prompts work; without them call it with ``prompt_embeds`` [B, L, 32] and
    ``pooled_prompt_embeds`` [B, 32]. ``height=width=32``: 16x16 latents -> 8x8 packed tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from tiny_models import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_vae

    torch.manual_seed(seed)
    encoders = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if text_encoders:
        tokenizer = tiny_clip_tokenizer()
        tokenizer_2, text_encoder_2 = tiny_t5()
        encoders = dict(text_encoder=tiny_clip_text_encoder(tokenizer), tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    vae = tiny_vae(latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                   use_post_quant_conv=False)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=vae,
        **encoders,
        transformer=tiny_flux_transformer(seed=seed, guidance_embeds=guidance_embeds),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
