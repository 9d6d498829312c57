"""Text-to-image diffusion with a diffusers U-Net: GFLOPs, the U-Net's share, memory, and image quality (FID,
KID, CLIP score, PSNR/SSIM against the unreduced model, class accuracy), each with a 95% interval. The harness
times the workload (seconds per image, speedup); this task does not time anything.

Model
    ``size="full"``: ``StableDiffusionPipeline.from_pretrained(model)``, default Stable Diffusion 1.5
    (``stable-diffusion-v1-5/stable-diffusion-v1-5``), a Hugging Face id (cache; ``HF_HUB_OFFLINE=1`` forbids
    downloads) or a local directory; float16 on CUDA by default; the safety checker is not loaded (it would
    black out images and skew FID). ``size="embedded"`` (default): the class-conditional pixel-space digits
    diffusion U-Net shipped with tokred (SD's block layout, 32x32 tokens in the top blocks, classifier-free
    guidance), which runs offline on a CPU in seconds per batch. ``size="arch"``: SD1.5's U-Net configuration with
    random weights in a real DDIM loop (:mod:`tokred.tasks.arch`): 512 px (64x64 latents) in float16 on CUDA,
    256 px (32x32 latents) in float32 on CPU, one prompt per generation (a U-Net batch of 2 with guidance),
    random text embeddings; speed, FLOPs, memory and token counts only (no quality).
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

Generation and feature extraction are sharded across the processes of an ``accelerate``/``torchrun`` launch
(:mod:`tokred.tasks.sharding`); the results are identical to a single process's.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tokred.bench.contention import cpu_count
from tokred.bench.measure import ModuleTimer, flops_and_memory, resolve_device, synchronize, timed, torch_dtype
from tokred.bench.task import Metric, Quality, Task, check_bool, check_int, check_number, register_task
from tokred.errors import UnsupportedModelError

from . import arch, sharding
from .quality import (
    ClipScorer,
    PreLogitsFeatures,
    fid_with_ci,
    inception_features,
    kid_with_ci,
    mean_score,
    proportion,
    psnr_ssim,
    to_uint8,
)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
EMBEDDED_MODEL = "tokred-digits-diffusion"
IMAGENET_TEMPLATE = "A high quality photograph of a {}."
DIGIT_TEMPLATE = "a handwritten digit {}"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EMBEDDED_NOTE = (
    "the embedded digits U-Net is narrow (16 channels in its 1024-token blocks): the reduction methods' own work "
    "(matching, gathers, caches) is large next to the compute they save, so its measured speedups stay below the "
    "FLOPs-ideal and below those reported for SD1.5; `--size arch` measures SD1.5's architecture"
)


def _progress(iterable, enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, **kwargs)


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# --- schedulers ---------------------------------------------------------------------------------------------

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsolver++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, config: Any):
    """A diffusers scheduler by short name (``ddim``, ``pndm`` (PLMS: ``skip_prk_steps=True``), ``euler``,
    ``euler_a``, ``heun``, ``lms``, ``dpmsolver``, ``dpmsolver++``, ``unipc``, ...) from another scheduler's
    config (the model's training noise schedule)."""
    import diffusers

    key = name.lower()
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    cls_name, overrides = SCHEDULERS[key]
    return getattr(diffusers, cls_name).from_config(config, **overrides)


# --- prompts ------------------------------------------------------------------------------------------------


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (the first synonym of each synset), from timm's bundled metadata."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes())]


def imagenet_prompts() -> list[str]:
    """tomesd's FID protocol: ``"A high quality photograph of a {class}."`` for each ImageNet class."""
    return [IMAGENET_TEMPLATE.format(name) for name in imagenet_class_names()]


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


def digit_label(prompt: str) -> int:
    """The digit class a prompt asks for: the one digit it contains (``"3"``, ``"a handwritten digit 3"``)."""
    digits = re.findall(r"\d", prompt)
    if len(set(digits)) != 1:
        raise ValueError(f"embedded prompts must name exactly one digit 0-9, got {prompt!r}")
    return int(digits[0])


# --- the embedded digits model as a pipeline-like object ------------------------------------------------------


class DigitsDiffusion:
    """The embedded class-conditional digits model with a pipeline's shape: ``.unet`` and ``.scheduler``, so
    ``tokred.apply(task.model, ...)`` patches the U-Net and hooks ``scheduler.set_timesteps`` as for a
    diffusers pipeline. ``__call__(labels, seeds, ...)`` samples images in [-1, 1]."""

    def __init__(self, unet: nn.Module, class_embed: nn.Module, scheduler: Any) -> None:
        self.unet = unet
        self.class_embed = class_embed
        self.scheduler = scheduler

    def __call__(
        self, labels: Sequence[int], seeds: Sequence[int], num_inference_steps: int, guidance_scale: float
    ) -> torch.Tensor:
        from .embedded.diffusion import sample_digits

        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return sample_digits(
            self.unet,
            self.class_embed,
            torch.as_tensor(list(labels), dtype=torch.long),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            scheduler=self.scheduler,
        )


def _default_digits_guidance() -> float:
    from .embedded.diffusion import sample_digits

    return float(inspect.signature(sample_digits).parameters["guidance_scale"].default)


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
    """GFLOPs, U-Net share, memory and image quality of a text-to-image diffusion model (the embedded digits
    model by default, Stable Diffusion 1.5 with ``size="full"``, SD1.5's architecture at random init with
    ``size="arch"``); the harness times its workload."""

    summary = (
        "diffusers text-to-image: s/image, U-Net share, GFLOPs, memory, FID, KID, CLIP, PSNR/SSIM, class accuracy"
    )
    family = "diffusers_unet"
    metrics = (
        Metric("fid", "lower"),
        Metric("kid", "lower"),
        Metric("fid_vs_reference", "lower", reference=True),
        Metric("class_accuracy", "higher", "%"),
        Metric("clip_score", "higher"),
        Metric("psnr", "higher", "dB", reference=True),
        Metric("ssim", "higher", reference=True),
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
        size: str = "embedded",
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
        seed: int = 0,
        fid: str | nn.Module | None = "auto",
        fid_real_dir: str | None = None,
        num_real_images: int | None = None,
        inception_weights: str | None = None,
        clip_model: str | None = None,
        unet_config: dict[str, Any] | None = None,
        architecture: str | None = None,
        progress: bool = True,
    ) -> None:
        """Every setting is checked here (a ValueError naming it and its valid range).

        Args:
            dtype: default float16 for the full and arch models on CUDA, float32 otherwise.
            model: Hugging Face id or local directory of a StableDiffusionPipeline (``size="full"``).
            scheduler: sampler by name (see :data:`SCHEDULERS`); default: the model's own (arch: SD1.5's DDIM).
            num_inference_steps: int >= 1; default 50 (full; arch on CUDA), 20 (embedded), 10 (arch on CPU).
            guidance_scale: classifier-free guidance (> 1 enables it), >= 0; default 7.5 (full, arch), the embedded
                sampler's default.
            resolution: image side in pixels; full: default the U-Net's sample size x the VAE factor; arch: default
                512 on CUDA, 256 on CPU, a multiple of 64 (latents of 1/8 the side, halved three times).
            prompts: text file or non-empty list; default ImageNet-class prompts (full) / ``"a handwritten digit
                {d}"`` (embedded, where each prompt names one digit). Not used by arch (random text embeddings).
            num_images: int >= 1 images generated by :meth:`evaluate` (default 50 embedded, 2000 full = 2 per class;
                arch evaluates nothing).
            batch_size: int >= 1 images per pipeline call, also the timed workload (default 10 embedded, 1 full and
                arch).
            seed: int in [0, 2**63): image ``i`` is generated from seed ``seed + i``.
            fid: ``"auto"`` (embedded: digits-ViT features; full: Inception when ``fid_real_dir`` is given, or
                against the reference when torch-fidelity is installed), ``"inception"``, an ``nn.Module`` with
                an int ``num_features`` taking uint8 images, or None (no FID/KID).
            fid_real_dir: real images for FID (full size), any folder layout.
            num_real_images: int >= 2: use an evenly spaced subset of the real images.
            inception_weights: local Inception weights file for torchmetrics' FID (offline use).
            clip_model: CLIP model id or local path for the CLIP score (none by default).
            unet_config: arch only: entries overriding the U-Net configuration (tests use a tiny one).
            architecture: arch only: the U-Net, ``"sd15"`` (default, SD1.5) or ``"sdxl"`` (SDXL base 1.0).
            progress: tqdm progress bars.
        """
        cuda = str(device).startswith("cuda")
        if dtype is None:
            dtype = "float16" if (size in ("full", "arch") and cuda) else "float32"
        super().__init__(size=size, device=device, dtype=dtype)
        embedded, is_arch = size == "embedded", size == "arch"
        if model is not None and size != "full":
            raise ValueError(f"model= applies to size='full'; size={size!r} builds its own model")
        if model is not None and not isinstance(model, str):
            raise ValueError(f"model must be a Hugging Face id or a local directory (a string), got {model!r}")
        if (clip_model is not None or fid_real_dir is not None) and size != "full":
            judged = "the digits classifier" if embedded else "nothing (speed only)"
            raise ValueError(f"clip_model and fid_real_dir apply to size='full'; size={size!r} is judged by {judged}")
        if scheduler is not None and (not isinstance(scheduler, str) or scheduler.lower() not in SCHEDULERS):
            raise ValueError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        check_int("num_inference_steps", num_inference_steps, 1, none_ok=True)
        check_number("guidance_scale", guidance_scale, 0.0, none_ok=True)
        check_int("num_images", num_images, 1, none_ok=True)
        check_int("batch_size", batch_size, 1, none_ok=True)
        check_int("seed", seed, 0, 2**63 - 1)
        check_int("num_real_images", num_real_images, 2, none_ok=True)
        check_bool("progress", progress)
        for name, value in (("unet_config", unet_config), ("architecture", architecture)):
            if value is not None and not is_arch:
                raise ValueError(f"{name} applies to size='arch' (a real architecture at random init)")
        if unet_config is not None and not isinstance(unet_config, dict):
            raise ValueError(f"unet_config must be a dict of UNet2DConditionModel arguments, got {unet_config!r}")
        self.architecture = arch.check_architecture(architecture or "sd15") if is_arch else None
        self.unet_config = arch.unet_config(self.architecture, unet_config) if is_arch else None
        if embedded and resolution not in (None, 32):
            raise ValueError(f"resolution must be 32 (or None) for the embedded 32x32 digits model, got {resolution!r}")
        check_int("resolution", resolution, 8, none_ok=True)
        if is_arch:
            resolution = resolution if resolution is not None else (512 if cuda else 256)
            multiple = arch.VAE_SCALE_FACTOR * arch.latent_multiple(self.unet_config)
            if resolution % multiple:
                raise ValueError(f"resolution must be a multiple of {multiple} for this U-Net, got {resolution}")
        if is_arch and prompts is not None:
            raise ValueError("prompts do not apply to size='arch' (random text embeddings)")
        if not (fid is None or fid in ("auto", "inception") or isinstance(fid, nn.Module)):
            raise ValueError(f"fid must be 'auto', 'inception', an nn.Module or None, got {fid!r}")
        if isinstance(fid, nn.Module) and not isinstance(getattr(fid, "num_features", None), int):
            raise ValueError("a custom fid feature module needs an int attribute num_features")
        for name, value in (("fid_real_dir", fid_real_dir), ("inception_weights", inception_weights),
                            ("clip_model", clip_model)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a path or id (a string) or None, got {value!r}")
        self._prompt_source = prompts
        self._given_prompts = read_prompts(prompts) if prompts is not None else None
        if embedded and self._given_prompts is not None:
            for p in self._given_prompts:
                digit_label(p)  # each embedded prompt must name one digit
        arch_name = arch.UNETS[self.architecture][0] if is_arch else None
        self.model_name = {"embedded": EMBEDDED_MODEL, "arch": arch_name}.get(size, model or DEFAULT_MODEL)
        self.scheduler_name = scheduler
        default_steps = {"embedded": 20, "arch": 50 if cuda else 10}.get(size, 50)
        self.num_inference_steps = num_inference_steps if num_inference_steps is not None else default_steps
        self.guidance_scale = float(guidance_scale) if guidance_scale is not None else (7.5 if is_arch else None)
        self.resolution = resolution
        self.prompts: list[str] = []
        self.num_images = num_images if num_images is not None else {"embedded": 50, "arch": 0}.get(size, 2000)
        self.batch_size = batch_size if batch_size is not None else (10 if embedded else 1)
        self.seed = seed
        self.fid = None if is_arch else fid
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

    def default_threads(self) -> int | None:
        """One thread for the embedded model (as fast as two, and robust to a busy neighbour); all available
        cores for the real architectures on CPU; torch's setting on GPUs."""
        if self.size == "embedded":
            return 1
        return cpu_count() if torch.device(self.device).type == "cpu" else None

    def notes(self) -> list[str]:
        """Caveats for every row of this task's results (the leaderboard prints them under the section)."""
        if self.size == "embedded":
            return [EMBEDDED_NOTE]
        return []

    # --- setup -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.torch_device = resolve_device(self.device)
        self.torch_dtype = torch_dtype(self.dtype)
        {"embedded": self._setup_embedded, "arch": self._setup_arch}.get(self.size, self._setup_full)()
        self._setup_quality()

    def _setup_embedded(self) -> None:
        from .embedded.data import load_digits_split
        from .embedded.diffusion import load_digits_diffusion
        from .embedded.vit import load_digits_vit

        unet, class_embed, default_scheduler = load_digits_diffusion()
        sched = default_scheduler
        if self.scheduler_name is not None:
            sched = make_scheduler(self.scheduler_name, default_scheduler.config)
        unet, class_embed = unet.eval().to(self.torch_device), class_embed.eval().to(self.torch_device)
        if self.torch_dtype != torch.float32:  # (diffusers warns about any dtype cast, even a no-op one)
            unet, class_embed = unet.to(self.torch_dtype), class_embed.to(self.torch_dtype)
        self.model = DigitsDiffusion(unet, class_embed, sched)
        self.resolution = 32
        if self.guidance_scale is None:
            self.guidance_scale = _default_digits_guidance()
        self.prompts = self._given_prompts or [DIGIT_TEMPLATE.format(d) for d in range(10)]
        self.labels = [digit_label(p) for p in self.prompts]
        self.classifier = PreLogitsFeatures(load_digits_vit().eval(), mean=0.5, std=0.5).to(self.torch_device)
        self._real_images_loader = lambda: to_uint8(torch.as_tensor(load_digits_split("test")[0]), (-1.0, 1.0))

    def _setup_arch(self) -> None:
        unet = arch.build_unet(self.unet_config, seed=self.seed).to(self.torch_device)
        if self.torch_dtype != torch.float32:  # (diffusers warns at every dtype cast, even to float32)
            unet = unet.to(self.torch_dtype)
        sched = arch.sd15_scheduler()
        if self.scheduler_name is not None:
            sched = make_scheduler(self.scheduler_name, sched.config)
        self.model = arch.ArchDiffusion(unet, sched, embedding_seed=self.seed)
        self.latent_size = self.resolution // arch.VAE_SCALE_FACTOR
        self.labels = []

    def _setup_full(self) -> None:
        from diffusers import StableDiffusionPipeline

        local = os.path.isdir(self.model_name)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                self.model_name, torch_dtype=self.torch_dtype, safety_checker=None, requires_safety_checker=False
            )
        except (OSError, ValueError) as err:
            from .vit_classification import _hf_cache_hint

            where = f"the local directory {self.model_name!r}" if local else f"{_hf_cache_hint()}"
            raise FileNotFoundError(
                f"Stable Diffusion weights {self.model_name!r} not found: looked in {where}. Pass model=<local "
                f"directory saved with save_pretrained> or download the model once with network access. "
                f"Cause: {type(err).__name__}: {err}"
            ) from err
        if not any(cls.__name__ == "UNet2DConditionModel" for cls in type(pipe.unet).__mro__):
            raise UnsupportedModelError(
                f"{self.model_name!r} has a {type(pipe.unet).__name__}; text_to_image supports the diffusers_unet "
                "family (UNet2DConditionModel, Stable Diffusion 1.x/2.x)"
            )
        if self.scheduler_name is not None:
            pipe.scheduler = make_scheduler(self.scheduler_name, pipe.scheduler.config)
        pipe = pipe.to(self.torch_device)
        pipe.set_progress_bar_config(disable=True)
        self.model = pipe
        if self.resolution is None:
            self.resolution = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        if self.resolution % int(pipe.vae_scale_factor) != 0:
            raise ValueError(f"resolution {self.resolution} must be a multiple of {pipe.vae_scale_factor}")
        if self.guidance_scale is None:
            self.guidance_scale = 7.5
        self.prompts = self._given_prompts or imagenet_prompts()
        self.labels = []

    def _setup_quality(self) -> None:
        fid = self.fid
        if isinstance(fid, nn.Module):
            self.feature_module = fid.eval()
        elif fid == "auto":
            if self.size == "embedded":
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
        sharding); for ``size="arch"`` the final latents. Image ``i`` is seeded with ``seed + i``; the global
        RNG is seeded with the first index, so methods that draw from it (e.g. ToMe's random destinations) are
        reproducible too."""
        self._require_setup()
        indices = [int(i) for i in indices]
        torch.manual_seed(self.seed + indices[0])
        seeds = [self.seed + i for i in indices]
        if self.size == "embedded":
            images = self.model(
                [self.label_for(i) for i in indices], seeds, self.num_inference_steps, self.guidance_scale
            )
            return to_uint8(images, (-1.0, 1.0))
        if self.size == "arch":
            return self.model(seeds, self.num_inference_steps, self.guidance_scale, self.latent_size)
        out = self.model(
            [self.prompt_for(i) for i in indices],
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=self.resolution,
            width=self.resolution,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="pt",
        )
        return to_uint8(out.images, (0.0, 1.0))

    def _batches(self, n: int) -> list[list[int]]:
        """The global batches of image indices: ``[0, b), [b, 2b), ...``. Processes share out whole batches, so
        every image is generated in the same batch (hence with the same random draws of a method) whatever the
        number of processes."""
        return _chunks(list(range(n)), self.batch_size)

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
        if self.size == "arch":
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
        if self.size == "embedded":
            real = self._real_images_loader()
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
                if self.size == "embedded":
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
            value, ci, n = proportion([r["correct"] for r in records])
            out.add("class_accuracy", value, ci, n)
        if "clip" in records[0]:
            out.add("clip_score", *mean_score([r["clip"] for r in records]))
        if reference and "psnr" in records[0]:
            out.add("psnr", *mean_score([r["psnr"] for r in records]))
            out.add("ssim", *mean_score([r["ssim"] for r in records]))
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
        ``size="arch"`` has no quality: an empty result."""
        self._require_setup()
        if self.size == "arch":
            return Quality()
        return self._score(self._generate_records("evaluate"), reference=True)

    # --- speed -------------------------------------------------------------------------------------------
    def _unet(self) -> nn.Module:
        return self.model.unet

    def workload(self):
        """Generate one batch (``batch_size`` images, indices 0..batch_size-1), synchronized on CUDA."""
        self._require_setup()
        indices = list(range(self.batch_size))
        device = self.torch_device

        def run() -> torch.Tensor:
            images = self.generate(indices)
            synchronize(device)
            return images

        return run

    def measure_speed(self, flops: bool = True, memory: bool = True, share: bool = True) -> dict[str, float]:
        """``gflops``/``unet_gflops`` per image and ``peak_mem_mb`` of one generation of a batch (one call for
        both), ``unet_share`` (another call with timing hooks; with ``share``, not for arch, whose workload is the
        U-Net and its scheduler only), ``unet_calls_per_batch`` and ``batch_size``. No latency: the harness
        times the workload."""
        self._require_setup()
        indices = list(range(self.batch_size))
        n = len(indices)

        def fn() -> None:
            self.generate(indices)

        unet_name = type(self._unet()).__name__
        out: dict[str, float] = {"batch_size": float(n)}
        measured = flops_and_memory(fn, self.torch_device, n, flops=flops, memory=memory, modules={
            "unet_gflops": unet_name})  # fmt: skip
        out.update(measured)
        if share and self.size != "arch":
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
        scheduler = getattr(self.model, "scheduler", None) if self.model is not None else None
        if self.size == "arch":
            prompts = "random text embeddings (77 tokens)"
        elif self._prompt_source is None:
            prompts = "digits 0-9" if self.size == "embedded" else "ImageNet classes (tomesd FID protocol)"
        else:
            prompts = self._prompt_source if isinstance(self._prompt_source, str) else f"{len(self.prompts)} given"
        info.update(
            model=self.model_name,
            scheduler=type(scheduler).__name__ if scheduler is not None else self.scheduler_name,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            resolution=self.resolution,
            prompts=prompts,
            num_images=self.num_images,
            batch_size=self.batch_size,
            seed=self.seed,
            fid_features=self._feature_description(),
            fid_real=("digits test split" if self.size == "embedded" else self.fid_real_dir),
            clip_model=self.clip_model,
        )
        if self.size == "arch":
            info.update(
                weights="random init (speed only)",
                latent_size=self.resolution // arch.VAE_SCALE_FACTOR,
                unet_batch=self.batch_size * (2 if self.guidance_scale > 1.0 else 1),
            )
        return info
