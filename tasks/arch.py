"""The ``size="arch"`` workloads: the real architectures with random weights, built offline, for speed only.

* text_to_image: Stable Diffusion 1.5's ``UNet2DConditionModel`` (its full configuration,
  :func:`tasks.architectures.sd15_unet_config`) in a pipeline-like :class:`ArchDiffusion` (``.unet``,
  ``.scheduler``) that runs a real diffusers scheduler loop (DDIM with SD1.5's noise schedule) with
  classifier-free guidance, so the U-Net sees a batch of 2 per prompt and step-dependent methods (CA-ToMe's cache
  schedule, CAT's ``t0``) behave as in a generation. Text embeddings are random (77 tokens of the U-Net's
  cross-attention width); the output is the final latents (no VAE). ``architecture="sdxl"``: SDXL base 1.0's
  U-Net (:func:`tasks.architectures.sdxl_unet_config`) in the same loop, with its ``text_time`` conditioning
  (a random pooled embedding and the time ids of an uncropped square image); SDXL's noise schedule is SD1.5's, and
  DDIM stands in for its default Euler sampler.
* vit_classification: timm's DeiT-S (``deit_small_patch16_224``, the default) and ViT-B
  (``vit_base_patch16_224``) built with ``pretrained=False``, on random images.

Random weights make the token counts of feature-dependent methods (CA-ToMe's similarity threshold) differ from
those of trained weights; the results record the counts actually reached.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import architectures

SD15_NAME = "SD1.5 UNet2DConditionModel (random init)"
# Stable Diffusion 1.5's DDIM sampler (the scheduler config shipped with the model).
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
VAE_SCALE_FACTOR = 8  # SD's VAE: 512 px images are 64 x 64 latents
TEXT_TOKENS = 77  # CLIP's context length
VIT_ARCH_MODELS = ("deit_small_patch16_224", "vit_base_patch16_224")


# The U-Nets of the ``architecture`` setting: (description, configuration).
UNETS: dict[str, tuple[str, Any]] = {
    "sd15": (SD15_NAME, architectures.sd15_unet_config),
    "sdxl": ("SDXL base 1.0 UNet2DConditionModel (random init)", architectures.sdxl_unet_config),
}


def check_architecture(name: Any) -> str:
    if name not in UNETS:
        raise ValueError(f"unknown architecture {name!r}; valid: {', '.join(UNETS)}")
    return name


def unet_config(architecture: str = "sd15", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The U-Net configuration of ``architecture`` (see :data:`UNETS`) with ``overrides`` (e.g. a tiny one for
    tests); unknown keys raise here."""
    config = UNETS[check_architecture(architecture)][1]()
    if overrides:
        from diffusers import UNet2DConditionModel

        valid = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(
                f"unet_config: unknown UNet2DConditionModel arguments {', '.join(unknown)}; valid: "
                f"{', '.join(sorted(valid))}"
            )
        config.update(overrides)
    return config


def sd15_unet_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """SD1.5's U-Net configuration with ``overrides``."""
    return unet_config("sd15", overrides)


def latent_multiple(config: dict[str, Any]) -> int:
    """Latent sides must be a multiple of this: the U-Net halves them once per level but the last."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def build_unet(config: dict[str, Any], seed: int = 0) -> nn.Module:
    """The U-Net at random init (seeded: the same weights every time), in eval mode."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**config).eval()


def sd15_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)


class ArchDiffusion:
    """A text-to-image pipeline's shape around a random-init U-Net: ``.unet`` and ``.scheduler`` (so
    ``tokred.apply(pipe, ...)`` patches the U-Net and hooks ``scheduler.set_timesteps``), and
    ``__call__(seeds, num_inference_steps, guidance_scale, latent_size)`` returning the final latents.

    The text embeddings, one conditional and one unconditional ``[77, cross_attention_dim]``, are random and fixed
    at construction (``embedding_seed``); image ``i``'s initial latents come from its own seed.
    """

    def __init__(self, unet: nn.Module, scheduler: Any, embedding_seed: int = 0) -> None:
        self.unet = unet
        self.scheduler = scheduler
        param = next(unet.parameters())
        width = int(unet.config.cross_attention_dim)
        gen = torch.Generator().manual_seed(embedding_seed)
        text = torch.randn(2, TEXT_TOKENS, width, generator=gen)
        self.uncond, self.cond = (t.to(param.device, param.dtype) for t in text)
        # SDXL's text_time conditioning: a pooled text embedding (random, per branch) and six size/crop numbers
        self.pooled: tuple[torch.Tensor, torch.Tensor] | None = None
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            time_width = int(unet.config.addition_time_embed_dim) * 6
            pooled = torch.randn(2, int(unet.config.projection_class_embeddings_input_dim) - time_width, generator=gen)
            self.pooled = tuple(t.to(param.device, param.dtype) for t in pooled)

    def _added_cond(self, n: int, cfg: bool, latent_size: int) -> dict[str, torch.Tensor] | None:
        """SDXL's ``added_cond_kwargs`` for ``n`` images (both CFG branches with ``cfg``): the pooled embedding and
        the time ids of an uncropped square image, ``(h, w, 0, 0, h, w)`` in pixels, as its pipeline passes."""
        if self.pooled is None:
            return None
        uncond, cond = self.pooled
        pooled = torch.cat([uncond.expand(n, -1), cond.expand(n, -1)]) if cfg else cond.expand(n, -1)
        side = float(latent_size * VAE_SCALE_FACTOR)
        time_ids = torch.tensor([side, side, 0.0, 0.0, side, side], device=pooled.device, dtype=pooled.dtype)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], -1)}

    @torch.no_grad()
    def __call__(
        self, seeds: Sequence[int], num_inference_steps: int, guidance_scale: float, latent_size: int
    ) -> torch.Tensor:
        param = next(self.unet.parameters())
        device, dtype = param.device, param.dtype
        channels = int(self.unet.config.in_channels)
        latents = torch.cat(
            [
                torch.randn(1, channels, latent_size, latent_size, generator=torch.Generator().manual_seed(int(s)))
                for s in seeds
            ]
        ).to(device, torch.float32)
        n = len(seeds)
        cfg = guidance_scale > 1.0
        context = torch.cat([self.uncond.expand(n, -1, -1), self.cond.expand(n, -1, -1)]) if cfg else (
            self.cond.expand(n, -1, -1)
        )
        added = self._added_cond(n, cfg, latent_size)
        extra = {} if added is None else {"added_cond_kwargs": added}
        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = torch.cat([latents, latents]) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            eps = self.unet(model_input.to(dtype), t, encoder_hidden_states=context, **extra).sample.float()
            if cfg:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        return latents
