"""The embedded class-conditional digits diffusion model: a small pixel-space diffusers ``UNet2DConditionModel``.

Architecture: Stable Diffusion's block layout (``CrossAttnDownBlock2D`` x2, ``DownBlock2D`` / ``UpBlock2D``,
``CrossAttnUpBlock2D`` x2, a cross-attention mid block) on 1x32x32 images in [-1, 1], so the top-level
transformer blocks see 32x32 = 1024 tokens, as token-reduction methods for Stable Diffusion expect.
Conditioning: :class:`ClassEmbedding`, a learned table turning a digit (or the "null" class used for
classifier-free guidance) into ``encoder_hidden_states`` of a few tokens, the role CLIP's text encoder plays
in Stable Diffusion. Epsilon prediction; trained with ``DDPMScheduler``, sampled with ``DDIMScheduler``.

Weights: ``weights/digits_diffusion.safetensors`` (U-Net under ``unet.``, the class table under
``class_embed.``) with its config in ``weights/digits_diffusion.json``
(reproduce with ``python -m tokred.tasks.embedded.train_diffusion``).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .common import WEIGHTS_DIR, read_weights

DEFAULT_WEIGHTS = WEIGHTS_DIR / "digits_diffusion.safetensors"
NUM_CLASSES = 10

# Keyword arguments of diffusers.UNet2DConditionModel. Note that diffusers reads ``attention_head_dim`` as
# the NUMBER of heads per level (a historical naming quirk): (1, 1, 2) with 16/32/64 channels gives one 16-d
# head in the 1024-token blocks and 32-d heads below. The top level is narrow because on a CPU its three
# 1024-token self-attentions dominate the cost of a step whatever the width.
DEFAULT_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": [1, 1, 2],
    "norm_num_groups": 8,
}
DEFAULT_CLASS_EMBED_CONFIG: dict[str, Any] = {"num_classes": NUM_CLASSES, "num_tokens": 4, "dim": 32}
# diffusers scheduler config shared by the training (DDPM) and sampling (DDIM) schedulers
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "timestep_spacing": "trailing",
}
DEFAULT_GUIDANCE_SCALE = 2.0
DEFAULT_NUM_INFERENCE_STEPS = 20


class ClassEmbedding(nn.Module):
    """Digit labels -> ``encoder_hidden_states`` ``[B, num_tokens, dim]`` for the U-Net's cross-attention.

    Row ``num_classes`` of the table is the "null" class: the unconditional input of classifier-free
    guidance (training replaces a fraction of labels with it).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, num_tokens: int = 4, dim: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_tokens = num_tokens
        self.dim = dim
        self.embedding = nn.Embedding(num_classes + 1, num_tokens * dim)
        nn.init.normal_(self.embedding.weight, std=1.0)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.embedding.weight.device)
        return self.embedding(labels).view(labels.shape[0], self.num_tokens, self.dim)


class DigitsDiffusionModel(NamedTuple):
    """What :func:`load_digits_diffusion` returns; unpacks as ``unet, class_embed, scheduler``."""

    unet: nn.Module
    class_embed: ClassEmbedding
    scheduler: Any


def default_config() -> dict[str, Any]:
    """The full config (as stored in ``digits_diffusion.json``) of a freshly built model."""
    return copy.deepcopy(
        {
            "unet": DEFAULT_UNET_CONFIG,
            "class_embed": DEFAULT_CLASS_EMBED_CONFIG,
            "scheduler": DEFAULT_SCHEDULER_CONFIG,
            "sampling": {"guidance_scale": DEFAULT_GUIDANCE_SCALE, "num_inference_steps": DEFAULT_NUM_INFERENCE_STEPS},
        }
    )


def merge_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """:func:`default_config` with the entries of each section of ``config`` overriding the defaults."""
    merged = default_config()
    for key, value in (config or {}).items():
        if key not in merged:
            raise ValueError(f"unknown digits diffusion config section {key!r}; valid: {', '.join(merged)}")
        merged[key].update(value)
    return merged


def build_digits_diffusion(config: dict[str, Any] | None = None) -> tuple[nn.Module, ClassEmbedding]:
    """A randomly initialised ``(unet, class_embed)``; ``config`` sections override :func:`default_config`."""
    from diffusers import UNet2DConditionModel

    config = merge_config(config)
    unet = UNet2DConditionModel(**config["unet"])
    class_embed = ClassEmbedding(**config["class_embed"])
    if class_embed.dim != unet.config.cross_attention_dim:
        raise ValueError(
            f"class embedding dim {class_embed.dim} != the U-Net's cross_attention_dim "
            f"{unet.config.cross_attention_dim}"
        )
    return unet, class_embed


def make_scheduler(kind: str = "ddim", config: dict[str, Any] | None = None):
    """A diffusers scheduler (``"ddim"``, ``"ddpm"`` or ``"dpm"`` = DPMSolverMultistep) with the model's noise
    schedule (``config``: the ``scheduler`` section of the model config; default :data:`DEFAULT_SCHEDULER_CONFIG`)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler}
    if kind not in classes:
        raise ValueError(f"unknown scheduler {kind!r}; valid: {', '.join(classes)}")
    config = {**DEFAULT_SCHEDULER_CONFIG, **(config or {})}
    if kind == "dpm":
        # DPM-Solver has no clip_sample; thresholding plays that role
        config.pop("clip_sample", None)
        config.pop("clip_sample_range", None)
    return classes[kind].from_config(config)


def state_dict_for_saving(unet: nn.Module, class_embed: nn.Module, dtype: torch.dtype = torch.float32):
    """One flat state dict: ``unet.*`` and ``class_embed.*`` tensors in ``dtype``."""
    state = {f"unet.{k}": v.to(dtype) for k, v in unet.state_dict().items()}
    state.update({f"class_embed.{k}": v.to(dtype) for k, v in class_embed.state_dict().items()})
    return state


def load_digits_diffusion(weights_path: str | os.PathLike | None = None) -> DigitsDiffusionModel:
    """The trained digits diffusion model (fp32, eval mode): ``(unet, class_embed, scheduler)``.

    ``weights_path`` defaults to the shipped weights; the architecture comes from the JSON config beside it
    (or the ``config`` entry of the safetensors metadata). ``scheduler`` is a fresh ``DDIMScheduler`` with the
    model's noise schedule, the one :func:`sample_digits` uses by default.
    """
    path = Path(weights_path) if weights_path is not None else DEFAULT_WEIGHTS
    state, config = read_weights(path, "digits diffusion", "train_diffusion")
    config = merge_config(config)
    unet, class_embed = build_digits_diffusion(config)
    for prefix, module in (("unet.", unet), ("class_embed.", class_embed)):
        part = {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)
    return DigitsDiffusionModel(unet.eval(), class_embed.eval(), make_scheduler("ddim", config["scheduler"]))


def _initial_noise(n: int, generator, device: torch.device) -> torch.Tensor:
    """``[n, 1, 32, 32]`` standard normal noise drawn on the CPU (the same images on every device); with a
    list of generators, sample ``i`` uses ``generator[i]``, so an image depends only on its own seed."""
    shape = (1, 32, 32)
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} labels")
        noise = torch.cat([torch.randn((1, *shape), generator=g, device=g.device) for g in generator])
    else:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn((n, *shape), generator=generator, device=gen_device)
    return noise.to(device, torch.float32)


@torch.no_grad()
def sample_digits(
    unet: nn.Module,
    class_embed: nn.Module,
    labels: torch.Tensor | Sequence[int],
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    scheduler: Any = None,
) -> torch.Tensor:
    """Generate one image per label with classifier-free guidance; returns ``[N, 1, 32, 32]`` in [-1, 1].

    As in Stable Diffusion's pipeline, with ``guidance_scale > 1`` the unconditional (null class) and
    conditional halves run as one batch of 2N through the U-Net, called as
    ``unet(sample, t, encoder_hidden_states=...)``; ``scheduler.set_timesteps`` is called at the start of
    every generation (token-reduction patches use that call to detect a new generation).

    Args:
        labels: digits 0..9, ``[N]``.
        generator: a CPU generator for all the initial noise, or one per label (per-image seeds).
        scheduler: any diffusers scheduler with the model's noise schedule; default a DDIM one
            (:func:`make_scheduler`). It is reconfigured in place by ``set_timesteps``.
    """
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be digits 0..{NUM_CLASSES - 1}, got {labels.tolist()}")
    n = labels.shape[0]
    if scheduler is None:
        scheduler = make_scheduler("ddim")
    cfg = guidance_scale > 1.0

    scheduler.set_timesteps(num_inference_steps, device=device)
    sample = _initial_noise(n, generator, device) * scheduler.init_noise_sigma
    cond = class_embed(labels.to(device)).to(dtype)
    if cfg:
        null = torch.full_like(labels, class_embed.null_class)
        context = torch.cat([class_embed(null.to(device)).to(dtype), cond])
    else:
        context = cond
    # stochastic schedulers (DDPM, ancestral) draw their noise from the same generator(s)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}

    for t in scheduler.timesteps:
        model_input = torch.cat([sample, sample]) if cfg else sample
        model_input = scheduler.scale_model_input(model_input, t)
        eps = unet(model_input.to(dtype), t, encoder_hidden_states=context).sample.float()
        if cfg:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        sample = scheduler.step(eps, t, sample, **step_kwargs).prev_sample
    return sample.clamp(-1.0, 1.0)
