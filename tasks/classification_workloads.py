"""The workloads of the vit_classification task (:mod:`tokred.bench.workload`): the kinds of timm ViT it scores.

:class:`EmbeddedDigitsViT` (``size="embedded"``, default)
    The digits ViT shipped with tokred (32x32 grey images, 4x4 patches, 64 patch tokens + cls), trained on
    scikit-learn's digits, on that data set's test split: offline, seconds per call, meaningful accuracy.
:class:`RandomInitViT` (``size="arch"``)
    A real architecture at random init (``pretrained=False``): DeiT-S (``deit_small_patch16_224``, default) or
    ViT-B (``model="vit_base_patch16_224"``), see :data:`VIT_ARCH_MODELS`, on random images: speed, FLOPs, memory
    and token counts only (no quality).
:class:`PretrainedViT` (``size="full"``)
    Any timm model name (``model=``, default ``deit_small_patch16_224``) of the ``timm_vit`` family, with weights
    from ``pretrained=True`` (timm through the Hugging Face cache; ``HF_HUB_OFFLINE=1`` forbids downloads), a
    local ``checkpoint=`` file, or ``pretrained=False`` (random: speed only). Data: ``data_dir=``, an ImageFolder
    layout (``<dir>/<class>/<image>``, class folders in sorted order = class indices, e.g. ImageNet val with one
    folder per synset), preprocessed with the model's own timm data config. Without ``data_dir`` the model is
    timed on random images (the task's ``evaluate`` then raises).

A workload is built from the task's constructor settings it accepts (:attr:`~tokred.bench.workload.Workload.settings`;
the task refuses the others, naming the kind that takes them), then :meth:`ClassificationWorkload.build` makes the
model, :meth:`~ClassificationWorkload.dataset` the evaluation data (or None) and
:meth:`~ClassificationWorkload.timing_batch` the batch the harness times.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset, TensorDataset

from tokred.adapters.timm_vit import TimmViTAdapter
from tokred.bench.task import check_bool
from tokred.bench.workload import Workload, hf_cache_hint, refuse_foreign_settings
from tokred.errors import UnsupportedModelError

# The real architectures of the random-init workload: DeiT-S (the default) and ViT-B.
VIT_ARCH_MODELS = ("deit_small_patch16_224", "vit_base_patch16_224")
DEFAULT_FULL_MODEL = "deit_small_patch16_224"
EMBEDDED_MODEL = "tokred-digits-vit"
RANDOM = "random init (speed only)"
RANDOM_IMAGES = "random images (speed only)"


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
            f"pretrained weights for {name!r} not found: looked for {where}{hf_cache_hint()}. Download them "
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


def _check_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string or None, got {value!r}")
    return value


class ClassificationWorkload(Workload):
    """What the vit_classification task asks of a kind of model: build it, its evaluation data (or None), the
    batch to time, its default batch size and its ``describe()`` entries.

    ``implied``: settings given with the one value this kind has anyway (``pretrained=False`` at random init):
    accepted without being the kind's own setting.
    """

    implied: ClassVar[dict[str, Any]] = {}
    batch_size: ClassVar[int] = 32  # evaluation and timing batch
    cpu_batch_size: ClassVar[int | None] = None  # on CPU, when it differs
    data_hint: ClassVar[str] = "this workload has no evaluation data"
    weights: ClassVar[str] = RANDOM
    data: ClassVar[str] = RANDOM_IMAGES

    model_name: str = ""
    pretrained: bool = False  # timm's pretrained weights

    def __init__(self) -> None:
        self.input_size: tuple[int, ...] | None = None  # (channels, height, width), known after build()

    @classmethod
    def check_settings(cls, workloads: dict[str, type[Workload]], given: dict[str, Any]) -> dict[str, Any]:
        """The settings of ``given`` (None: not given) this kind takes, to construct it with; a ValueError
        naming the kind that takes any other."""
        given = {k: v for k, v in given.items() if v is not None and not (k in cls.implied and v is cls.implied[k])}
        refuse_foreign_settings(workloads, cls.kind, given)
        return {k: v for k, v in given.items() if k in cls.settings}

    @classmethod
    def default_batch_size(cls, device: Any) -> int:
        cpu = str(device) == "cpu" or str(device).startswith("cpu:")
        return cls.cpu_batch_size if cpu and cls.cpu_batch_size is not None else cls.batch_size

    def build(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """The model in eval mode on ``device`` in ``dtype``; sets :attr:`input_size`."""
        raise NotImplementedError

    def dataset(self) -> Dataset | None:
        """The evaluation images and labels (after :meth:`build`), or None: speed only."""
        return None

    def timing_batch(self, dataset: Dataset | None, batch_size: int) -> torch.Tensor:
        """The images of one timed call (on the CPU): the first ``batch_size`` of ``dataset``, or random images
        of the model's input size without data."""
        if dataset is not None:
            n = min(batch_size, len(dataset))
            return torch.stack([dataset[i][0] for i in range(n)])
        if self.input_size is None:
            raise RuntimeError("build() the model first: the random timing images take its input size")
        gen = torch.Generator().manual_seed(0)
        return torch.randn(batch_size, *self.input_size, generator=gen)

    def describe(self) -> dict[str, Any]:
        """``model``, ``weights`` and ``data`` for the results and the leaderboard header."""
        return {"model": self.model_name, "weights": self.weights, "data": self.data}


class EmbeddedDigitsViT(ClassificationWorkload):
    kind = "embedded"
    summary = "the digits ViT shipped with tokred, on its test split"
    cpu_threads = "one"  # as fast as two, robust to a busy neighbour
    batch_size = 64
    # Calls of a few tens of ms: rounds spread over 3 worker processes (a process's layout shifts all its timings)
    # and at least 6 s of the method's calls in all (the timing floor; 2 s per process).
    profiles = {
        "default": {"budget_s": 10.0, "max_rounds": 100, "processes": 3, "min_time_s": 6.0},
        "quick": {"task": {"num_images": 120}, "budget_s": 2.0, "max_rounds": 10},
    }
    weights = "embedded (tokred digits ViT)"
    data = "scikit-learn digits, test split"
    model_name = EMBEDDED_MODEL
    _data: Dataset | None = None

    def build(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from .embedded.data import load_digits_split
        from .embedded.vit import load_digits_vit

        model = load_digits_vit()
        images, labels = load_digits_split("test")
        self._data = TensorDataset(torch.as_tensor(images).float(), torch.as_tensor(labels).long())
        self.input_size = tuple(images.shape[1:])
        return model.eval().to(device, dtype)

    def dataset(self) -> Dataset | None:
        return self._data


class TimmViT(ClassificationWorkload):
    """A timm model of the ``timm_vit`` family, built by name (:func:`create_timm_vit`)."""

    def __init__(
        self,
        model: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        _check_str("model", model)
        _check_str("checkpoint", checkpoint)
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a dict of timm.create_model arguments, got {model_kwargs!r}")
        self.model_name = model or DEFAULT_FULL_MODEL
        self.model_kwargs = dict(model_kwargs or {})
        self.pretrained = check_bool("pretrained", pretrained)
        self.checkpoint = checkpoint
        self.config: dict[str, Any] = {}  # timm's data config of the built model
        self.num_classes = 0

    def build(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        model = create_timm_vit(self.model_name, self.pretrained, self.checkpoint, self.model_kwargs)
        self.config = data_config(model)
        self.input_size = tuple(self.config["input_size"])
        self.num_classes = model.num_classes
        return model.eval().to(device, dtype)


class RandomInitViT(TimmViT):
    kind = "arch"
    summary = "a real ViT architecture (DeiT-S, ViT-B) at random init on random images: speed only"
    random_weights = True
    note = "random weights (size arch): speed, FLOPs, memory and token counts only; no quality"
    settings = frozenset({"model", "model_kwargs"})
    implied = {"pretrained": False}
    cpu_batch_size = 8
    # 3 worker processes (fresh processes disagree by up to 15% on DeiT-S) and at least 10 s of method calls
    profiles = {
        "default": {"budget_s": 30.0, "max_rounds": 50, "processes": 3, "min_time_s": 10.0},
        "quick": {"budget_s": 5.0, "max_rounds": 10},
    }

    def __init__(self, model: str | None = None, model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(model, model_kwargs, pretrained=False)


class PretrainedViT(TimmViT):
    kind = "full"
    summary = "any timm ViT with pretrained or checkpoint weights, on ImageFolder data"
    settings = frozenset({"model", "model_kwargs", "pretrained", "checkpoint", "data_dir"})
    data_hint = "pass data_dir=<ImageFolder directory> (e.g. ImageNet val)"

    def __init__(
        self,
        model: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = True,
        checkpoint: str | None = None,
        data_dir: str | None = None,
    ) -> None:
        super().__init__(model, model_kwargs, pretrained, checkpoint)
        self.data_dir = _check_str("data_dir", data_dir)

    def dataset(self) -> Dataset | None:
        if self.data_dir is None:
            return None
        import timm.data

        return image_folder(self.data_dir, timm.data.create_transform(**self.config), self.num_classes)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.checkpoint:
            info["weights"] = f"checkpoint {self.checkpoint}"
        elif self.pretrained:
            info["weights"] = "timm pretrained (Hugging Face cache)"
        if self.data_dir:
            info["data"] = f"ImageFolder {self.data_dir}"
        return info
