"""Quality metrics shared by the tasks: accuracy and agreement, FID, KID, CLIP score, PSNR and SSIM, each with
a 95% interval.

Images passed around here are ``uint8`` tensors ``[N, C, H, W]`` (what a saved PNG holds), so generated and
real images go through the same quantisation. The heavy parts (feature extraction) are plain modules the tasks
call per batch, so they can be sharded across processes; the statistics are then computed from the gathered
features with torchmetrics.

Intervals (:mod:`tokred.bench.stats`): Wilson score intervals for proportions (:func:`proportion`: top-1, top-5,
agreement, class accuracy); a percentile bootstrap over images of the mean for per-image scores (:func:`mean_score`:
PSNR, SSIM, CLIP score); for FID and KID a bootstrap over the generated images (:data:`QUALITY_RESAMPLES`
resamples, seed 0; the real or reference features stay fixed) with the bias correction of
:func:`tokred.bench.stats.bias_corrected_interval` (:func:`fid_with_ci`, :func:`kid_with_ci`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tokred.bench.stats import QUALITY_RESAMPLES, bias_corrected_interval, bootstrap_indices, mean_ci, wilson_percent

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


def _fid_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _fid_replicates(real: np.ndarray, fake: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """FID of each resample ``fake[indices[b]]`` against the fixed ``real`` set.

    ``tr sqrt(S_r S_f) = sum sqrt(eig(R S_f R))`` with ``R = sqrt(S_r)``; ``R S_f R = Y^T Y`` for the centred,
    scaled ``Y = X_c R / sqrt(n - 1)``, whose non-zero eigenvalues are those of the ``n x n`` Gram matrix
    ``Y Y^T``: the smaller of the two is decomposed, so a resample costs one ``n x d x d`` product.
    """
    mu_r, cov_r = _fid_statistics(real)
    root = _sqrtm_psd(np.atleast_2d(cov_r))
    trace_r = float(np.trace(np.atleast_2d(cov_r)))
    n, d = indices.shape[1], real.shape[1]
    out = np.empty(len(indices))
    for b, idx in enumerate(indices):
        x = fake[idx]
        mu = x.mean(axis=0)
        centred = (x - mu) / math.sqrt(n - 1)
        y = centred @ root
        gram = y @ y.T if n <= d else y.T @ y
        eig = np.clip(np.linalg.eigvalsh(gram), 0.0, None)
        out[b] = float(((mu - mu_r) ** 2).sum()) + trace_r + float((centred**2).sum()) - 2.0 * float(np.sqrt(eig).sum())
    return out


def fid_with_ci(
    real: torch.Tensor, fake: torch.Tensor, resamples: int = QUALITY_RESAMPLES, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """FID (:func:`fid_from_features`) and its 95% interval: a bootstrap over the generated features ``fake``
    (``real`` fixed), bias-corrected (resampling duplicates images, which inflates FID)."""
    value = fid_from_features(real, fake)
    r, f = real.double().numpy(), fake.double().numpy()
    replicates = _fid_replicates(r, f, bootstrap_indices(len(f), resamples, seed))
    return value, bias_corrected_interval(value, replicates)


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel (torchmetrics' defaults): ``(a . b / d + 1) ** 3``."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _kid_replicates(real: np.ndarray, fake: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The unbiased MMD^2 (polynomial kernel) of each resample ``fake[indices[b]]`` against all of ``real``."""
    k_rr = _poly_kernel(real, real)
    m = len(real)
    rr = (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
    k_ff, k_fr = _poly_kernel(fake, fake), _poly_kernel(fake, real)
    n = indices.shape[1]
    out = np.empty(len(indices))
    for b, idx in enumerate(indices):
        ff = k_ff[np.ix_(idx, idx)]
        out[b] = rr + (ff.sum() - np.trace(ff)) / (n * (n - 1)) - 2.0 * k_fr[idx].mean()
    return out


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID (mean and standard deviation over ``subsets`` random subsets) with torchmetrics'
    ``KernelInceptionDistance`` on precomputed features; the subset size is the smaller set's size, so every
    image takes part. The subsets are drawn from a private generator seeded with ``seed``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need [N, d] feature sets of one width, got {tuple(real.shape)}, {tuple(fake.shape)}")
    size = min(len(real), len(fake))
    if size < 2:
        raise ValueError("KID needs at least two real and two generated samples")
    with warnings.catch_warnings():  # "will save all extracted features": they are already all in memory here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size, normalize=True,
            sync_on_compute=False,
        )  # fmt: skip
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # compute() draws its subsets from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def kid_with_ci(
    real: torch.Tensor, fake: torch.Tensor, resamples: int = QUALITY_RESAMPLES, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """KID (torchmetrics, :func:`kid_from_features`) and its 95% interval: the spread of the full-sample KID over
    a bootstrap of the generated images (``real`` fixed), bias-corrected and centred on the KID. (torchmetrics'
    own standard deviation is that of KID over subsets, not an interval of the estimate.)"""
    value, _ = kid_from_features(real, fake, seed=seed)
    r, f = real.double().numpy(), fake.double().numpy()
    replicates = _kid_replicates(r, f, bootstrap_indices(len(f), resamples, seed))
    full = float(_kid_replicates(r, f, np.arange(len(f))[None])[0])
    lo, hi = bias_corrected_interval(full, replicates, floor=None)
    return value, (lo - full + value, hi - full + value)


# --- intervals of per-sample metrics ---------------------------------------------------------------------


def proportion(hits: Sequence[bool] | torch.Tensor) -> tuple[float, tuple[float, float], int]:
    """Percentage of true values, its 95% Wilson interval (percent) and the count."""
    values = [bool(h) for h in (hits.tolist() if isinstance(hits, torch.Tensor) else hits)]
    if not values:
        raise ValueError("no samples")
    k, n = sum(values), len(values)
    return 100.0 * k / n, wilson_percent(k, n), n


def mean_score(scores: Sequence[float]) -> tuple[float, tuple[float, float], int]:
    """Mean of per-image scores, its 95% percentile-bootstrap interval and the count."""
    values = [float(s) for s in scores]
    if not values:
        raise ValueError("no samples")
    return float(np.mean(values)), mean_ci(values), len(values)


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
