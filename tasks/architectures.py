"""The one architecture table: the real denoisers people run, as keyword arguments of their diffusers classes,
with what it takes to run each of them without a download: the inputs of one classifier-free-guidance step, the
random conditioning and the sampler of a generation (:class:`RandomInitPipeline`), and the pipeline class that
loads its real weights. The text-to-image workloads (:mod:`tokred.tasks.diffusion_workloads`) build from a row of
:data:`ARCHITECTURES`; adding a denoiser family to the benchmarks is a new row here.

For speed measurements without downloads: the model is built from its configuration with random weights
(:func:`build`), on any device, including ``meta`` (no memory; for parameter counts and shape checks).
Random weights say nothing about quality, and for methods whose work depends on the activations (CA-ToMe's
threshold) nothing about how much they reduce on the trained model.

============  ======================================  ==================  ====================================
name          model                                   class               one CFG step (batch 2)
============  ======================================  ==================  ====================================
``sd15``      Stable Diffusion 1.5's U-Net (860M)     UNet2DConditionModel  latents, 77 CLIP tokens of 768
``sd2``       Stable Diffusion 2.1's U-Net (866M)     UNet2DConditionModel  latents, 77 OpenCLIP tokens of 1024
``sdxl``      SDXL base 1.0's U-Net (2.57B)           UNet2DConditionModel  + ``added_cond_kwargs`` (pooled 1280,
                                                                            time ids), 77 tokens of 2048
``sd3``       SD3-medium's MMDiT (2.03B)              SD3Transformer2DModel  16-channel latents, 77 CLIP + 256 T5
                                                                             tokens of 4096, pooled 2048
``sd35``      SD3.5-medium's MMDiT-X (2.24B)          SD3Transformer2DModel  as SD3, with qk-norm and dual attention
                                                                             in the first 13 blocks
``pixart_alpha``  PixArt-α XL/2 1024 (611M)           PixArtTransformer2DModel  4-channel latents, 120 T5 tokens of
                                                                             4096 with their mask, size conditions
``pixart_sigma``  PixArt-Σ XL/2 1024 (611M)           PixArtTransformer2DModel  as PixArt-α, 300 T5 tokens, no size
                                                                             conditions
``dit_xl2``   DiT-XL/2 256 (675M; 750M in diffusers)  DiTTransformer2DModel  4-channel latents, a class label (and
                                                                             the null class 1000 for guidance)
``flux_dev``  Flux.1-dev's transformer (11.9B)        FluxTransformer2DModel  batch 1 (guidance embedded, no CFG):
                                                                              2x2-packed 16-channel latents, 512 T5
                                                                              tokens of 4096, pooled CLIP 768, ids
``flux_schnell`` Flux.1-schnell's (11.9B)             FluxTransformer2DModel  as dev without the guidance embedding;
                                                                              256 T5 tokens
============  ======================================  ==================  ====================================

The configurations are those of the published ``config.json`` files (stable-diffusion-v1-5, stabilityai/
stable-diffusion-xl-base-1.0 ``unet/``, stabilityai/stable-diffusion-2-1 ``unet/``,
stabilityai/stable-diffusion-3-medium-diffusers and stabilityai/stable-diffusion-3.5-medium ``transformer/``,
PixArt-alpha/PixArt-XL-2-1024-MS and PixArt-alpha/PixArt-Sigma-XL-2-1024-MS ``transformer/``, facebook/DiT-XL-2-256
``transformer/``), written out here so that no download is needed; options that equal diffusers' defaults are left out.
black-forest-labs/FLUX.1-dev and FLUX.1-schnell ``transformer/``), written out here so that no download is needed;
options that equal diffusers' defaults are left out (Flux's are all written out).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

VAE_SCALE_FACTOR = 8  # every VAE here: 512 px images are 64 x 64 latents
CLIP_TOKENS = 77  # CLIP's context length
T5_TOKENS = 256  # the SD3 pipelines' default max_sequence_length
PIXART_ALPHA_T5_TOKENS = 120  # PixArtAlphaPipeline's max_sequence_length
PIXART_SIGMA_T5_TOKENS = 300  # PixArtSigmaPipeline's default max_sequence_length
DIT_NULL_CLASS = 1000  # DiT's class label for the unconditional branch (num_embeds_ada_norm)


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


def sd2_unet_config() -> dict[str, Any]:
    """Stable Diffusion 2.1's ``UNet2DConditionModel``: SD1.x's layout with OpenCLIP-H's 1024-wide tokens, 64-channel
    heads (5/10/20/20 per level), linear projections in the transformer blocks and attention upcast to float32."""
    return dict(
        sd15_unet_config(),
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
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


def sd35_medium_transformer_config() -> dict[str, Any]:
    """SD3.5-medium's ``SD3Transformer2DModel`` (MMDiT-X): SD3-medium's widths with RMS qk-norm, a second
    self-attention over the image tokens in blocks 0-12, and a larger position-embedding table (384)."""
    return dict(
        sd3_medium_transformer_config(),
        pos_embed_max_size=384,
        qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)),
    )


def pixart_sigma_transformer_config() -> dict[str, Any]:
    """PixArt-Σ XL/2 1024's ``PixArtTransformer2DModel``: 2x2 patches of 4-channel latents (64 x 64 tokens at 1024
    px), 28 ``BasicTransformerBlock``s (``ada_norm_single``) of 16 heads x 72 (width 1152), cross-attention to T5-XXL
    tokens (4096, projected to 1152), learned sigma (8 output channels), no size conditions."""
    return dict(
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=28,
        cross_attention_dim=1152,
        sample_size=128,
        patch_size=2,
        caption_channels=4096,
        interpolation_scale=2,
        use_additional_conditions=False,
    )


def pixart_alpha_transformer_config() -> dict[str, Any]:
    """PixArt-α XL/2 1024-MS's ``PixArtTransformer2DModel``: PixArt-Σ's backbone with the resolution and aspect-ratio
    conditions (``use_additional_conditions``, the class default at ``sample_size=128``)."""
    return dict(pixart_sigma_transformer_config(), interpolation_scale=None, use_additional_conditions=True)


def dit_xl2_transformer_config() -> dict[str, Any]:
    """DiT-XL/2 256's ``DiTTransformer2DModel``: 2x2 patches of 4-channel 32 x 32 latents (256 tokens), 28
    ``BasicTransformerBlock``s (``ada_norm_zero``: timestep and class label) of 16 heads x 72, learned sigma, 1000
    ImageNet classes."""
    return dict(
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=28,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
def flux_dev_transformer_config() -> dict[str, Any]:
    """Flux.1-dev's ``FluxTransformer2DModel``: 19 dual-stream and 38 single-stream blocks of 24 heads x 128 (width
    3072), 64 input channels (16-channel latents packed 2x2 by the pipeline), T5 tokens of 4096, pooled CLIP of 768,
    rotary axes (16, 56, 56) and the guidance embedding (guidance-distilled). These equal diffusers' defaults but
    for ``guidance_embeds``; they are written out so that the row says what it is."""
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )


def flux_schnell_transformer_config() -> dict[str, Any]:
    """Flux.1-schnell's ``FluxTransformer2DModel``: dev's, without the guidance embedding (timestep-distilled)."""
    return dict(flux_dev_transformer_config(), guidance_embeds=False)


# --- one CFG step ----------------------------------------------------------------------------------------------
def _latent_side(resolution: int, vae_scale: int = 8) -> int:
    if resolution % vae_scale:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's scale factor {vae_scale}")
    return resolution // vae_scale


def sd15_unet_inputs(
    resolution: int = 512, batch: int = 2, seed: int = 0, device: Any = "cpu", dtype: torch.dtype = torch.float32,
    text_width: int = 768,
) -> dict[str, Any]:
    """``UNet2DConditionModel.forward`` keyword arguments for one CFG step of SD1.5 (the batch holds the
    unconditional and conditional halves): random latents, timestep 500, 77 random CLIP tokens of 768."""
    g = torch.Generator().manual_seed(seed)
    side = _latent_side(resolution)
    return dict(
        sample=torch.randn(batch, 4, side, side, generator=g).to(device, dtype),
        timestep=torch.tensor(500, device=device),
        encoder_hidden_states=torch.randn(batch, CLIP_TOKENS, text_width, generator=g).to(device, dtype),
    )


def sd2_unet_inputs(
    resolution: int = 768, batch: int = 2, seed: int = 0, device: Any = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """One CFG step of SD2.1: as SD1.5's, with 77 OpenCLIP-H tokens of 1024."""
    return sd15_unet_inputs(resolution, batch, seed, device, dtype, text_width=1024)


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


def pixart_transformer_inputs(
    resolution: int = 1024,
    batch: int = 2,
    seed: int = 0,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    max_sequence_length: int = PIXART_SIGMA_T5_TOKENS,
    size_conditions: bool = False,
) -> dict[str, Any]:
    """One CFG step of PixArt-Σ (``size_conditions=True``, 120 tokens: PixArt-α): latents, ``max_sequence_length``
    random T5 tokens of 4096 with an all-ones mask, a timestep per sample and the ``added_cond_kwargs`` the
    pipelines pass (PixArt-α: resolution and aspect ratio; PixArt-Σ: None)."""
    g = torch.Generator().manual_seed(seed)
    side = _latent_side(resolution)
    added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
    if size_conditions:
        added = {
            "resolution": torch.tensor([[resolution, resolution]], dtype=dtype, device=device).repeat(batch, 1),
            "aspect_ratio": torch.tensor([[1.0]], dtype=dtype, device=device).repeat(batch, 1),
        }
    return dict(
        hidden_states=torch.randn(batch, 4, side, side, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, max_sequence_length, 4096, generator=g).to(device, dtype),
        encoder_attention_mask=torch.ones(batch, max_sequence_length, device=device),
        timestep=torch.full((batch,), 500, device=device),
        added_cond_kwargs=added,
    )


def pixart_alpha_transformer_inputs(**kwargs: Any) -> dict[str, Any]:
    """One CFG step of PixArt-α XL/2 1024: 120 T5 tokens and the size conditions."""
    return pixart_transformer_inputs(**{"max_sequence_length": PIXART_ALPHA_T5_TOKENS, "size_conditions": True,
                                        **kwargs})


def dit_transformer_inputs(
    resolution: int = 256, batch: int = 2, seed: int = 0, device: Any = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """One CFG step of DiT-XL/2 (``DiTPipeline``'s order: the conditional half first, then the null class 1000):
    latents, a timestep per sample and the class labels (class 207, the DiT README's golden retriever)."""
    g = torch.Generator().manual_seed(seed)
    side = _latent_side(resolution)
    half = batch // 2
    labels = [207] * (batch - half) + [DIT_NULL_CLASS] * half
    return dict(
        hidden_states=torch.randn(batch, 4, side, side, generator=g).to(device, dtype),
        timestep=torch.full((batch,), 500, device=device),
        class_labels=torch.tensor(labels, device=device),
    )
FLUX_DEV_T5_TOKENS = 512  # FluxPipeline's default max_sequence_length (dev)
FLUX_SCHNELL_T5_TOKENS = 256  # schnell's pipeline limit
FLUX_GUIDANCE = 3.5  # Flux.1-dev's default (embedded) guidance


def flux_image_ids(h: int, w: int, device: Any = "cpu") -> torch.Tensor:
    """``FluxPipeline._prepare_latent_image_ids``: (0, row, col) of the h x w packed grid, row-major, [h*w, 3]."""
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``FluxPipeline._pack_latents``: [B, C, H, W] -> [B, (H/2)*(W/2), 4C], each token a 2x2 patch."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def flux_transformer_inputs(
    resolution: int = 1024,
    batch: int = 1,
    seed: int = 0,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    max_sequence_length: int = FLUX_DEV_T5_TOKENS,
    guidance: float | None = FLUX_GUIDANCE,
) -> dict[str, Any]:
    """One denoiser call of Flux.1 as ``FluxPipeline`` makes it (no CFG: the batch is the images): 16-channel latents
    packed 2x2 into 64-channel tokens, ``max_sequence_length`` T5 tokens of 4096, the pooled CLIP embedding (768),
    the timestep on the pipeline's 0-1 scale, the text and image ids of the rotary embeddings and (dev) the
    embedded guidance (None for schnell)."""
    g = torch.Generator().manual_seed(seed)
    side = _latent_side(resolution)
    if side % 2:
        raise ValueError(f"resolution {resolution} gives a {side}-wide latent; Flux packs 2x2, so it must be even")
    latents = pack_latents(torch.randn(batch, 16, side, side, generator=g))
    out = dict(
        hidden_states=latents.to(device, dtype),
        encoder_hidden_states=torch.randn(batch, max_sequence_length, 4096, generator=g).to(device, dtype),
        pooled_projections=torch.randn(batch, 768, generator=g).to(device, dtype),
        timestep=torch.full((batch,), 0.5, device=device),
        img_ids=flux_image_ids(side // 2, side // 2, device),
        txt_ids=torch.zeros(max_sequence_length, 3, device=device),
    )
    if guidance is not None:
        out["guidance"] = torch.full((batch,), guidance, device=device)
    return out


def flux_schnell_inputs(resolution: int = 1024, batch: int = 1, seed: int = 0, device: Any = "cpu",
                        dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """One denoiser call of Flux.1-schnell: 256 T5 tokens, no guidance embedding."""
    return flux_transformer_inputs(resolution, batch, seed, device, dtype, FLUX_SCHNELL_T5_TOKENS, None)


# --- samplers ----------------------------------------------------------------------------------------------------
# Stable Diffusion 1.x/2.x and SDXL's training noise schedule, with DDIM (the scheduler config shipped with SD1.5;
# SDXL's default sampler is Euler on the same schedule, which costs the same per step).
SD_DDIM_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
SD15_SCHEDULER_CONFIG = SD_DDIM_CONFIG  # the name tokred 0.2 used
# SD3 / SD3.5: rectified flow with Euler steps and a timestep shift of 3.0 (their scheduler_config.json).
SD3_FLOW_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}


# PixArt-α/Σ and DiT: the linear beta schedule (0.0001 to 0.02) they were trained with; PixArt's pipelines sample with
# DPM-Solver++ (2nd order, 20 steps by default), DiT's with DDIM (50 steps by default).
LINEAR_BETAS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}
PIXART_DPM_CONFIG: dict[str, Any] = {**LINEAR_BETAS, "algorithm_type": "dpmsolver++", "solver_order": 2}
DIT_DDIM_CONFIG: dict[str, Any] = {**LINEAR_BETAS, "clip_sample": False}


def pixart_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(PIXART_DPM_CONFIG)


def dit_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(DIT_DDIM_CONFIG)
# Flux.1-dev: rectified flow, Euler, with the resolution-dependent shift of its scheduler_config.json (mu from the
# image token count, FluxPipeline's calculate_shift); Flux.1-schnell: a fixed shift of 1 (no shift).
FLUX_DEV_FLOW_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_SCHNELL_FLOW_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


def flux_dev_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV_FLOW_CONFIG)


def flux_schnell_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHNELL_FLOW_CONFIG)


def flux_set_timesteps(scheduler: Any, steps: int, image_tokens: int, device: Any) -> None:
    """``FluxPipeline``'s timesteps: sigmas ``linspace(1, 1/steps, steps)`` and the shift ``mu`` of the image token
    count (used when the scheduler shifts dynamically, as Flux.1-dev's does)."""
    import numpy as np

    config = scheduler.config
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    mu = image_tokens * (top - base) / (hi - lo) + base - (top - base) / (hi - lo) * lo
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)


def ddim_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config({**SD_DDIM_CONFIG, "prediction_type": prediction_type})


def sd15_scheduler():
    return ddim_scheduler()


def flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(SD3_FLOW_CONFIG)


# --- the table ---------------------------------------------------------------------------------------------------
FAMILIES = {"UNet2DConditionModel": "diffusers_unet", "SD3Transformer2DModel": "diffusers_mmdit"}
DENOISER_ATTRS = {"UNet2DConditionModel": "unet", "SD3Transformer2DModel": "transformer"}
for _cls in ("PixArtTransformer2DModel", "DiTTransformer2DModel"):  # PixArt-α/Σ, DiT-XL/2
    FAMILIES[_cls], DENOISER_ATTRS[_cls] = "diffusers_dit", "transformer"
FAMILIES["FluxTransformer2DModel"] = "diffusers_flux"
DENOISER_ATTRS["FluxTransformer2DModel"] = "transformer"


@dataclass(frozen=True)
class Architecture:
    """A denoiser: its class name (in ``diffusers``), configuration and CFG-step inputs, its sampler
    (``scheduler()``, the default of its pipeline or one that costs the same per step), the pipeline class and hub
    id of its real weights, and its sampling defaults. ``parameters`` is the parameter count of the published
    checkpoint (the tests check the configuration against it on the meta device)."""

    name: str
    description: str
    model_class: str
    config: Callable[[], dict[str, Any]]
    inputs: Callable[..., dict[str, Any]]
    default_resolution: int
    parameters: int
    pipeline_class: str = "StableDiffusionPipeline"
    hub_id: str = ""
    scheduler: Callable[[], Any] = sd15_scheduler
    default_steps: int = 50
    guidance_scale: float = 7.5
    text_tokens: int | None = None  # T5 tokens of a PixArt (its pipeline's max_sequence_length); None elsewhere

    @property
    def family(self) -> str:
        """The tokred adapter family of the denoiser."""
        return FAMILIES[self.model_class]

    @property
    def denoiser_attr(self) -> str:
        """The pipeline attribute that holds the denoiser (``unet`` or ``transformer``)."""
        return DENOISER_ATTRS[self.model_class]


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("sd15", "Stable Diffusion 1.5 U-Net", "UNet2DConditionModel", sd15_unet_config,
                     sd15_unet_inputs, 512, 859_520_964, "StableDiffusionPipeline",
                     "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        Architecture("sd2", "Stable Diffusion 2.1 U-Net", "UNet2DConditionModel", sd2_unet_config, sd2_unet_inputs,
                     768, 865_910_724, "StableDiffusionPipeline", "stabilityai/stable-diffusion-2-1",
                     lambda: ddim_scheduler("v_prediction")),
        Architecture("sdxl", "SDXL base 1.0 U-Net", "UNet2DConditionModel", sdxl_unet_config, sdxl_unet_inputs,
                     1024, 2_567_463_684, "StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0",
                     guidance_scale=5.0),
        Architecture("sd3", "SD3-medium MMDiT", "SD3Transformer2DModel", sd3_medium_transformer_config,
                     sd3_transformer_inputs, 1024, 2_028_328_000, "StableDiffusion3Pipeline",
                     "stabilityai/stable-diffusion-3-medium-diffusers", flow_match_scheduler, 28, 7.0),
        # (the announcement rounds SD3.5-medium to 2.5B; this is the count of its transformer's config.json)
        Architecture("sd35", "SD3.5-medium MMDiT-X", "SD3Transformer2DModel", sd35_medium_transformer_config,
                     sd3_transformer_inputs, 1024, 2_243_171_520, "StableDiffusion3Pipeline",
                     "stabilityai/stable-diffusion-3.5-medium", flow_match_scheduler, 40, 4.5),
        Architecture("pixart_alpha", "PixArt-α XL/2 1024", "PixArtTransformer2DModel", pixart_alpha_transformer_config,
                     pixart_alpha_transformer_inputs, 1024, 611_349_152, "PixArtAlphaPipeline",
                     "PixArt-alpha/PixArt-XL-2-1024-MS", pixart_scheduler, 20, 4.5,
                     PIXART_ALPHA_T5_TOKENS),
        Architecture("pixart_sigma", "PixArt-Σ XL/2 1024", "PixArtTransformer2DModel", pixart_sigma_transformer_config,
                     pixart_transformer_inputs, 1024, 610_856_096, "PixArtSigmaPipeline",
                     "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", pixart_scheduler, 20, 4.5, PIXART_SIGMA_T5_TOKENS),
        # (the DiT paper's 675M counts one timestep/class embedder; diffusers' DiT keeps a copy in every block)
        Architecture("dit_xl2", "DiT-XL/2 256", "DiTTransformer2DModel", dit_xl2_transformer_config,
                     dit_transformer_inputs, 256, 749_826_464, "DiTPipeline", "facebook/DiT-XL-2-256",
                     dit_scheduler, 50, 4.0),
        # Flux.1: guidance is embedded (dev: 3.5) or absent (schnell), never classifier-free: one branch per call
        Architecture("flux_dev", "Flux.1-dev transformer", "FluxTransformer2DModel", flux_dev_transformer_config,
                     flux_transformer_inputs, 1024, 11_901_408_320, "FluxPipeline", "black-forest-labs/FLUX.1-dev",
                     flux_dev_scheduler, 28, FLUX_GUIDANCE),
        Architecture("flux_schnell", "Flux.1-schnell transformer", "FluxTransformer2DModel",
                     flux_schnell_transformer_config, flux_schnell_inputs, 1024, 11_891_178_560, "FluxPipeline",
                     "black-forest-labs/FLUX.1-schnell", flux_schnell_scheduler, 4, 0.0),
    )
}


DEFAULT_ARCHITECTURE = "sd15"  # the denoiser of the arch and full workloads when none is named


def get_architecture(name: Any) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown architecture {name!r}; valid: {', '.join(ARCHITECTURES)}") from None


def architecture_of(model_class_name: str) -> list[str]:
    """The architectures whose denoiser is a ``model_class_name``."""
    return [a.name for a in ARCHITECTURES.values() if a.model_class == model_class_name]


def config_with(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The configuration of architecture ``name`` with ``overrides`` (e.g. a tiny one for tests); keys that its
    diffusers class does not take raise here, naming the valid ones."""
    arch = get_architecture(name)
    config = arch.config()
    if overrides:
        import diffusers

        cls = getattr(diffusers, arch.model_class)
        valid = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(
                f"{name} config: unknown {arch.model_class} arguments {', '.join(unknown)}; valid: "
                f"{', '.join(sorted(valid))}"
            )
        config.update(overrides)
    return config


def latent_multiple(name: str, config: dict[str, Any]) -> int:
    """Latent sides must be a multiple of this: a U-Net halves them once per level but the last; an MMDiT cuts
    them into ``patch_size`` patches."""
    if get_architecture(name).model_class == "UNet2DConditionModel":
        return 2 ** (len(config["block_out_channels"]) - 1)
    if get_architecture(name).model_class == "FluxTransformer2DModel":
        return 2 * int(config.get("patch_size", 1))  # FluxPipeline packs 2x2 latent patches into one token
    return int(config.get("patch_size", 2))


def build_from_config(name: str, config: dict[str, Any], device: Any = "cpu", dtype: torch.dtype = torch.float32,
                      seed: int = 0) -> nn.Module:
    """Architecture ``name``'s denoiser class built from ``config`` at random init (seeded, without touching the
    global RNG: the same weights every time), in eval mode; ``device="meta"`` allocates nothing."""
    import diffusers

    cls = getattr(diffusers, get_architecture(name).model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = cls(**config)
    if dtype != torch.float32:  # (diffusers warns at every dtype cast, even a no-op one)
        model = model.to(dtype=dtype)
    return model.eval()


def build(name: str, device: Any = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """The denoiser ``name`` with random weights (seeded) in eval mode; ``device="meta"`` allocates nothing."""
    return build_from_config(name, get_architecture(name).config(), device, dtype, seed)


def build_unet(config: dict[str, Any], seed: int = 0) -> nn.Module:
    """A ``UNet2DConditionModel`` from ``config`` at random init (seeded), in eval mode."""
    return build_from_config("sd15", config, seed=seed)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- a generation without weights ------------------------------------------------------------------------------
class RandomInitPipeline:
    """A text-to-image pipeline's shape around a random-init denoiser: ``.unet`` or ``.transformer`` (by the
    architecture) and ``.scheduler``, so ``tokred.apply(pipe, ...)`` patches the denoiser and follows the
    scheduler's generations as for a diffusers pipeline. The conditioning is random and fixed at construction
    (``embedding_seed``), with the shapes the architecture's text encoders give: 77 CLIP tokens of the
    cross-attention width (U-Nets), SDXL's pooled embedding and time ids, SD3's 77 CLIP + 256 T5 tokens of 4096
    and pooled projections of 2048. Image ``i``'s initial latents come from its own seed.

    ``__call__(seeds, num_inference_steps, guidance_scale, latent_size)`` runs a whole generation and returns the
    final latents (no VAE); :meth:`begin` / :meth:`call` / :meth:`step` run it one denoiser call at a time.
    """

    def __init__(self, architecture: str, denoiser: nn.Module, scheduler: Any, embedding_seed: int = 0) -> None:
        self.architecture = get_architecture(architecture)
        setattr(self, self.architecture.denoiser_attr, denoiser)
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.flux_guidance = FLUX_GUIDANCE
        config = denoiser.config
        gen = torch.Generator().manual_seed(embedding_seed)
        self.mmdit = self.architecture.model_class == "SD3Transformer2DModel"
        self.pixart = self.architecture.model_class == "PixArtTransformer2DModel"
        self.dit = self.architecture.model_class == "DiTTransformer2DModel"
        self.flux = self.architecture.model_class == "FluxTransformer2DModel"
        if self.flux:  # one branch (no CFG): T5 tokens (dev 512, schnell 256) and the pooled CLIP embedding
            tokens = FLUX_SCHNELL_T5_TOKENS if not config.guidance_embeds else FLUX_DEV_T5_TOKENS
            self.text = torch.randn(1, tokens, int(config.joint_attention_dim), generator=gen)
            self.pooled = torch.randn(1, int(config.pooled_projection_dim), generator=gen)
            return
        if self.mmdit:
            tokens, width = CLIP_TOKENS + T5_TOKENS, int(config.joint_attention_dim)
        elif self.pixart:  # T5 tokens before the caption projection
            tokens, width = self.architecture.text_tokens or PIXART_SIGMA_T5_TOKENS, int(config.caption_channels)
        elif self.dit:  # no text: a class label, drawn once like the text embeddings
            tokens, width = 0, 0
            self.class_label = int(torch.randint(0, int(config.num_embeds_ada_norm), (1,), generator=gen))
        else:
            tokens, width = CLIP_TOKENS, int(config.cross_attention_dim)
        self.text = torch.randn(2, tokens, width, generator=gen)  # (unconditional, conditional)
        self.pooled: torch.Tensor | None = None
        if self.mmdit:
            self.pooled = torch.randn(2, int(config.pooled_projection_dim), generator=gen)
        elif getattr(config, "addition_embed_type", None) == "text_time":
            time_width = int(config.addition_time_embed_dim) * 6
            self.pooled = torch.randn(2, int(config.projection_class_embeddings_input_dim) - time_width, generator=gen)

    # the denoiser's device and dtype
    def _param(self) -> torch.Tensor:
        return next(self.denoiser.parameters())

    def _branches(self, t: torch.Tensor, n: int, cfg: bool) -> torch.Tensor:
        """``t``'s (unconditional, conditional) rows for ``n`` images: ``[2n, ...]`` with CFG, else ``[n, ...]``."""
        p = self._param()
        t = t.to(p.device, p.dtype)
        uncond, cond = (t[i : i + 1].expand(n, *t.shape[1:]) for i in (0, 1))
        return torch.cat([uncond, cond]) if cfg else cond

    def conditioning(self, n: int, cfg: bool, latent_size: int) -> dict[str, Any]:
        """The denoiser's keyword arguments besides the latents and the timestep, for ``n`` images."""
        if self.dit:  # DiTPipeline's order: the conditional half first, then the null class
            p = self._param()
            labels = [self.class_label] * n + ([DIT_NULL_CLASS] * n if cfg else [])
            return {"class_labels": torch.tensor(labels, device=p.device)}
        if self.flux:  # FluxPipeline: text and image ids of the rotary embeddings, the embedded guidance (dev)
            p = self._param()
            text, pooled = (t.to(p.device, p.dtype).expand(n, *t.shape[1:]) for t in (self.text, self.pooled))
            side = latent_size // 2
            out = {"encoder_hidden_states": text, "pooled_projections": pooled,
                   "txt_ids": torch.zeros(text.shape[1], 3, device=p.device, dtype=p.dtype),
                   "img_ids": flux_image_ids(side, side, p.device).to(p.dtype)}
            if self.denoiser.config.guidance_embeds:
                out["guidance"] = torch.full((n,), self.flux_guidance, device=p.device, dtype=torch.float32)
            return out
        text = self._branches(self.text, n, cfg)
        if self.pixart:
            size = float(latent_size * VAE_SCALE_FACTOR)
            added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
            if self.denoiser.use_additional_conditions:  # PixArt-α: the image size and aspect ratio
                rows, like = text.shape[0], {"device": text.device, "dtype": text.dtype}
                added = {"resolution": torch.tensor([[size, size]], **like).repeat(rows, 1),
                         "aspect_ratio": torch.ones(rows, 1, **like)}
            mask = torch.ones(text.shape[:2], device=text.device, dtype=torch.long)
            return {"encoder_hidden_states": text, "encoder_attention_mask": mask, "added_cond_kwargs": added}
        if self.mmdit:
            return {"encoder_hidden_states": text, "pooled_projections": self._branches(self.pooled, n, cfg)}
        out: dict[str, Any] = {"encoder_hidden_states": text}
        if self.pooled is not None:  # SDXL: the time ids of an uncropped square image, (h, w, 0, 0, h, w) in px
            pooled = self._branches(self.pooled, n, cfg)
            side = float(latent_size * VAE_SCALE_FACTOR)
            time_ids = torch.tensor([side, side, 0.0, 0.0, side, side], device=pooled.device, dtype=pooled.dtype)
            out["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], -1)}
        return out

    def initial_latents(self, seeds: Sequence[int], latent_size: int) -> torch.Tensor:
        channels = int(self.denoiser.config.in_channels)
        if self.flux:  # FluxPipeline: latents of in_channels / 4, packed 2x2 into tokens
            channels //= 4
        latents = torch.cat([
            torch.randn(1, channels, latent_size, latent_size, generator=torch.Generator().manual_seed(int(s)))
            for s in seeds
        ])  # fmt: skip
        if self.flux:
            latents = pack_latents(latents)
        return latents.to(self._param().device, torch.float32)

    def begin(self, seeds: Sequence[int], num_inference_steps: int, guidance_scale: float,
              latent_size: int) -> DenoisingRun:
        """A generation, ready for its first denoiser call."""
        scheduler = self.scheduler
        if self.flux:  # FluxPipeline's sigmas and resolution shift; guidance embedded, never CFG
            flux_set_timesteps(scheduler, num_inference_steps, (latent_size // 2) ** 2, self._param().device)
            self.flux_guidance = guidance_scale
        else:
            scheduler.set_timesteps(num_inference_steps, device=self._param().device)
        latents = self.initial_latents(seeds, latent_size) * getattr(scheduler, "init_noise_sigma", 1.0)
        cfg = guidance_scale > 1.0 and not self.flux
        return DenoisingRun(latents, list(scheduler.timesteps), guidance_scale, cfg,
                            self.conditioning(len(seeds), cfg, latent_size))

    def call(self, run: DenoisingRun) -> torch.Tensor:
        """The denoiser's call at ``run``'s current step: the guided prediction (its pipeline's arithmetic)."""
        p = self._param()
        t = run.timesteps[run.index]
        model_input = torch.cat([run.latents, run.latents]) if run.cfg else run.latents
        if self.flux:  # FluxPipeline: packed latents, the timestep on a 0-1 scale
            out = self.denoiser(hidden_states=model_input.to(p.dtype), timestep=t.expand(model_input.shape[0]) / 1000,
                                **run.conditioning).sample.float()
        elif self.mmdit:  # SD3's pipeline: no input scaling, a timestep per sample
            out = self.denoiser(hidden_states=model_input.to(p.dtype), timestep=t.expand(model_input.shape[0]),
                                **run.conditioning).sample.float()
        elif self.pixart or self.dit:  # PixArt's and DiT's pipelines: a timestep per sample, learned sigma dropped
            model_input = self.scheduler.scale_model_input(model_input, t)
            out = self.denoiser(model_input.to(p.dtype), timestep=t.expand(model_input.shape[0]),
                                **run.conditioning).sample.float()
            out = out[:, : run.latents.shape[1]]
            if run.cfg and self.dit:  # DiT's batch holds the conditional half first
                cond, uncond = out.chunk(2)
                return uncond + run.guidance_scale * (cond - uncond)
        else:
            model_input = self.scheduler.scale_model_input(model_input, t)
            out = self.denoiser(model_input.to(p.dtype), t, **run.conditioning).sample.float()
        if run.cfg:
            uncond, cond = out.chunk(2)
            out = uncond + run.guidance_scale * (cond - uncond)
        return out

    def step(self, run: DenoisingRun, prediction: torch.Tensor) -> None:
        """Advance ``run`` by one sampler step with the denoiser's ``prediction``."""
        t = run.timesteps[run.index]
        run.latents = self.scheduler.step(prediction, t, run.latents).prev_sample
        run.index += 1

    @torch.no_grad()
    def __call__(self, seeds: Sequence[int], num_inference_steps: int, guidance_scale: float,
                 latent_size: int) -> torch.Tensor:
        run = self.begin(seeds, num_inference_steps, guidance_scale, latent_size)
        while not run.done:
            self.step(run, self.call(run))
        return run.latents


@dataclass
class DenoisingRun:
    """A generation in progress: latents, the sampler's timesteps, the index of the next call, the guidance."""

    latents: torch.Tensor
    timesteps: list[torch.Tensor]
    guidance_scale: float
    cfg: bool
    conditioning: dict[str, Any]
    index: int = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)


# --- ViT architectures ---------------------------------------------------------------------------------------------
VIT_ARCH_MODELS = ("deit_small_patch16_224", "vit_base_patch16_224")
