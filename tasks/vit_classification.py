"""Image classification with a timm Vision Transformer: accuracy, agreement with the unreduced model, GFLOPs and
memory, each quality metric with a 95% (Wilson) interval. The harness times the workload (images/s, speedup).

Model
    ``size="embedded"`` (default): the digits ViT shipped with tokred (32x32 grey images, 4x4 patches, 64 patch
    tokens + cls), trained on scikit-learn's digits; it runs offline in seconds and its accuracy is meaningful.
    ``size="arch"``: a real architecture at random init (``pretrained=False``): DeiT-S
    (``deit_small_patch16_224``, default) or ViT-B (``model="vit_base_patch16_224"``), on random images: speed,
    FLOPs, memory and token counts only. ``size="full"``: any timm model name (``model=``, default
    ``deit_small_patch16_224``) of the ``timm_vit`` family, with weights from ``pretrained=True`` (timm through
    the Hugging Face cache; ``HF_HUB_OFFLINE=1`` forbids downloads), a local ``checkpoint=`` file, or
    ``pretrained=False`` (random: speed only).
Data
    embedded: the digits test split. full: ``data_dir=``, an ImageFolder layout (``<dir>/<class>/<image>``,
    class folders in sorted order = class indices, e.g. ImageNet val with one folder per synset), preprocessed
    with the model's own timm data config. Without ``data_dir`` a full model can still be timed on random
    images (``evaluate`` then raises). ``num_images`` takes an evenly spaced subset.
Metrics
    ``top1``/``top5`` (%), ``agreement`` (% of top-1 predictions equal to the unreduced model's, after
    :meth:`record_reference`; not reported for the unreduced model itself), ``gflops`` per image, ``peak_mem_mb``
    (see :mod:`tokred.bench.measure`); ``latency_ms`` per batch and ``throughput_per_s`` come from the harness.

>>> task = get_task("vit_classification")(size="embedded"); task.setup(); task.record_reference()
>>> patch = tokred.apply(task.model, "tome", r=4); task.evaluate(); task.measure_speed(); patch.remove()
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from tokred.adapters.timm_vit import TimmViTAdapter
from tokred.bench.contention import cpu_count
from tokred.bench.measure import flops_and_memory, resolve_device, synchronize, torch_dtype
from tokred.bench.task import Metric, Quality, Task, check_bool, check_int, register_task
from tokred.errors import UnsupportedModelError

from . import sharding
from .quality import proportion, topk_correct

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
        Metric("agreement", "higher", "%", reference=True),
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
        pretrained: bool | None = None,
        checkpoint: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        data_dir: str | None = None,
        num_images: int | None = None,
        batch_size: int | None = None,
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        """Every setting is checked here (a ValueError naming it and its valid range).

        Args:
            model: timm model name (``size="full"`` / ``"arch"``; default ``deit_small_patch16_224``).
            pretrained: full: load timm's pretrained weights (HF cache; default True); False = random init (speed
                only). arch is always random init.
            checkpoint: a local weights file for ``model`` (overrides ``pretrained``; full only).
            model_kwargs: extra ``timm.create_model`` arguments (e.g. ``img_size``, ``num_classes``).
            data_dir: ImageFolder-style evaluation data (``size="full"``).
            num_images: int >= 1: evaluate on an evenly spaced subset of this many images (default: all).
            batch_size: int >= 1, the evaluation and timing batch (default 64 embedded, 32 full and arch on CUDA,
                8 arch on CPU).
            num_workers: int >= 0 DataLoader workers for image decoding.
            progress: tqdm progress bars.
        """
        super().__init__(size=size, device=device, dtype=dtype)
        if size == "embedded" and (model is not None or checkpoint is not None or data_dir is not None):
            raise ValueError(
                "size='embedded' uses the embedded digits ViT and its test split; pass size='full' to use "
                "model=, checkpoint= or data_dir="
            )
        if size == "arch" and (pretrained or checkpoint is not None or data_dir is not None):
            raise ValueError(
                "size='arch' is the architecture at random init on random images; pass size='full' to use "
                "pretrained=True, checkpoint= or data_dir="
            )
        if size == "embedded" and (pretrained is not None or model_kwargs is not None):
            raise ValueError("size='embedded' uses the shipped digits ViT; pretrained= and model_kwargs= apply to "
                             "size='full' or 'arch'")
        for name, value in (("model", model), ("checkpoint", checkpoint), ("data_dir", data_dir)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or None, got {value!r}")
        if pretrained is not None:
            check_bool("pretrained", pretrained)
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a dict of timm.create_model arguments, got {model_kwargs!r}")
        check_int("num_images", num_images, 1, none_ok=True)
        check_int("batch_size", batch_size, 1, none_ok=True)
        check_int("num_workers", num_workers, 0)
        check_bool("progress", progress)
        self.model_name = EMBEDDED_MODEL if size == "embedded" else (model or DEFAULT_FULL_MODEL)
        self.pretrained = size == "full" and (pretrained is None or pretrained)
        self.checkpoint = checkpoint
        self.model_kwargs = dict(model_kwargs or {})
        self.data_dir = data_dir
        self.num_images = num_images
        cpu = str(device) == "cpu" or str(device).startswith("cpu:")
        default_batch = {"embedded": 64, "arch": 8 if cpu else 32}.get(size, 32)
        self.batch_size = batch_size if batch_size is not None else default_batch
        self.num_workers = num_workers
        self.progress = progress
        self.dataset: Dataset | None = None
        self.input_size: tuple[int, ...] | None = None
        self.reference: torch.Tensor | None = None
        self._batch: torch.Tensor | None = None

    def default_threads(self) -> int | None:
        """One thread for the embedded model (as fast as two, robust to a busy neighbour); all available cores
        for the real architectures on CPU; torch's setting on GPUs."""
        if self.size == "embedded":
            return 1
        return cpu_count() if torch.device(self.device).type == "cpu" else None

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

    def record_reference(self) -> Quality:
        """Keep the unreduced model's top-1 predictions for :meth:`evaluate`'s ``agreement``, and return the
        unreduced model's accuracy from those predictions (``"arch"``, speed only: nothing, an empty result)."""
        if self.size == "arch":
            self.reference = None
            return Quality()
        self.reference, top1, top5 = self._predict("reference")
        return self._score(top1, top5)

    @staticmethod
    def _score(top1: torch.Tensor, top5: torch.Tensor) -> Quality:
        out = Quality()
        out.add("top1", *proportion(top1))
        out.add("top5", *proportion(top5))
        return out

    def evaluate(self) -> Quality:
        """Top-1/top-5 accuracy and (after :meth:`record_reference`) agreement, with Wilson intervals. ``"arch"``
        (random weights, random images) has no quality: an empty result."""
        if self.size == "arch":
            return Quality()
        preds, top1, top5 = self._predict("evaluate")
        out = self._score(top1, top5)
        if self.reference is not None:
            if preds.shape != self.reference.shape:
                raise ValueError(f"predictions {tuple(preds.shape)} and reference {tuple(self.reference.shape)} differ")
            out.add("agreement", *proportion(preds == self.reference))
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
        if self.size == "embedded":
            weights, data = "embedded (tokred digits ViT)", "scikit-learn digits, test split"
        elif self.size == "arch":
            weights, data = "random init (speed only)", "random images (speed only)"
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
