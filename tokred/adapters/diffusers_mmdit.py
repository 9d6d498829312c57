"""diffusers MMDiTs: ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5), alone or as ``pipeline.transformer``.

The adapter finds the ``JointTransformerBlock`` modules (image and text streams side by side, joint attention
over both), tells the image-token grid from the latent size and the patch size, and counts denoiser calls and
generations with the same hook as the U-Net adapter (:func:`~tokred.adapters.base.attach_denoiser_state`):
``SD3Transformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)``.

Only the image tokens (``hidden_states`` inside the blocks) are candidates for reduction; the text stream is
short and is left alone. The blocks' order of image tokens is row-major over the patch grid, as
``PatchEmbed`` flattens it, so token ``i`` sits at ``(i // w, i % w)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import UnsupportedModelError
from .base import Adapter, attach_denoiser_state, has_class_named

if TYPE_CHECKING:
    from ..patch import Patch


class DiffusersMMDiTAdapter(Adapter):
    family = "diffusers_mmdit"
    description = "diffusers SD3Transformer2DModel (Stable Diffusion 3/3.5), alone or as a pipeline's .transformer"

    def __init__(self, container: Any, transformer: torch.nn.Module) -> None:
        super().__init__(container, transformer)
        self.blocks: list[tuple[str, torch.nn.Module]] = [
            (name, m) for name, m in transformer.named_modules() if has_class_named(m, "JointTransformerBlock")
        ]
        self.patch_size = int(transformer.config.patch_size)
        self.scheduler = getattr(container, "scheduler", None) if container is not transformer else None

    @classmethod
    def match(cls, obj: Any) -> DiffusersMMDiTAdapter | None:
        transformer = getattr(obj, "transformer", None) if not isinstance(obj, torch.nn.Module) else obj
        if transformer is not None and has_class_named(transformer, "SD3Transformer2DModel", "diffusers."):
            return cls(obj, transformer)
        return None

    def check(self) -> None:
        if not self.blocks:
            raise UnsupportedModelError("this SD3Transformer2DModel has no JointTransformerBlock to reduce tokens in")

    def attach(self, patch: Patch) -> None:
        attach_denoiser_state(patch, self.root, self.scheduler, sample=("hidden_states", 0), timestep=("timestep", 3))

    def grid(self, latent_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of the image-token grid for a latent of ``latent_size`` (patchified, row-major)."""
        return latent_size[0] // self.patch_size, latent_size[1] // self.patch_size
