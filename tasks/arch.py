"""Deprecated (tokred 0.3): merged into :mod:`tokred.tasks.architectures`, the one architecture table; the
random-init workloads are :mod:`tokred.tasks.diffusion_workloads` and :mod:`tokred.tasks.classification_workloads`.

The names of tokred 0.2 keep working here for one minor version, each with a DeprecationWarning naming its
replacement.
"""

from __future__ import annotations

import warnings
from typing import Any

from . import architectures as _A


def _sd15_unet_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return _A.config_with("sd15", overrides)


def _unet_config(architecture: str = "sd15", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return _A.config_with(architecture, overrides)


def _latent_multiple(config: dict[str, Any]) -> int:
    return 2 ** (len(config["block_out_channels"]) - 1)


def _check_architecture(name: Any) -> str:
    return _A.get_architecture(name).name


class _ArchDiffusion(_A.RandomInitPipeline):
    def __init__(self, unet: Any, scheduler: Any, embedding_seed: int = 0) -> None:
        name = "sdxl" if getattr(unet.config, "addition_embed_type", None) == "text_time" else "sd15"
        super().__init__(name, unet, scheduler, embedding_seed)


# old name -> (replacement, what to use instead)
_MOVED: dict[str, tuple[Any, str]] = {
    "SD15_NAME": ("SD1.5 UNet2DConditionModel (random init)", "architectures.ARCHITECTURES['sd15'].description"),
    "SD15_SCHEDULER_CONFIG": (_A.SD15_SCHEDULER_CONFIG, "architectures.SD_DDIM_CONFIG"),
    "VAE_SCALE_FACTOR": (_A.VAE_SCALE_FACTOR, "architectures.VAE_SCALE_FACTOR"),
    "TEXT_TOKENS": (_A.CLIP_TOKENS, "architectures.CLIP_TOKENS"),
    "VIT_ARCH_MODELS": (_A.VIT_ARCH_MODELS, "architectures.VIT_ARCH_MODELS"),
    "sd15_unet_config": (_sd15_unet_config, "architectures.config_with('sd15', overrides)"),
    "unet_config": (_unet_config, "architectures.config_with(name, overrides)"),
    "check_architecture": (_check_architecture, "architectures.get_architecture(name)"),
    "latent_multiple": (_latent_multiple, "architectures.latent_multiple(name, config)"),
    "build_unet": (_A.build_unet, "architectures.build_unet"),
    "sd15_scheduler": (_A.sd15_scheduler, "architectures.sd15_scheduler"),
    "ArchDiffusion": (_ArchDiffusion, "architectures.RandomInitPipeline(architecture, denoiser, scheduler)"),
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value, instead = _MOVED[name]
    warnings.warn(f"tokred.tasks.arch.{name} is deprecated and goes in tokred 0.4; use tokred.tasks.{instead}",
                  DeprecationWarning, stacklevel=2)
    return value
