"""diffusers DiTs built from ``BasicTransformerBlock``: ``PixArtTransformer2DModel`` (PixArt-α, PixArt-Σ) and
``DiTTransformer2DModel`` (DiT-XL/2), alone or as ``pipeline.transformer`` (``PixArtAlphaPipeline``,
``PixArtSigmaPipeline``, ``DiTPipeline``).

Both models patchify the latent (``PatchEmbed``: ``h, w = latent / patch_size``, row-major, position embedding
added once before the blocks) and run a stack of ``BasicTransformerBlock``s on that one patch grid: PixArt's
with ``norm_type="ada_norm_single"`` (a per-block ``scale_shift_table`` plus the shared timestep embedding;
self-attention ``attn1`` over the image tokens, cross-attention ``attn2`` to the T5 caption tokens, which are
keys/values only), DiT's with ``norm_type="ada_norm_zero"`` (timestep and class-label embedding per block; no
cross-attention). They are the U-Net's transformer block, so the adapter runs them through the U-Net adapter's
reproduction of ``BasicTransformerBlock.forward`` (:func:`~tokred.adapters.diffusers_unet.planned_forward`,
diffusers 0.42.1, which covers every norm type) with the same reduction points:

* ``attn`` / ``cross`` / ``mlp``: reduce/restore of the image tokens around self-attention, cross-attention (the
  image tokens are its queries; the text tokens are never reduced) and the MLP;
* ``kv``: the image tokens self-attention's keys and values are projected from, and hooks on the projected keys
  and values (``attn1.to_k`` / ``attn1.to_v``; diffusers' own ``AttnProcessor2_0`` computes attention);
* the denoiser's output (PixArt's ``proj_out``, DiT's ``proj_out_2``: per-patch noise and learned variance,
  ``patch_size**2 * out_channels`` values per token) as tokens on the patch grid (:meth:`install_output`).

One family for both models: their blocks, grid and reduction points are the same, so every method takes the
same options on both; what differs (PixArt's cross-attention, DiT's class labels) lives in the block, whose
forward handles it. A cross-attention option on DiT, which has none, is refused by the methods that offer it.
Every block runs on the same grid: block calls get ``level=1`` and ``Grid(h, w, 1)``, there is no
``max_downsample``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UnsupportedModelError
from ..reduction import Grid, Planner
from .base import Adapter, attach_denoiser_state, has_class_named, hook_prediction
from .diffusers_unet import SUPPORTED_NORM_TYPES, block_forward, require_attn1_kv_hooks

if TYPE_CHECKING:
    from ..patch import Patch

# class name -> (timestep position in its forward, output layer holding the per-patch prediction)
MODELS = {
    "PixArtTransformer2DModel": (2, "proj_out"),  # forward(hidden_states, encoder_hidden_states, timestep, ...)
    "DiTTransformer2DModel": (1, "proj_out_2"),  # forward(hidden_states, timestep, class_labels, ...)
}


class DiffusersDiTAdapter(Adapter):
    family = "diffusers_dit"
    description = (
        "diffusers PixArtTransformer2DModel (PixArt-α/Σ) and DiTTransformer2DModel (DiT), alone or as a "
        "pipeline's .transformer"
    )

    def __init__(self, container: Any, transformer: torch.nn.Module, model: str) -> None:
        super().__init__(container, transformer)
        self.model = model  # "PixArtTransformer2DModel" or "DiTTransformer2DModel"
        self.blocks = [(n, m) for n, m in transformer.named_modules() if has_class_named(m, "BasicTransformerBlock")]
        self.patch_size = int(transformer.config.patch_size)

    @classmethod
    def match(cls, obj: Any) -> DiffusersDiTAdapter | None:
        transformer = getattr(obj, "transformer", None) if not isinstance(obj, torch.nn.Module) else obj
        if transformer is None:
            return None
        for model in MODELS:
            if has_class_named(transformer, model, "diffusers."):
                return cls(obj, transformer, model)
        return None

    @property
    def has_cross_attention(self) -> bool:
        return any(block.attn2 is not None for _, block in self.blocks)

    def check(self) -> None:
        if not self.blocks:
            raise UnsupportedModelError(f"this {self.model} has no BasicTransformerBlock to reduce tokens in")
        from diffusers.models.attention import BasicTransformerBlock

        for name, block in self.blocks:
            # planned_forward reproduces BasicTransformerBlock.forward; a subclass with its own would be replaced
            if type(block).forward is not BasicTransformerBlock.forward:
                raise UnsupportedModelError(
                    f"block {name} is {type(block).__name__}, a BasicTransformerBlock with its own forward; tokred "
                    "reproduces diffusers' BasicTransformerBlock.forward and cannot patch a different one"
                )
            norm_type = getattr(block, "norm_type", "layer_norm")
            if norm_type not in SUPPORTED_NORM_TYPES:
                raise UnsupportedModelError(
                    f"block {name} has norm_type={norm_type!r}; supported: {', '.join(SUPPORTED_NORM_TYPES)}"
                )

    def attach(self, patch: Patch) -> None:
        timestep_pos, _ = MODELS[self.model]
        attach_denoiser_state(
            patch, self.container, self.root, sample=("hidden_states", 0), timestep=("timestep", timestep_pos)
        )

    def grid(self, latent_size: tuple[int, int] | None, num_tokens: int, level: int = 1) -> Grid | None:
        """The image-token grid for a latent of ``latent_size`` (patchified, row-major), or None if
        ``num_tokens`` does not fill it."""
        if latent_size is None:
            return None
        h, w = latent_size[0] // self.patch_size, latent_size[1] // self.patch_size
        return Grid(h, w, 1) if h * w == num_tokens else None

    def require_kv_hooks(self, names: set[str] | None, method: str) -> None:
        """Refuse blocks whose self-attention does not project keys/values with ``to_k``/``to_v``."""
        require_attn1_kv_hooks(self.blocks, names, method)

    def install_blocks(self, patch: Patch, planner: Planner, names: set[str] | None = None) -> None:
        """Run the blocks (those in ``names``; default all) through the U-Net adapter's
        :func:`~tokred.adapters.diffusers_unet.block_forward` on the patch grid."""
        for index, (name, block) in enumerate(self.blocks):
            if names is None or name in names:
                patch.replace_forward(block, block_forward(patch, planner, name, index, 1, grid=self.grid))

    def install_output(self, patch: Patch, fn: Callable[[torch.Tensor, Grid], torch.Tensor]) -> None:
        """``fn(tokens [B, N, p*p*C_out], grid)`` rewrites the per-patch prediction (noise and, with learned
        sigma, the variance) of PixArt's ``proj_out`` / DiT's ``proj_out_2``, in every counted call."""
        _, layer = MODELS[self.model]
        proj = getattr(self.root, layer, None)
        if not isinstance(proj, torch.nn.Linear):
            raise UnsupportedModelError(f"this {self.model} has no {layer} Linear layer to read the prediction from")
        hook_prediction(patch, proj, lambda n: self.grid(patch.state.latent_size, n), fn)
