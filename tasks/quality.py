"""Quality metrics shared by the tasks: accuracy and agreement, FID, CLIP score, PSNR and SSIM.

Images passed around here are ``uint8`` tensors ``[N, C, H, W]`` (what a saved PNG holds), so generated and
real images go through the same quantisation. The heavy parts (feature extraction) are plain modules the tasks
call per batch, so they can be sharded across processes; the statistics are then computed from the gathered
features with torchmetrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; we report this instead so that averages stay finite


# --- classification ----------------------------------------------------------------------------------------


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per-sample booleans: is the label among the ``k`` highest logits, for each ``k`` (capped at the number of
    classes)."""
    maxk = min(max(ks), logits.shape[-1])
    top = logits.topk(maxk, dim=-1).indices
    hits = top == labels[:, None]
    return {k: hits[:, : min(k, maxk)].any(dim=-1) for k in ks}


def agreement(predictions: torch.Tensor, reference: torch.Tensor) -> float:
    """Percentage of samples whose top-1 prediction equals the reference model's."""
    if predictions.shape != reference.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and reference {tuple(reference.shape)} differ")
    return 100.0 * (predictions == reference).float().mean().item()


# --- image fidelity ----------------------------------------------------------------------------------------


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] (or float [0, 1]) images as float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float().clamp(0, 1)


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Float images in ``value_range`` as uint8 [0, 255] on the CPU (rounded, as an image file stores them)."""
    lo, hi = value_range
    unit = ((images.detach().float() - lo) / (hi - lo)).clamp(0, 1)
    return (unit * 255.0).round().to(torch.uint8).cpu()


def psnr_ssim(images: torch.Tensor, reference: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB, capped at :data:`PSNR_CAP_DB`) and SSIM of ``images`` against ``reference``.

    Both are uint8 (or [0, 1] float) ``[N, C, H, W]``; computed on [0, 1] with torchmetrics' functional
    metrics (Gaussian 11x11 SSIM window, or the image size when smaller).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    x, y = to_unit(images), to_unit(reference)
    psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = [min(float(v), PSNR_CAP_DB) if math.isfinite(float(v)) else PSNR_CAP_DB for v in psnr.reshape(-1)]
    kernel = min(11, x.shape[-1], x.shape[-2])
    kernel -= 1 - kernel % 2  # odd
    ssim = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none", kernel_size=kernel)
    return psnr, [float(v) for v in ssim.reshape(-1)]


class _Precomputed(nn.Module):
    """A torchmetrics FID "feature extractor" that receives features already extracted (possibly sharded)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between two feature sets ``[N, d]`` with torchmetrics' ``FrechetInceptionDistance``
    (float64 statistics). Each set needs at least two samples."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need [N, d] feature sets of one width, got {tuple(real.shape)}, {tuple(fake.shape)}")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError("FID needs at least two real and two generated samples")
    # sync_on_compute=False: under a multi-process launch every process holds all the (gathered) features; torchmetrics'
    # default would sum the statistics of all processes at compute() and change the covariance normalisation.
    metric = FrechetInceptionDistance(
        feature=_Precomputed(real.shape[1]), normalize=True, reset_real_features=True, sync_on_compute=False
    )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return max(float(metric.compute()), 0.0)  # rounding can give -1e-15 for identical sets


class PreLogitsFeatures(nn.Module):
    """FID feature extractor from a timm classifier: the pre-logits features (``forward_head(...,
    pre_logits=True)``) of images given as uint8 or [0, 1] floats, normalised with the classifier's ``mean`` and
    ``std`` (e.g. 0.5/0.5 for a model trained on [-1, 1] inputs)."""

    def __init__(self, model: nn.Module, mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5):
        super().__init__()
        self.model = model
        self.num_features = int(model.num_features)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        x = (to_unit(images).to(self.mean.device) - self.mean) / self.std
        feats = self.model.forward_head(self.model.forward_features(x.to(param.device, param.dtype)), pre_logits=True)
        return feats.float()

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        x = (to_unit(images).to(self.mean.device) - self.mean) / self.std
        return self.model(x.to(param.device, param.dtype)).float()


def inception_features(weights_path: str | None = None) -> nn.Module:
    """torchmetrics' FID Inception-v3 (2048-d pool features) on uint8 ``[N, 3, H, W]`` images.

    Needs the optional package ``torch-fidelity``. Offline, pass ``weights_path``: a local copy of
    ``pt_inception-2015-12-05-6726825d.pth`` (torchmetrics' ``feature_extractor_weights_path``); without it
    torch-fidelity downloads the weights from GitHub.
    """
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise ImportError(
            "FID with the Inception feature extractor needs the optional package torch-fidelity "
            "(`pip install torch-fidelity`); alternatively pass fid_features=<an nn.Module with num_features> "
            "to compute FID in another feature space"
        ) from None
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path
        )
    except Exception as err:  # torch-fidelity's download fails offline
        raise FileNotFoundError(
            f"could not load the FID Inception weights ({err}); pass inception_weights=<local path to "
            "pt_inception-2015-12-05-6726825d.pth>"
        ) from err
    net.num_features = 2048
    return net.eval()


# --- CLIP score ---------------------------------------------------------------------------------------------


class _PooledCLIP(nn.Module):
    """A CLIP model whose ``get_image_features``/``get_text_features`` return the projected pooled tensors.

    transformers 5 returns a ``BaseModelOutputWithPooling`` from both, which torchmetrics 1.9's CLIP score
    cannot normalise; this restores the tensor-returning interface torchmetrics expects.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out[1] if isinstance(out, (tuple, list)) else out["pooler_output"]
        return pooled

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


class ClipScorer:
    """CLIP score (``100 * max(cos(image, text), 0)``, torchmetrics) with a local or cached CLIP model.

    ``model_name_or_path`` is a Hugging Face id (looked up in the cache; downloads only when
    ``HF_HUB_OFFLINE`` is unset) or a local directory holding a ``CLIPModel`` and its processor.
    """

    def __init__(self, model_name_or_path: str, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(model_name_or_path)
            processor = CLIPProcessor.from_pretrained(model_name_or_path)
        except OSError as err:
            raise FileNotFoundError(
                f"CLIP weights {model_name_or_path!r} not found locally or in the Hugging Face cache "
                f"({_hf_cache()}): {err}"
            ) from err
        self.name = model_name_or_path
        self.device = torch.device(device)
        self.model = _PooledCLIP(model.eval().to(self.device))
        self.processor = processor

    def _loader(self) -> Callable[[], tuple[Any, Any]]:
        return lambda: (self.model, self.processor)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        """One CLIP score per (uint8 image, prompt) pair."""
        from torchmetrics.functional.multimodal import clip_score

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return [
            float(clip_score(img.to(self.device), prompt, model_name_or_path=self._loader()))
            for img, prompt in zip(images, prompts, strict=True)
        ]


def _hf_cache() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return HF_HUB_CACHE
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"
