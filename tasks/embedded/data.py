"""The digits data set (scikit-learn's ``load_digits``) with one fixed train/test split.

Every consumer (the two training scripts and the benchmark tasks) goes through :func:`load_digits_split`, so
the held-out images are the same everywhere: a stratified 80/20 split with seed 0 (1437 train, 360 test).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "test")
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    labels = _raw_digits()[1]
    train, test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    # sorted so that the order does not depend on train_test_split's shuffling internals
    return {"train": np.sort(train), "test": np.sort(test)}


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def load_digits_split(split: str, resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one split of the digits.

    Args:
        split: ``"train"`` or ``"test"``.
        resolution: side of the returned images; the 8x8 originals are resized bilinearly (32 is the
            resolution both embedded models use).

    Returns:
        ``images``: float32 ``[N, 1, resolution, resolution]`` in [-1, 1] (-1 = background);
        ``labels``: int64 ``[N]`` in 0..9. Fresh tensors on every call (callers may modify them).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; valid splits: {', '.join(SPLITS)}")
    if int(resolution) < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    images, labels = _raw_digits()
    idx = _split_indices()[split]
    # pixel values are ink counts 0..16
    x = torch.from_numpy(images[idx]).unsqueeze(1) / 16.0
    if resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp_(-1.0, 1.0)
    return x.contiguous(), torch.from_numpy(labels[idx]).clone()


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    max_rotation: float = 12.0,
    max_shift: float = 2.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Light augmentation for training: a random rotation (degrees), shift (pixels) and scale per image.

    ``images`` are ``[N, C, H, W]`` in [-1, 1]; pixels moved in from outside the image are background (-1).
    The draws come from ``generator`` (CPU), so a seeded generator makes the augmentation reproducible.
    """
    n, _, h, w = images.shape
    rand = torch.rand(n, 4, generator=generator)
    angle = torch.deg2rad((rand[:, 0] * 2 - 1) * max_rotation)
    scale = scale_range[0] + rand[:, 1] * (scale_range[1] - scale_range[0])
    # affine_grid works in normalised coordinates where the image spans [-1, 1], i.e. 2/side per pixel
    tx = (rand[:, 2] * 2 - 1) * max_shift * 2.0 / w
    ty = (rand[:, 3] * 2 - 1) * max_shift * 2.0 / h
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # sample in [0, 2] so that zero padding means background, then shift back to [-1, 1]
    out = F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out - 1.0
