"""Text-to-image diffusion with a diffusers U-Net: GFLOPs, the U-Net's share, memory, and image quality (FID,
KID, CLIP score, PSNR/SSIM against the unreduced model, class accuracy), each with a 95% interval. The harness
times the workload (seconds per image, speedup); this task does not time anything.

Model
    The task scores; the model is its workload (:mod:`tokred.tasks.diffusion_workloads`), chosen by ``size``:
    ``"embedded"`` (default), the digits diffusion U-Net shipped with tokred (offline, seconds per batch on a CPU);
    ``"arch"``, a real denoiser of the architecture table at random init (``architecture=`` sd15, sd2, sdxl, sd3,
    sd35, pixart_alpha, pixart_sigma, dit_xl2 (class-conditional: a class label per image); speed only; one
    denoiser call per timed unit by default, ``unit="generation"`` for a whole generation);
    ``"full"``, the architecture's diffusers pipeline with its weights (``model=`` a Hugging Face id or a local
    directory; default Stable Diffusion 1.5, float16 on CUDA; no safety checker, which would black out images
    and skew FID).
Prompts
    a text file (one prompt a line) or a list; by default tomesd's FID protocol, ``"A high quality photograph of
    a {class}."`` over the 1000 ImageNet classes (names from timm's ImageNet metadata), and for the embedded model
    ``"a handwritten digit {d}"`` (any prompt holding one digit works; it selects the class). Image ``i`` uses
    prompt ``i % len(prompts)`` and seed ``seed + i``, for any batch size or number of processes.
Metrics
    speed (:meth:`measure_speed`, one extra generation of a batch): ``gflops`` and ``unet_gflops`` per image,
    ``peak_mem_mb``, and (embedded, full) ``unet_share``, the fraction of a generation's time inside the U-Net's
    forward (synchronizing hooks, in a call of its own).
    quality (:meth:`evaluate`, a :class:`~tokred.bench.task.Quality` with intervals and counts): ``fid`` and ``kid``
    against real images (embedded: the digits test split in the feature space of the embedded digits ViT's
    pre-logits; full: ``fid_real_dir`` with torchmetrics' Inception, or any ``fid_features`` module);
    ``fid_vs_reference`` (FID against the unreduced model's images, full size without real images);
    ``class_accuracy`` (embedded: % of samples the digits ViT classifies as the requested digit); ``clip_score``
    (with ``clip_model``); ``psnr``/``ssim`` of each image against the unreduced model's image with the same seed
    (after :meth:`record_reference`; not reported for the unreduced model itself).
    Per image (``Quality.per_image``, paired with the baseline by the harness): class correctness, CLIP score,
    PSNR and SSIM. Primary (the leaderboard's quality axis): ``clip_score`` where measured, else ``psnr``: on the
    embedded model ToMe, ToDo and CA-ToMe leave the digit's class and the classifier's confidence unchanged even
    at their strongest presets (mean probability of the requested digit within 0.006 of the baseline's on 20
    images), while the image-by-image fidelity to the unreduced model separates every preset.

Generation and feature extraction are sharded across the processes of an ``accelerate``/``torchrun`` launch
(:mod:`tokred.tasks.sharding`); the results are identical to a single process's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tokred.bench.measure import ModuleTimer, flops_and_memory, resolve_device, timed, torch_dtype
from tokred.bench.task import Metric, Quality, Task, check_bool, check_int, check_number, register_task
from tokred.bench.workload import DEFAULT_SIZE, TimedCall, refuse_foreign_settings, workload_class

from . import architectures, sharding
from .diffusion_workloads import (  # noqa: F401  (re-exported: tokred 0.2 names)
    DIGIT_TEMPLATE,
    EMBEDDED_MODEL,
    EMBEDDED_NOTE,
    IMAGENET_TEMPLATE,
    SCHEDULERS,
    WORKLOADS,
    DigitsDiffusion,
    digit_label,
    imagenet_prompts,
    make_scheduler,
)
from .quality import (
    ClipScorer,
    PreLogitsFeatures,
    fid_with_ci,
    inception_features,
    kid_with_ci,
    mean_score,
    proportion,
    psnr_ssim,
)

DEFAULT_MODEL = architectures.ARCHITECTURES["sd15"].hub_id
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _progress(iterable, enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, **kwargs)


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def read_prompts(prompts: str | Sequence[str]) -> list[str]:
    """Prompts from a text file (one per non-empty line) or a non-empty list of strings."""
    if isinstance(prompts, str):
        if not os.path.isfile(prompts):
            raise FileNotFoundError(f"prompts file {prompts!r} not found (one prompt per line expected)")
        with open(prompts, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh]
        out = [line for line in lines if line]
        if not out:
            raise ValueError(f"prompts file {prompts!r} holds no prompts (one prompt per non-empty line expected)")
        return out
    if isinstance(prompts, bytes) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a prompts file or a non-empty list of strings, got {prompts!r}")
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must be non-empty strings, got {list(prompts)!r}")
    return [str(p) for p in prompts]


# --- real images for FID ---------------------------------------------------------------------------------------


def load_image_folder(path: str, limit: int | None = None) -> list[str]:
    """Image files under ``path`` (recursively, sorted), an evenly spaced subset of ``limit`` of them."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"real-image folder {path!r} (fid_real_dir) not found")
    files = sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.lower().endswith(IMAGE_SUFFIXES)
    )
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path!r}")
    if limit is not None and limit < len(files):
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def read_image(path: str, resolution: int) -> torch.Tensor:
    """An RGB image file, shorter side resized to ``resolution`` and centre-cropped, as uint8 ``[3, H, W]``."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(path) as img:
        img = img.convert("RGB")
        img = TF.center_crop(TF.resize(img, resolution, antialias=True), [resolution, resolution])
        return TF.pil_to_tensor(img)


@register_task("text_to_image")
class TextToImage(Task):
    """GFLOPs, denoiser share, memory and image quality of a text-to-image diffusion model: the embedded digits
    model by default, a real denoiser architecture at random init with ``size="arch"``, a diffusers pipeline with
    its weights with ``size="full"`` (see :mod:`tokred.tasks.diffusion_workloads`); the harness times the
    workload's unit."""

    summary = (
        "diffusers text-to-image: s/image, denoiser share, GFLOPs, memory, FID, KID, CLIP, PSNR/SSIM, class accuracy"
    )
    family = "diffusers_unet"
    workloads = WORKLOADS
    sweeps = ("architecture", "resolution")
    metrics = (
        Metric("fid", "lower"),
        Metric("kid", "lower"),
        Metric("fid_vs_reference", "lower", reference=True),
        Metric("class_accuracy", "higher", "%"),
        Metric("clip_score", "higher", primary=True, note=(
            "the CLIP score of each image against its prompt, paired with the baseline's image from the same seed: "
            "prompt fidelity with the power of a per-image comparison")),
        Metric("psnr", "higher", "dB", reference=True, primary=True, note=(
            "each image against the baseline's image from the same seed (a paired, per-image comparison); the "
            "digit's class and the classifier's confidence in it stay as they were under ToMe, ToDo and CA-ToMe "
            "even at their strongest presets, and the FID of a few dozen 32x32 digits has an interval wider than "
            "any preset's effect, while any change to the images moves PSNR")),
        Metric("ssim", "higher", reference=True, self_value=1.0),
        Metric("s_per_image", "lower", "s", "speed"),
        Metric("throughput_per_s", "higher", "img/s", "speed"),
        Metric("latency_ms", "lower", "ms", "speed"),
        Metric("unet_share", "lower", "", "speed"),
        Metric("gflops", "lower", "GFLOPs", "speed"),
        Metric("unet_gflops", "lower", "GFLOPs", "speed"),
        Metric("peak_mem_mb", "lower", "MB", "speed"),
    )

    def __init__(
        self,
        size: str = DEFAULT_SIZE,
        device: str = "cpu",
        dtype: str | None = None,
        *,
        model: str | None = None,
        scheduler: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        resolution: int | None = None,
        prompts: str | Sequence[str] | None = None,
        num_images: int | None = None,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        seed: int = 0,
        fid: str | nn.Module | None = "auto",
        fid_real_dir: str | None = None,
        num_real_images: int | None = None,
        inception_weights: str | None = None,
        clip_model: str | None = None,
        unet_config: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        architecture: str | None = None,
        unit: str | None = None,
        progress: bool = True,
    ) -> None:
        """Every setting is checked here (a ValueError naming it and its valid range).

        Args:
            dtype: default float16 for the arch and full models on CUDA, float32 otherwise.
            model: full: Hugging Face id or local directory of the architecture's pipeline (default: its hub id).
            architecture: arch and full: a row of :data:`tokred.tasks.architectures.ARCHITECTURES` (``sd15``
                (default), ``sd2``, ``sdxl``, ``sd3``, ``sd35``, ``pixart_alpha``, ``pixart_sigma``, ``dit_xl2``).
            scheduler: sampler by name (see :data:`SCHEDULERS`); default: the model's own.
            num_inference_steps: int >= 1; default 20 (embedded), the architecture's pipeline default (arch, full:
                50 for the U-Nets and DiT, 28 for SD3 and Flux.1-dev, 40 for SD3.5, 20 for PixArt, 4 for
                Flux.1-schnell).
            guidance_scale: classifier-free guidance (> 1 enables it), >= 0; default: the embedded sampler's, the
                architecture's pipeline default (7.5 SD1.x/2.x, 5.0 SDXL, 7.0 SD3, 4.5 SD3.5); on Flux.1 the
                embedded guidance (3.5 dev; schnell has none), never classifier-free.
            resolution: image side in pixels, an int or (arch) a list to sweep; full: default the denoiser's
                sample size x the VAE factor; arch: default the architecture's resolution on CUDA, at most 512 on
                a CPU, a multiple of 8 x the denoiser's downsampling (U-Nets) or patch size (MMDiTs).
            prompts: text file or non-empty list; default ImageNet-class prompts (full) / ``"a handwritten digit
                {d}"`` (embedded, where each prompt names one digit). Not used by arch (random text embeddings).
            num_images: int >= 1 images generated by :meth:`evaluate` (default 50 embedded, 2000 full = 2 per class;
                arch evaluates nothing).
            batch_size: int >= 1 images per pipeline call, also the timed workload (default 10 embedded, 1 full and
                arch).
            eval_batch_size: int >= 1 images per pipeline call when generating for quality (the reference and
                every case, so they stay paired image by image); default ``batch_size``. Larger batches make
                the evaluated images cheaper where a call's fixed cost dominates (small models on a CPU).
            seed: int in [0, 2**63): image ``i`` is generated from seed ``seed + i``.
            fid: ``"auto"`` (embedded: digits-ViT features; full: Inception when ``fid_real_dir`` is given, or
                against the reference when torch-fidelity is installed), ``"inception"``, an ``nn.Module`` with
                an int ``num_features`` taking uint8 images, or None (no FID/KID).
            fid_real_dir: real images for FID (full size), any folder layout.
            num_real_images: int >= 2: use an evenly spaced subset of the real images.
            inception_weights: local Inception weights file for torchmetrics' FID (offline use).
            clip_model: CLIP model id or local path for the CLIP score (none by default).
            config, unet_config: arch only: entries overriding the denoiser's configuration (tests use a tiny one;
                ``unet_config`` is the older name).
            unit: arch only: the timed unit, ``"call"`` (default: one denoiser call inside a running generation)
                or ``"generation"``.
            progress: tqdm progress bars.
        """
        super().__init__(size=size, device=device, dtype=dtype or "float32")
        kind = workload_class(self.workloads, self.name, size)
        if (clip_model is not None or fid_real_dir is not None) and "clip_model" not in kind.settings:
            raise ValueError(f"clip_model and fid_real_dir apply to size='full'; size={size!r} ({kind.summary}) is "
                             "judged by its own protocol")
        own = dict(model=model, architecture=architecture, unet_config=unet_config, config=config, unit=unit,
                   prompts=prompts)
        refuse_foreign_settings(self.workloads, size, own)
        if scheduler is not None and (not isinstance(scheduler, str) or scheduler.lower() not in SCHEDULERS):
            raise ValueError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        check_int("num_inference_steps", num_inference_steps, 1, none_ok=True)
        check_number("guidance_scale", guidance_scale, 0.0, none_ok=True)
        check_int("num_images", num_images, 1, none_ok=True)
        check_int("batch_size", batch_size, 1, none_ok=True)
        check_int("eval_batch_size", eval_batch_size, 1, none_ok=True)
        check_int("seed", seed, 0, 2**63 - 1)
        check_int("num_real_images", num_real_images, 2, none_ok=True)
        check_int("resolution", resolution, 8, none_ok=True)
        check_bool("progress", progress)
        if not (fid is None or fid in ("auto", "inception") or isinstance(fid, nn.Module)):
            raise ValueError(f"fid must be 'auto', 'inception', an nn.Module or None, got {fid!r}")
        if isinstance(fid, nn.Module) and not isinstance(getattr(fid, "num_features", None), int):
            raise ValueError("a custom fid feature module needs an int attribute num_features")
        for name, value in (("fid_real_dir", fid_real_dir), ("inception_weights", inception_weights),
                            ("clip_model", clip_model)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a path or id (a string) or None, got {value!r}")
        self._prompt_source = prompts
        given_prompts = read_prompts(prompts) if prompts is not None else None
        settings = {k: v for k, v in own.items() if k in kind.settings and k != "prompts"}
        self.work = kind(device, seed=seed, scheduler=scheduler, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, resolution=resolution, batch_size=batch_size,
                         prompts=given_prompts, **settings)
        if dtype is None:
            self.dtype = self.work.default_dtype()
        self.num_images = num_images if num_images is not None else self.work.default_num_images()
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.fid = None if self.random_weights else fid
        self.fid_real_dir = fid_real_dir
        self.num_real_images = num_real_images
        self.inception_weights = inception_weights
        self.clip_model = clip_model
        self.progress = progress
        self.classifier: PreLogitsFeatures | None = None
        self.feature_module: nn.Module | None = None
        self.clip: ClipScorer | None = None
        self.reference_images: dict[int, torch.Tensor] = {}
        self._real_features: torch.Tensor | None = None
        self._reference_features: torch.Tensor | None = None
        self._timed: TimedCall | None = None

    @classmethod
    def family_for(cls, size: str, settings: dict[str, Any]) -> str:
        """The adapter family of the denoiser of ``size`` with these settings (by its ``architecture``)."""
        kind = workload_class(cls.workloads, cls.name, size)
        if "architecture" in kind.settings:
            name = settings.get("architecture") or architectures.DEFAULT_ARCHITECTURE
            return architectures.get_architecture(name).family
        return cls.family

    # --- the workload's settings, as the task's ----------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.work.model_name

    @property
    def resolution(self) -> int | None:
        return self.work.resolution

    @property
    def num_inference_steps(self) -> int | None:
        return self.work.num_inference_steps

    @property
    def guidance_scale(self) -> float | None:
        return self.work.guidance_scale

    @property
    def batch_size(self) -> int:
        return self.work.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.work.batch_size = check_int("batch_size", value, 1)

    @property
    def architecture(self) -> str | None:
        return getattr(self.work, "architecture", None)

    @property
    def prompts(self) -> list[str]:
        return self.work.prompts

    @property
    def labels(self) -> list[int]:
        return self.work.labels

    def notes(self) -> list[str]:
        """Caveats for every row of this task's results (the leaderboard prints them under the section)."""
        return self.work.notes()

    # --- setup -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.torch_device = resolve_device(self.device)
        self.torch_dtype = torch_dtype(self.dtype)
        self.model = self.work.build(self.torch_device, self.torch_dtype)
        self._timed: TimedCall | None = None
        self._setup_quality()

    def _setup_quality(self) -> None:
        self.classifier = self.work.classifier(self.torch_device)
        fid = self.fid
        if isinstance(fid, nn.Module):
            self.feature_module = fid.eval()
        elif fid == "auto":
            if self.classifier is not None:
                self.feature_module = self.classifier
            elif self.fid_real_dir is not None:
                self.feature_module = inception_features(self.inception_weights)
            else:
                try:
                    self.feature_module = inception_features(self.inception_weights)
                except (ImportError, FileNotFoundError):
                    self.feature_module = None  # FID is optional here; ask for fid="inception" to make it an error
        elif fid == "inception":
            self.feature_module = inception_features(self.inception_weights)
        if self.feature_module is not None and self.feature_module is not self.classifier:
            self.feature_module = self.feature_module.to(self.torch_device)
        if self.clip_model is not None:
            self.clip = ClipScorer(self.clip_model, self.torch_device)

    def _require_setup(self) -> None:
        if self.model is None:
            raise RuntimeError("call task.setup() first")

    # --- generation -------------------------------------------------------------------------------------
    def prompt_for(self, index: int) -> str:
        return self.prompts[index % len(self.prompts)]

    def label_for(self, index: int) -> int:
        return self.labels[index % len(self.labels)]

    @torch.no_grad()
    def generate(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 images ``[len(indices), C, H, W]`` for the given global image indices (one pipeline call; no
        sharding); for a workload without images (random weights) the final latents. Image ``i`` is seeded with
        ``seed + i``; the global RNG is seeded with the first index, so methods that draw from it (e.g. ToMe's
        random destinations) are reproducible too."""
        self._require_setup()
        indices = [int(i) for i in indices]
        torch.manual_seed(self.seed + indices[0])
        return self.work.generate(indices, [self.seed + i for i in indices])

    def _batches(self, n: int) -> list[list[int]]:
        """The global batches of image indices: ``[0, b), [b, 2b), ...`` (``b``: ``eval_batch_size``, default
        ``batch_size``). Processes share out whole batches, so every image is generated in the same batch (hence
        with the same random draws of a method) whatever the number of processes."""
        return _chunks(list(range(n)), self.eval_batch_size or self.batch_size)

    def _local_batches(self, batches: Sequence[list[int]], desc: str):
        show = self.progress and sharding.is_main_process()
        for batch in _progress(batches, show, desc=desc, unit="batch"):
            yield batch, self.generate(batch)

    def generate_images(self, num_images: int | None = None) -> torch.Tensor:
        """The first ``num_images`` (default: ``self.num_images``) images, generated sharded across processes
        and gathered in index order on every process."""
        n = self.num_images if num_images is None else num_images
        with sharding.shard(self._batches(n)) as mine:
            local = [img for _, imgs in self._local_batches(mine, "generate") for img in imgs]
        return torch.stack(sharding.gather(local))

    # --- reference and quality --------------------------------------------------------------------------
    def record_reference(self) -> Quality:
        """Generate the unreduced model's images (this process's share) for PSNR/SSIM and FID-vs-reference, and
        return the unreduced model's quality from those same images (no fidelity-to-itself metrics)."""
        self.reference_images = {}
        self._reference_features = None
        if self.random_weights:
            return Quality()
        records = self._generate_records("reference", keep_reference=True)
        if records and "feature" in records[0]:
            self._reference_features = torch.stack([r["feature"] for r in records])
        return self._score(records, reference=False)

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = self.feature_module(images.to(self.torch_device)).float().cpu()
        return list(feats.reshape(len(images), -1))

    def _real_image_features(self) -> torch.Tensor | None:
        """Features of the real images for FID (computed once, sharded)."""
        if self._real_features is not None or self.feature_module is None:
            return self._real_features
        real = self.work.real_images()
        if real is not None:
            if self.num_real_images is not None:
                real = real[: self.num_real_images]
            items: list[Any] = list(range(len(real)))
            load = lambda idx: real[idx]  # noqa: E731
        elif self.fid_real_dir is not None:
            items = load_image_folder(self.fid_real_dir, self.num_real_images)
            load = lambda files: torch.stack([read_image(f, self.resolution) for f in files])  # noqa: E731
        else:
            return None
        feats: list[torch.Tensor] = []
        with sharding.shard(_chunks(items, 64)) as mine:
            show = self.progress and sharding.is_main_process()
            for chunk in _progress(mine, show, desc="real features", unit="batch"):
                feats.extend(self._features(load(chunk)))
        self._real_features = torch.stack(sharding.gather(feats))
        return self._real_features

    def _generate_records(self, desc: str, keep_reference: bool = False) -> list[dict[str, Any]]:
        """Generate ``num_images`` images (sharded) and score each one: a record per image with its ``index`` and
        (as available) ``feature``, ``correct``, ``clip``, ``psnr``/``ssim`` against the reference image."""
        records: list[dict[str, Any]] = []
        with sharding.shard(self._batches(self.num_images)) as mine:
            for batch, images in self._local_batches(mine, desc):
                recs = [{"index": i} for i in batch]
                if keep_reference:
                    for i, img in zip(batch, images, strict=True):
                        self.reference_images[i] = img
                if self.feature_module is not None:
                    for rec, feat in zip(recs, self._features(images), strict=True):
                        rec["feature"] = feat
                if self.classifier is not None:
                    preds = self.classifier.logits(images.to(self.torch_device)).argmax(-1).cpu()
                    for rec, pred in zip(recs, preds, strict=True):
                        rec["correct"] = int(pred) == self.label_for(rec["index"])
                if self.clip is not None:
                    scores = self.clip.scores(images, [self.prompt_for(i) for i in batch])
                    for rec, score in zip(recs, scores, strict=True):
                        rec["clip"] = score
                if not keep_reference and all(i in self.reference_images for i in batch):
                    reference = torch.stack([self.reference_images[i] for i in batch])
                    psnr, ssim = psnr_ssim(images, reference)
                    for rec, p, s in zip(recs, psnr, ssim, strict=True):
                        rec["psnr"], rec["ssim"] = p, s
                records.extend(recs)
        return sorted(sharding.gather(records), key=lambda r: r["index"])

    def _score(self, records: list[dict[str, Any]], reference: bool) -> Quality:
        """The quality of a set of image records, with intervals (see :mod:`tokred.tasks.quality`);
        ``reference``: include the metrics against the unreduced model's images."""
        out = Quality()
        if not records:
            return out
        if "correct" in records[0]:
            hits = [r["correct"] for r in records]
            value, ci, n = proportion(hits)
            out.add("class_accuracy", value, ci, n, per_image=hits, binary=True)
        if "clip" in records[0]:
            scores = [r["clip"] for r in records]
            out.add("clip_score", *mean_score(scores), per_image=scores)
        if reference and "psnr" in records[0]:
            for name in ("psnr", "ssim"):
                scores = [r[name] for r in records]
                out.add(name, *mean_score(scores), per_image=scores)
        if "feature" in records[0] and len(records) >= 2:
            fake = torch.stack([r["feature"] for r in records])
            real = self._real_image_features()
            if real is not None:
                value, ci = fid_with_ci(real, fake)
                out.add("fid", value, ci, len(fake))
                value, ci = kid_with_ci(real, fake)
                out.add("kid", value, ci, len(fake))
            elif reference and self._reference_features is not None:
                value, ci = fid_with_ci(self._reference_features, fake)
                out.add("fid_vs_reference", value, ci, len(fake))
        return out

    def evaluate(self) -> Quality:
        """Generate ``num_images`` images (sharded) and score them; see the module docstring for the metrics.
        A workload without images (random weights) has no quality: an empty result."""
        self._require_setup()
        if self.random_weights:
            return Quality()
        return self._score(self._generate_records("evaluate"), reference=True)

    # --- speed -------------------------------------------------------------------------------------------
    def _unet(self) -> nn.Module:
        return self.work.denoiser()

    def compile_target(self) -> nn.Module:
        """The denoiser (U-Net or transformer): what a compiled pipeline compiles, and where the methods act."""
        self._require_setup()
        return self._unet()

    def workload(self) -> TimedCall:
        """The timed unit: a generation of one batch (``batch_size`` images, indices 0..batch_size-1), or, for
        ``size="arch"`` with ``unit="call"``, one denoiser call inside a running generation (a stateful call; see
        :class:`tokred.bench.workload.TimedCall`). Synchronized on CUDA."""
        self._require_setup()
        if self._timed is None:  # one object: a stateful call's generation goes on from call to call
            self._timed = self.work.timed_call(self.generate, self.torch_device)
        return self._timed

    def measure_speed(self, flops: bool = True, memory: bool = True, share: bool = True) -> dict[str, float]:
        """``gflops``/``unet_gflops`` per image and ``peak_mem_mb`` of one timed unit (one call for both; a cycle of
        a cache's denoiser calls gives the GFLOPs of one call averaged over the cycle, e.g. (1 full + 2 reusing) / 3),
        ``unet_share`` (another generation with timing hooks; with ``share``, for workloads with images, whose
        generation holds more than the denoiser), ``unet_calls_per_batch`` and ``batch_size``. No latency: the
        harness times the workload."""
        self._require_setup()
        unit = self.workload()
        n = self.batch_size
        if getattr(unit, "stateful", False):
            fn = unit  # the next denoiser call of the running generation
        else:
            indices = list(range(n))

            def fn() -> None:
                self.generate(indices)

        out: dict[str, float] = {"batch_size": float(n)}
        # per image and per denoiser call: a cycle of a cache's calls (unit.calls > 1) counts their average
        calls = int(getattr(unit, "calls", 1)) if getattr(unit, "stateful", False) else 1
        measured = flops_and_memory(fn, self.torch_device, n * calls, flops=flops, memory=memory, modules={
            "unet_gflops": type(self._unet()).__name__})  # fmt: skip
        out.update(measured)
        if getattr(unit, "stateful", False):
            unit.advance()
        if share and not self.random_weights:
            with ModuleTimer(self._unet(), self.torch_device) as unet_timer, timed(self.torch_device) as total:
                fn()
            out["unet_share"] = unet_timer.seconds / total["seconds"]
            out["unet_calls_per_batch"] = float(unet_timer.calls)
        return out

    def _feature_description(self) -> str | None:
        if self.feature_module is None:
            return None
        if self.feature_module is self.classifier:
            return "digits ViT pre-logits"
        return type(self.feature_module).__name__

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(self.work.describe())
        if isinstance(self._prompt_source, str):
            info["prompts"] = self._prompt_source
        info.update(
            num_images=self.num_images,
            seed=self.seed,
            fid_features=self._feature_description(),
            fid_real=self.work.real_images_name or self.fid_real_dir,
            clip_model=self.clip_model,
        )
        if self.eval_batch_size is not None:
            info["eval_batch_size"] = self.eval_batch_size
        return info
