"""Image classification with a timm Vision Transformer: accuracy, agreement with the unreduced model, speed.

Model
    ``size="embedded"`` (default): the digits ViT shipped with tokred (32x32 grey images, 4x4 patches, 64 patch
    tokens + cls), trained on scikit-learn's digits; it runs offline in seconds and its accuracy is meaningful.
    ``size="full"``: any timm model name (``model=``, default ``deit_small_patch16_224``) of the ``timm_vit``
    family, with weights from ``pretrained=True`` (timm through the Hugging Face cache; ``HF_HUB_OFFLINE=1``
    forbids downloads), a local ``checkpoint=`` file, or ``pretrained=False`` (random: speed only).
Data
    embedded: the digits test split. full: ``data_dir=``, an ImageFolder layout (``<dir>/<class>/<image>``,
    class folders in sorted order = class indices, e.g. ImageNet val with one folder per synset), preprocessed
    with the model's own timm data config. Without ``data_dir`` a full model can still be timed on random
    images (``evaluate`` then raises). ``num_images`` takes an evenly spaced subset.
Metrics
    ``top1``/``top5`` (%), ``agreement`` (% of top-1 predictions equal to the unreduced model's, after
    :meth:`record_reference`), ``latency_ms`` per batch and ``throughput_per_s`` (images/s), synchronized on CUDA,
    ``gflops`` per image, ``peak_mem_mb`` (see :mod:`tokred.bench.measure`).

>>> task = get_task("vit_classification")(size="embedded"); task.setup(); task.record_reference()
>>> patch = tokred.apply(task.model, "tome", r=4); task.evaluate(); task.measure_speed(); patch.remove()
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from tokred.adapters.timm_vit import TimmViTAdapter
from tokred.bench.measure import measure, resolve_device, synchronize, torch_dtype
from tokred.bench.task import Metric, Task, register_task
from tokred.errors import UnsupportedModelError

from . import sharding
from .quality import agreement, topk_correct

DEFAULT_FULL_MODEL = "deit_small_patch16_224"
EMBEDDED_MODEL = "tokred-digits-vit"


def _progress(iterable, enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, **kwargs)


def _hf_cache_hint() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE, is_offline_mode

        offline = " (HF_HUB_OFFLINE is set: no download)" if is_offline_mode() else ""
        return f"the Hugging Face cache {HF_HUB_CACHE}{offline}"
    except ImportError:  # pragma: no cover
        return "the Hugging Face cache"


def create_timm_vit(
    name: str, pretrained: bool = True, checkpoint: str | None = None, model_kwargs: dict[str, Any] | None = None
) -> torch.nn.Module:
    """A timm model of the ``timm_vit`` family, with clear errors for unknown names, other families and
    missing weights. The family is checked on the meta device first, so nothing is downloaded for a model
    the task cannot use."""
    import timm

    model_kwargs = dict(model_kwargs or {})
    try:
        with torch.device("meta"):
            skeleton = timm.create_model(name, pretrained=False, **model_kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models('*vit*')") from err
        raise
    adapter = TimmViTAdapter.match(skeleton)
    if adapter is None:
        raise UnsupportedModelError(
            f"timm model {name!r} is a {type(skeleton).__name__}; the vit_classification task supports the "
            f"timm_vit family: {TimmViTAdapter.description}"
        )
    adapter.check()
    del skeleton

    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"checkpoint file {checkpoint!r} not found (checkpoint= must be a local file)")
        return timm.create_model(name, pretrained=False, checkpoint_path=checkpoint, **model_kwargs)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **model_kwargs)
    try:
        return timm.create_model(name, pretrained=True, **model_kwargs)
    except (OSError, RuntimeError) as err:  # LocalEntryNotFoundError is an OSError
        cfg = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) if "." not in name else None
        where = f"hf-hub:{cfg} in " if cfg else ""
        raise FileNotFoundError(
            f"pretrained weights for {name!r} not found: looked for {where}{_hf_cache_hint()}. Download them "
            f"once with network access, pass checkpoint=<local file>, or pretrained=False for random weights "
            f"(speed only). Cause: {type(err).__name__}: {err}"
        ) from err


def image_folder(data_dir: str, transform, num_classes: int) -> Dataset:
    """torchvision's ImageFolder with clear errors for a missing folder or a class count the model lacks."""
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data folder {data_dir!r} not found; expected an ImageFolder layout <data_dir>/<class>/<image> "
            "(e.g. ImageNet val with one sub-folder per synset, sorted = class index)"
        )
    try:
        dataset = ImageFolder(data_dir, transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise FileNotFoundError(f"data folder {data_dir!r} holds no class folders with images: {err}") from err
    if len(dataset.classes) != num_classes:
        raise ValueError(
            f"data folder {data_dir!r} has {len(dataset.classes)} class folders but the model predicts "
            f"{num_classes} classes; the i-th folder in sorted order must be class i"
        )
    return dataset


def data_config(model: torch.nn.Module) -> dict[str, Any]:
    """timm's preprocessing config for ``model``; the input size is the model's actual one (a model built with
    ``img_size=`` keeps its pretrained config's size otherwise)."""
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        config["input_size"] = (config["input_size"][0], *tuple(img_size))
    return config


@register_task("vit_classification")
class VitClassification(Task):
    """Top-1/top-5 accuracy, agreement with the unreduced model, throughput, latency, GFLOPs and peak memory of a
    timm ViT classifier (embedded digits ViT by default)."""

    summary = "timm ViT image classification: accuracy, agreement, images/s, GFLOPs, memory"
    family = "timm_vit"
    metrics = (
        Metric("top1", "higher", "%"),
        Metric("top5", "higher", "%"),
        Metric("agreement", "higher", "%"),
        Metric("latency_ms", "lower", "ms", "speed"),
        Metric("throughput_per_s", "higher", "img/s", "speed"),
        Metric("gflops", "lower", "GFLOPs", "speed"),
        Metric("peak_mem_mb", "lower", "MB", "speed"),
    )

    def __init__(
        self,
        size: str = "embedded",
        device: str = "cpu",
        dtype: str = "float32",
        *,
        model: str | None = None,
        pretrained: bool = True,
        checkpoint: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        data_dir: str | None = None,
        num_images: int | None = None,
        batch_size: int | None = None,
        num_workers: int = 0,
        warmup: int = 1,
        repeats: int = 5,
        progress: bool = True,
    ) -> None:
        """
        Args:
            model: timm model name (``size="full"``; default ``deit_small_patch16_224``).
            pretrained: load timm's pretrained weights (HF cache); False = random init (speed only).
            checkpoint: a local weights file for ``model`` (overrides ``pretrained``).
            model_kwargs: extra ``timm.create_model`` arguments (e.g. ``img_size``, ``num_classes``).
            data_dir: ImageFolder-style evaluation data (``size="full"``).
            num_images: evaluate on an evenly spaced subset of this many images (default: all).
            batch_size: evaluation and timing batch (default 64 embedded, 32 full).
            num_workers: DataLoader workers for image decoding.
            warmup, repeats: untimed and timed calls in :meth:`measure_speed` (median reported).
            progress: tqdm progress bars.
        """
        super().__init__(size=size, device=device, dtype=dtype)
        if size == "embedded" and (model is not None or checkpoint is not None or data_dir is not None):
            raise ValueError(
                "size='embedded' uses the embedded digits ViT and its test split; pass size='full' to use "
                "model=, checkpoint= or data_dir="
            )
        if num_images is not None and num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.model_name = EMBEDDED_MODEL if size == "embedded" else (model or DEFAULT_FULL_MODEL)
        self.pretrained = pretrained
        self.checkpoint = checkpoint
        self.model_kwargs = dict(model_kwargs or {})
        self.data_dir = data_dir
        self.num_images = num_images
        self.batch_size = batch_size or (64 if size == "embedded" else 32)
        self.num_workers = num_workers
        self.warmup = warmup
        self.repeats = repeats
        self.progress = progress
        self.dataset: Dataset | None = None
        self.input_size: tuple[int, ...] | None = None
        self.reference: torch.Tensor | None = None
        self._batch: torch.Tensor | None = None

    # --- setup -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.torch_device = resolve_device(self.device)
        self.torch_dtype = torch_dtype(self.dtype)
        if self.size == "embedded":
            from .embedded.data import load_digits_split
            from .embedded.vit import load_digits_vit

            model = load_digits_vit()
            images, labels = load_digits_split("test")
            self.dataset = TensorDataset(torch.as_tensor(images).float(), torch.as_tensor(labels).long())
            self.input_size = tuple(images.shape[1:])
        else:
            model = create_timm_vit(self.model_name, self.pretrained, self.checkpoint, self.model_kwargs)
            config = data_config(model)
            self.input_size = tuple(config["input_size"])
            if self.data_dir is not None:
                import timm.data

                transform = timm.data.create_transform(**config)
                self.dataset = image_folder(self.data_dir, transform, model.num_classes)
        if self.dataset is not None and self.num_images is not None and self.num_images < len(self.dataset):
            step = len(self.dataset) / self.num_images
            self.dataset = Subset(self.dataset, [int(i * step) for i in range(self.num_images)])
        self.model = model.eval().to(self.torch_device, self.torch_dtype)

    def _require_setup(self) -> None:
        if self.model is None:
            raise RuntimeError("call task.setup() first")

    # --- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _predict(self, desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-1 predictions, top-1 and top-5 hits for every evaluation image, in dataset order (sharded)."""
        self._require_setup()
        if self.dataset is None:
            raise FileNotFoundError(
                "no evaluation data: pass data_dir=<ImageFolder directory> (e.g. ImageNet val) for size='full'"
            )
        n, b = len(self.dataset), self.batch_size
        batches = [list(range(i, min(i + b, n))) for i in range(0, n, b)]
        with sharding.shard(batches) as mine:  # whole batches per process: the same batches for any process count
            loader = DataLoader(self.dataset, batch_sampler=mine, num_workers=self.num_workers)
            rows: list[tuple[int, bool, bool]] = []
            show = self.progress and sharding.is_main_process()
            for images, labels in _progress(loader, show, desc=desc, unit="batch"):
                logits = self.model(images.to(self.torch_device, self.torch_dtype)).float().cpu()
                hits = topk_correct(logits, labels, (1, 5))
                preds = logits.argmax(-1)
                for j in range(len(labels)):
                    rows.append((int(preds[j]), bool(hits[1][j]), bool(hits[5][j])))
        rows = sharding.gather(rows)
        preds = torch.tensor([r[0] for r in rows])
        return preds, torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows])

    def record_reference(self) -> None:
        """Keep the unreduced model's top-1 predictions for :meth:`evaluate`'s ``agreement``."""
        self.reference, _, _ = self._predict("reference")

    def evaluate(self) -> dict[str, float]:
        preds, top1, top5 = self._predict("evaluate")
        out = {"top1": 100.0 * top1.float().mean().item(), "top5": 100.0 * top5.float().mean().item()}
        if self.reference is not None:
            out["agreement"] = agreement(preds, self.reference)
        out["num_images"] = float(len(preds))
        return out

    # --- speed -------------------------------------------------------------------------------------------
    def _timing_batch(self) -> torch.Tensor:
        if self._batch is None:
            if self.dataset is not None:
                n = min(self.batch_size, len(self.dataset))
                batch = torch.stack([self.dataset[i][0] for i in range(n)])
            else:  # speed only: random images of the model's input size
                gen = torch.Generator().manual_seed(0)
                batch = torch.randn(self.batch_size, *self.input_size, generator=gen)
            self._batch = batch.to(self.torch_device, self.torch_dtype)
        return self._batch

    def workload(self):
        """One forward pass of one batch (``batch_size`` images), synchronized on CUDA."""
        self._require_setup()
        batch = self._timing_batch()
        model, device = self.model, self.torch_device

        def run() -> torch.Tensor:
            with torch.no_grad():
                out = model(batch)
            synchronize(device)
            return out

        return run

    def measure_speed(
        self,
        warmup: int | None = None,
        repeats: int | None = None,
        flops: bool = True,
        memory: bool = True,
        timing: bool = True,
    ) -> dict[str, float]:
        """``latency_ms`` (median per batch), ``throughput_per_s`` (images/s), ``gflops`` per image,
        ``peak_mem_mb`` and ``batch_size``; ``flops``/``memory``/``timing`` switch the three measurements."""
        self._require_setup()
        batch = self._timing_batch()
        model = self.model
        out = measure(
            lambda: model(batch),
            self.torch_device,
            items=len(batch),
            warmup=self.warmup if warmup is None else warmup,
            repeats=self.repeats if repeats is None else repeats,
            flops=flops,
            memory=memory,
            timing=timing,
        )
        out["batch_size"] = float(len(batch))
        return out

    def describe(self) -> dict[str, Any]:
        if self.size == "embedded":
            weights, data = "embedded (tokred digits ViT)", "scikit-learn digits, test split"
        else:
            weights = (
                f"checkpoint {self.checkpoint}"
                if self.checkpoint
                else ("timm pretrained (Hugging Face cache)" if self.pretrained else "random init (speed only)")
            )
            data = f"ImageFolder {self.data_dir}" if self.data_dir else "random images (speed only)"
        info = super().describe()
        info.update(
            model=self.model_name,
            weights=weights,
            data=data,
            num_images=len(self.dataset) if self.dataset is not None else 0,
            batch_size=self.batch_size,
            input_size=list(self.input_size) if self.input_size else None,
        )
        if self.model is not None:
            info["params_m"] = round(sum(p.numel() for p in self.model.parameters()) / 1e6, 3)
        return info
