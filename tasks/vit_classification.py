"""Image classification with a timm Vision Transformer: accuracy, agreement with the unreduced model, GFLOPs and
memory, each quality metric with a 95% (Wilson) interval. The harness times the workload (images/s, speedup).

Models and data
    The task's ``workloads`` (:mod:`tokred.tasks.classification_workloads`), keyed by ``size``: the embedded digits
    ViT on its test split (:class:`EmbeddedDigitsViT`, default), a real architecture at random init on random
    images, speed only (:class:`RandomInitViT`), and any timm ViT with its weights on ImageFolder data
    (:class:`PretrainedViT`). ``num_images`` takes an evenly spaced subset of the evaluation data.
Metrics
    ``top1``/``top5`` (%), ``agreement`` (% of top-1 predictions equal to the unreduced model's, after
    :meth:`record_reference`; not reported for the unreduced model itself), ``gflops`` per image, ``peak_mem_mb``
    (see :mod:`tokred.bench.measure`); ``latency_ms`` per batch and ``throughput_per_s`` come from the harness.
    A workload with random weights has no quality: ``record_reference`` and ``evaluate`` return an empty result.

>>> task = get_task("vit_classification")(); task.setup(); task.record_reference()
>>> patch = tokred.apply(task.model, "tome", r=4); task.evaluate(); task.measure_speed(); patch.remove()
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from tokred.bench.measure import flops_and_memory, resolve_device, synchronize, torch_dtype
from tokred.bench.task import Metric, Quality, Task, check_bool, check_int, register_task
from tokred.bench.workload import TimedCall

from . import sharding
from .classification_workloads import (
    DEFAULT_FULL_MODEL,
    EMBEDDED_MODEL,
    VIT_ARCH_MODELS,
    ClassificationWorkload,
    EmbeddedDigitsViT,
    PretrainedViT,
    RandomInitViT,
    create_timm_vit,
    data_config,
    image_folder,
)
from .quality import proportion, topk_correct

__all__ = [
    "DEFAULT_FULL_MODEL",
    "EMBEDDED_MODEL",
    "VIT_ARCH_MODELS",
    "EmbeddedDigitsViT",
    "PretrainedViT",
    "RandomInitViT",
    "VitClassification",
    "create_timm_vit",
    "data_config",
    "image_folder",
]


def _progress(iterable, enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, **kwargs)


@register_task("vit_classification")
class VitClassification(Task):
    """Top-1/top-5 accuracy, agreement with the unreduced model, throughput, latency, GFLOPs and peak memory of a
    timm ViT classifier (embedded digits ViT by default)."""

    summary = "timm ViT image classification: accuracy, agreement, images/s, GFLOPs, memory"
    family = "timm_vit"
    metrics = (
        Metric("top1", "higher", "%", primary=True, note=(
            "accuracy against the labels, compared with the baseline on the same images (McNemar's exact test "
            "and its interval): what a reader of a classification table wants, and a few hundred paired images "
            "separate a preset that changes a few percent of the predictions")),
        Metric("top5", "higher", "%"),
        Metric("agreement", "higher", "%", reference=True, self_value=100.0),
        Metric("latency_ms", "lower", "ms", "speed"),
        Metric("throughput_per_s", "higher", "img/s", "speed"),
        Metric("gflops", "lower", "GFLOPs", "speed"),
        Metric("peak_mem_mb", "lower", "MB", "speed"),
    )

    workloads = {kind.kind: kind for kind in (EmbeddedDigitsViT, RandomInitViT, PretrainedViT)}

    def __init__(
        self,
        size: str = EmbeddedDigitsViT.kind,
        device: str = "cpu",
        dtype: str = "float32",
        *,
        model: str | None = None,
        pretrained: bool | None = None,
        checkpoint: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        data_dir: str | None = None,
        num_images: int | None = None,
        batch_size: int | None = None,
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        """Every setting is checked here (a ValueError naming it and its valid range); a setting of another
        workload than ``size``'s is refused, naming the size that takes it.

        Args:
            size: the workload, a key of :attr:`workloads` (see :mod:`tokred.tasks.classification_workloads`).
            model: timm model name (real architectures; default ``deit_small_patch16_224``).
            pretrained: load timm's pretrained weights (HF cache; default True); False = random init (speed only).
                Pretrained models only; the random-init architectures accept only False.
            checkpoint: a local weights file for ``model`` (overrides ``pretrained``; pretrained models only).
            model_kwargs: extra ``timm.create_model`` arguments (e.g. ``img_size``, ``num_classes``).
            data_dir: ImageFolder-style evaluation data (pretrained models only).
            num_images: int >= 1: evaluate on an evenly spaced subset of this many images (default: all).
            batch_size: int >= 1, the evaluation and timing batch (default: the workload's; 64 embedded, 32 real
                models, 8 for a random-init architecture on CPU).
            num_workers: int >= 0 DataLoader workers for image decoding.
            progress: tqdm progress bars.
        """
        super().__init__(size=size, device=device, dtype=dtype)
        kind: type[ClassificationWorkload] = self.workloads[size]
        given = dict(model=model, pretrained=pretrained, checkpoint=checkpoint, model_kwargs=model_kwargs,
                     data_dir=data_dir)  # fmt: skip
        self.spec: ClassificationWorkload = kind(**kind.check_settings(self.workloads, given))
        check_int("num_images", num_images, 1, none_ok=True)
        check_int("batch_size", batch_size, 1, none_ok=True)
        check_int("num_workers", num_workers, 0)
        check_bool("progress", progress)
        self.num_images = num_images
        self.batch_size = batch_size if batch_size is not None else kind.default_batch_size(device)
        self.num_workers = num_workers
        self.progress = progress
        self.dataset: Dataset | None = None
        self.input_size: tuple[int, ...] | None = None
        self.reference: torch.Tensor | None = None
        self._batch: torch.Tensor | None = None

    @property
    def model_name(self) -> str:
        return self.spec.model_name

    @property
    def pretrained(self) -> bool:
        """Whether the model loads timm's pretrained weights."""
        return self.spec.pretrained

    def notes(self) -> list[str]:
        return self.spec.notes()

    # --- setup -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.torch_device = resolve_device(self.device)
        self.torch_dtype = torch_dtype(self.dtype)
        model = self.spec.build(self.torch_device, self.torch_dtype)
        self.input_size = self.spec.input_size
        self.dataset = self.spec.dataset()
        if self.dataset is not None and self.num_images is not None and self.num_images < len(self.dataset):
            step = len(self.dataset) / self.num_images
            self.dataset = Subset(self.dataset, [int(i * step) for i in range(self.num_images)])
        self._batch = None
        self.model = model

    def _require_setup(self) -> None:
        if self.model is None:
            raise RuntimeError("call task.setup() first")

    # --- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _predict(self, desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-1 predictions, top-1 and top-5 hits for every evaluation image, in dataset order (sharded)."""
        self._require_setup()
        if self.dataset is None:
            raise FileNotFoundError(f"no evaluation data for size={self.size!r}: {self.spec.data_hint}")
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

    def record_reference(self) -> Quality:
        """Keep the unreduced model's top-1 predictions for :meth:`evaluate`'s ``agreement``, and return the
        unreduced model's accuracy from those predictions (random weights, speed only: an empty result)."""
        if self.random_weights:
            self.reference = None
            return Quality()
        self.reference, top1, top5 = self._predict("reference")
        return self._score(top1, top5)

    @staticmethod
    def _score(top1: torch.Tensor, top5: torch.Tensor) -> Quality:
        out = Quality()
        out.add("top1", *proportion(top1), per_image=top1.tolist(), binary=True)
        out.add("top5", *proportion(top5), per_image=top5.tolist(), binary=True)
        return out

    def evaluate(self) -> Quality:
        """Top-1/top-5 accuracy and (after :meth:`record_reference`) agreement, with Wilson intervals. Random
        weights (speed only) have no quality: an empty result."""
        if self.random_weights:
            return Quality()
        preds, top1, top5 = self._predict("evaluate")
        out = self._score(top1, top5)
        if self.reference is not None:
            if preds.shape != self.reference.shape:
                raise ValueError(f"predictions {tuple(preds.shape)} and reference {tuple(self.reference.shape)} differ")
            agree = preds == self.reference
            out.add("agreement", *proportion(agree), per_image=agree.tolist(), binary=True)
        return out

    # --- speed -------------------------------------------------------------------------------------------
    def _timing_batch(self) -> torch.Tensor:
        if self._batch is None:
            batch = self.spec.timing_batch(self.dataset, self.batch_size)
            self._batch = batch.to(self.torch_device, self.torch_dtype)
        return self._batch

    def workload(self) -> TimedCall:
        """One forward pass of one batch (``batch_size`` images), synchronized on CUDA."""
        self._require_setup()
        batch = self._timing_batch()
        model, device = self.model, self.torch_device

        def run() -> torch.Tensor:
            with torch.no_grad():
                out = model(batch)
            synchronize(device)
            return out

        return TimedCall(run, unit=f"batch of {len(batch)} images")

    def measure_speed(self, flops: bool = True, memory: bool = True) -> dict[str, float]:
        """``gflops`` per image and ``peak_mem_mb`` of one forward pass of the timing batch (one call for both),
        and ``batch_size``. No latency: the harness times the workload."""
        self._require_setup()
        batch = self._timing_batch()
        model = self.model
        out = flops_and_memory(lambda: model(batch), self.torch_device, items=len(batch), flops=flops, memory=memory)
        out["batch_size"] = float(len(batch))
        return out

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            **self.spec.describe(),
            num_images=len(self.dataset) if self.dataset is not None else 0,
            batch_size=self.batch_size,
            input_size=list(self.input_size) if self.input_size else None,
        )
        if self.model is not None:
            info["params_m"] = round(sum(p.numel() for p in self.model.parameters()) / 1e6, 3)
        return info
