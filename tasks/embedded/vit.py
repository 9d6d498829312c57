"""The embedded digits classifier: a small timm ``VisionTransformer`` on 32x32 grey digits in [-1, 1].

4x4 patches give 64 patch tokens plus a cls token; classification reads the cls token (``global_pool="token"``),
which token-merging methods such as ToMe keep apart, so merging patch tokens visibly trades accuracy for speed.
Weights: ``weights/digits_vit.safetensors`` with its config in ``weights/digits_vit.json``
(reproduce with ``python -m tokred.tasks.embedded.train_vit``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import WEIGHTS_DIR, read_weights

DEFAULT_WEIGHTS = WEIGHTS_DIR / "digits_vit.safetensors"

# Keyword arguments of timm.models.vision_transformer.VisionTransformer.
DEFAULT_CONFIG: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 96,
    "depth": 6,
    "num_heads": 3,
    "mlp_ratio": 2.0,
    "class_token": True,
    "global_pool": "token",
}


def build_digits_vit(config: dict[str, Any] | None = None) -> nn.Module:
    """A randomly initialised digits ViT; ``config`` entries override :data:`DEFAULT_CONFIG`."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**{**DEFAULT_CONFIG, **(config or {})})


def load_digits_vit(weights_path: str | os.PathLike | None = None) -> nn.Module:
    """The trained digits ViT (fp32, eval mode) from ``weights_path`` (default: the shipped weights).

    The architecture comes from the JSON config beside the weights file if there is one, else from the
    ``config`` entry of the safetensors metadata, else :data:`DEFAULT_CONFIG`.
    """
    path = Path(weights_path) if weights_path is not None else DEFAULT_WEIGHTS
    state, config = read_weights(path, "digits ViT", "train_vit")
    model = build_digits_vit(config)
    state = {k: v.float() for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` on images in [-1, 1]."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size])
        correct += (logits.argmax(-1) == labels[i : i + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(len(images), 1)
