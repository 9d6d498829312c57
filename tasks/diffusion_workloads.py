"""The kinds of text-to-image model the ``text_to_image`` task runs (:mod:`tokred.bench.workload`).

* :class:`EmbeddedDigits` (``size="embedded"``): the class-conditional pixel-space digits U-Net shipped with
  tokred (SD's block layout, 32x32 tokens in its top blocks, classifier-free guidance); offline, seconds per
  batch on a CPU, judged by the embedded digits ViT. The timed unit is a generation of a batch.
* :class:`RandomInitDenoiser` (``size="arch"``): a real denoiser of the architecture table
  (:data:`tokred.tasks.architectures.ARCHITECTURES`: SD1.5, SD2.1, SDXL, SD3, SD3.5) at random init in its real
  sampler loop (:class:`~tokred.tasks.architectures.RandomInitPipeline`) with random conditioning of its text
  encoders' shapes: speed, FLOPs, memory and token counts, no quality. The timed unit is one denoiser call
  inside a running generation (``unit="call"``, the default: 1024² fits a CPU), or a whole generation
  (``unit="generation"``).
* :class:`PretrainedPipeline` (``size="full"``): the architecture's diffusers pipeline loaded with
  ``from_pretrained`` (a Hugging Face id from the cache, or a local directory); the timed unit is a generation.

Adding a denoiser family is a row in the architecture table; the workloads take it from there.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from tokred.bench.measure import synchronize
from tokred.bench.workload import TimedCall, Workload, hf_cache_hint
from tokred.errors import UnsupportedModelError

from . import architectures as A
from .quality import to_uint8

EMBEDDED_MODEL = "tokred-digits-diffusion"
DIGIT_TEMPLATE = "a handwritten digit {}"
IMAGENET_TEMPLATE = "A high quality photograph of a {}."
CALL, GENERATION = "call", "generation"
UNITS = (CALL, GENERATION)
EMBEDDED_NOTE = (
    "the embedded digits U-Net is narrow (16 channels in its 1024-token blocks): the reduction methods' own work "
    "(matching, gathers, caches) is large next to the compute they save, so its measured speedups stay below the "
    "FLOPs-ideal and below those reported for SD1.5; `--size arch` measures SD1.5's architecture"
)
RANDOM_WEIGHTS_NOTE = "random weights (size arch): speed, FLOPs, memory and token counts only; no quality"

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
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


def make_scheduler(name: str, config: Any):
    """A diffusers scheduler by short name (``ddim``, ``pndm`` (PLMS: ``skip_prk_steps=True``), ``euler``,
    ``euler_a``, ``heun``, ``lms``, ``dpmsolver``, ``dpmsolver++``, ``unipc``, ``flow_euler`` ...) from another
    scheduler's config (the model's training noise schedule)."""
    import diffusers

    key = name.lower()
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    cls_name, overrides = SCHEDULERS[key]
    return getattr(diffusers, cls_name).from_config(config, **overrides)


def digit_label(prompt: str) -> int:
    """The digit class a prompt asks for: the one digit it contains (``"3"``, ``"a handwritten digit 3"``)."""
    digits = re.findall(r"\d", prompt)
    if len(set(digits)) != 1:
        raise ValueError(f"embedded prompts must name exactly one digit 0-9, got {prompt!r}")
    return int(digits[0])


def imagenet_prompts() -> list[str]:
    """tomesd's FID protocol: ``"A high quality photograph of a {class}."`` for each ImageNet class (the first
    synonym of each synset, from timm's bundled metadata)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [IMAGENET_TEMPLATE.format(info.index_to_description(i).split(",")[0].strip())
            for i in range(info.num_classes())]


class DiffusionWorkload(Workload):
    """What a text-to-image workload provides to the task (see the module docstring). Subclasses set the class
    attributes of :class:`~tokred.bench.workload.Workload` and implement :meth:`build` and :meth:`generate`."""

    family: str = "diffusers_unet"

    def __init__(self, device: str, *, seed: int = 0, scheduler: str | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 resolution: int | None = None, batch_size: int | None = None,
                 prompts: Sequence[str] | None = None, **own: Any) -> None:
        self.device = device
        self.cuda = str(device).startswith("cuda")
        self.seed = seed
        self.scheduler_name = scheduler
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.resolution = resolution
        self.batch_size = batch_size if batch_size is not None else 1
        self.given_prompts = list(prompts) if prompts is not None else None
        self.prompts: list[str] = []
        self.labels: list[int] = []
        self.model: Any = None
        self.model_name = ""

    # --- what the task asks --------------------------------------------------------------------------------
    def default_dtype(self) -> str:
        return "float32"

    def default_num_images(self) -> int:
        return 0

    def denoiser(self) -> nn.Module:
        return self.model.unet

    def build(self, torch_device: torch.device, torch_dtype: torch.dtype) -> Any:
        raise NotImplementedError

    def generate(self, indices: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def classifier(self, torch_device: torch.device) -> Any:
        """A classifier of the generated images (features and logits, a ``PreLogitsFeatures``) that judges class
        accuracy and gives FID features, or None."""
        return None

    def real_images(self) -> torch.Tensor | None:
        """uint8 real images for FID that come with the workload (None: the task's ``fid_real_dir``)."""
        return None

    real_images_name: ClassVar[str | None] = None

    def prompt_for(self, index: int) -> str:
        return self.prompts[index % len(self.prompts)]

    def label_for(self, index: int) -> int:
        return self.labels[index % len(self.labels)]

    def timed_call(self, generate: Any, torch_device: torch.device) -> TimedCall:
        """A generation of one batch (images ``0..batch_size-1``), synchronized on CUDA."""
        indices = list(range(self.batch_size))

        def run() -> torch.Tensor:
            images = generate(indices)
            synchronize(torch_device)
            return images

        n = len(indices)
        return TimedCall(run, f"generation of {n} image{'s' if n != 1 else ''} ({self.num_inference_steps} steps)")

    def describe(self) -> dict[str, Any]:
        scheduler = getattr(self.model, "scheduler", None)
        return {
            "model": self.model_name,
            "scheduler": type(scheduler).__name__ if scheduler is not None else self.scheduler_name,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "resolution": self.resolution,
            "batch_size": self.batch_size,
        }


class EmbeddedDigits(DiffusionWorkload):
    kind = "embedded"
    summary = "the embedded digits diffusion U-Net"
    cpu_threads = "one"
    note = EMBEDDED_NOTE
    settings = frozenset({"prompts"})
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        # About 0.6 s per image (20 DDIM steps, guidance, one thread). Per method: 80 evaluated images
        # (8 per digit) for FID/KID/accuracy/PSNR with intervals and the paired differences from the baseline,
        # 1 warm-up + 5-12 paired rounds of a 2-image batch (2.4 s a round), one more batch for FLOPs and memory
        # and one for the U-Net share. The count: what the main job's 15 minutes on 2 cores leave after timing,
        # with the mildest and strongest preset of each of 5 methods (about 0.6 s for the baseline's image plus
        # 10 x 0.5 s for the cases', 5.4 s an image index: 80 images are 430 s of the job). The evaluated images
        # are generated 2 a call, as timed; `--set eval_batch_size=N` generates them N a call (cheaper per image
        # if a call's fixed cost dominates: to be timed on a quiet machine before the profile takes it).
        # Rounds of about 2 s, 40-60 s per case, reproduced from machine to machine: one process, and a timing
        # floor of 5 s of method calls (the fastest presets stop at 5 rounds of 0.7 s otherwise).
        "default": {"task": {"num_images": 80, "batch_size": 2}, "budget_s": 25.0, "max_rounds": 20,
                    "min_time_s": 5.0},
        "quick": {"task": {"num_images": 10, "batch_size": 2, "num_inference_steps": 10}, "budget_s": 4.0,
                  "max_rounds": 8},
    }

    def __init__(self, device: str, **settings: Any) -> None:
        super().__init__(device, **settings)
        if self.resolution not in (None, 32):
            raise ValueError(
                f"resolution must be 32 (or None) for the embedded 32x32 digits model, got {self.resolution!r}"
            )
        self.resolution = 32
        self.model_name = EMBEDDED_MODEL
        self.batch_size = settings.get("batch_size") or 10
        if self.num_inference_steps is None:
            self.num_inference_steps = 20
        if self.given_prompts is not None:
            for p in self.given_prompts:
                digit_label(p)  # each embedded prompt must name one digit

    def default_num_images(self) -> int:
        return 50

    def build(self, torch_device: torch.device, torch_dtype: torch.dtype) -> Any:
        from .embedded.diffusion import load_digits_diffusion, sample_digits

        unet, class_embed, scheduler = load_digits_diffusion()
        if self.scheduler_name is not None:
            scheduler = make_scheduler(self.scheduler_name, scheduler.config)
        unet, class_embed = unet.eval().to(torch_device), class_embed.eval().to(torch_device)
        if torch_dtype != torch.float32:  # (diffusers warns about any dtype cast, even a no-op one)
            unet, class_embed = unet.to(torch_dtype), class_embed.to(torch_dtype)
        self.model = DigitsDiffusion(unet, class_embed, scheduler)
        if self.guidance_scale is None:
            self.guidance_scale = float(inspect.signature(sample_digits).parameters["guidance_scale"].default)
        self.prompts = self.given_prompts or [DIGIT_TEMPLATE.format(d) for d in range(10)]
        self.labels = [digit_label(p) for p in self.prompts]
        return self.model

    real_images_name = "digits test split"

    def classifier(self, torch_device: torch.device) -> Any:
        from .embedded.vit import load_digits_vit
        from .quality import PreLogitsFeatures

        return PreLogitsFeatures(load_digits_vit().eval(), mean=0.5, std=0.5).to(torch_device)

    def real_images(self) -> torch.Tensor:
        from .embedded.data import load_digits_split

        return to_uint8(torch.as_tensor(load_digits_split("test")[0]), (-1.0, 1.0))

    def generate(self, indices: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        images = self.model([self.label_for(i) for i in indices], seeds, self.num_inference_steps,
                            self.guidance_scale)
        return to_uint8(images, (-1.0, 1.0))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "prompts": "digits 0-9" if self.given_prompts is None else
                f"{len(self.prompts)} given"}


class DigitsDiffusion:
    """The embedded class-conditional digits model with a pipeline's shape: ``.unet`` and ``.scheduler``, so
    ``tokred.apply(task.model, ...)`` patches the U-Net and follows the scheduler as for a diffusers pipeline.
    ``__call__(labels, seeds, ...)`` samples images in [-1, 1]."""

    def __init__(self, unet: nn.Module, class_embed: nn.Module, scheduler: Any) -> None:
        self.unet = unet
        self.class_embed = class_embed
        self.scheduler = scheduler

    def __call__(self, labels: Sequence[int], seeds: Sequence[int], num_inference_steps: int,
                 guidance_scale: float) -> torch.Tensor:
        from .embedded.diffusion import sample_digits

        return sample_digits(
            self.unet,
            self.class_embed,
            torch.as_tensor(list(labels), dtype=torch.long),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            scheduler=self.scheduler,
        )


class _ArchitectureWorkload(DiffusionWorkload):
    """A workload built from a row of the architecture table (``architecture=``, default ``sd15``)."""

    def __init__(self, device: str, *, architecture: str | None = None, **settings: Any) -> None:
        super().__init__(device, **settings)
        self.arch = A.get_architecture(architecture or A.DEFAULT_ARCHITECTURE)
        self.architecture = self.arch.name
        self.family = self.arch.family
        if self.guidance_scale is None:
            self.guidance_scale = self.arch.guidance_scale

    def denoiser(self) -> nn.Module:
        return getattr(self.model, self.arch.denoiser_attr)

    def default_dtype(self) -> str:
        return "float16" if self.cuda else "float32"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "architecture": self.architecture}


class RandomInitDenoiser(_ArchitectureWorkload):
    kind = "arch"
    summary = "a real denoiser architecture at random init"
    random_weights = True
    note = RANDOM_WEIGHTS_NOTE
    settings = frozenset({"architecture", "unet_config", "config", "unit"})
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        # Real architectures at random init: a call is a fraction of a second (GPU) to a minute (CPU at 1024²);
        # 5 rounds is the floor, so on a CPU the budget only ever stops them at 5.
        # 3 worker processes, each with its own model (memory: 4 copies of the denoiser with the parent's).
        "default": {"budget_s": 120.0, "max_rounds": 30, "processes": 3, "min_time_s": 10.0},
        "quick": {"task": {"num_inference_steps": 4}, "budget_s": 10.0, "max_rounds": 5},
    }

    def __init__(self, device: str, *, unet_config: dict[str, Any] | None = None,
                 config: dict[str, Any] | None = None, unit: str | None = None, **settings: Any) -> None:
        super().__init__(device, **settings)
        if unet_config is not None and config is not None:
            raise ValueError("give config= or its older name unet_config=, not both")
        overrides = config if config is not None else unet_config
        if overrides is not None and not isinstance(overrides, dict):
            raise ValueError(f"config must be a dict of {self.arch.model_class} arguments, got {overrides!r}")
        if unit is not None and unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
        self.unit = unit or CALL
        self.config = A.config_with(self.architecture, overrides)
        if self.resolution is None:  # the architecture's own size on a GPU; at most 512 on a CPU
            self.resolution = self.arch.default_resolution if self.cuda else min(512, self.arch.default_resolution)
        multiple = A.VAE_SCALE_FACTOR * A.latent_multiple(self.architecture, self.config)
        if self.resolution % multiple:
            what = "U-Net" if self.family == "diffusers_unet" else "transformer's patches"
            raise ValueError(f"resolution must be a multiple of {multiple} for this {what}, got {self.resolution}")
        if self.num_inference_steps is None:
            self.num_inference_steps = self.arch.default_steps
        self.model_name = f"{self.arch.description} (random init)"
        self.latent_size = self.resolution // A.VAE_SCALE_FACTOR

    def build(self, torch_device: torch.device, torch_dtype: torch.dtype) -> Any:
        denoiser = A.build_from_config(self.architecture, self.config, torch_device, torch_dtype, seed=self.seed)
        scheduler = self.arch.scheduler()
        if self.scheduler_name is not None:
            scheduler = make_scheduler(self.scheduler_name, scheduler.config)
        self.model = A.RandomInitPipeline(self.architecture, denoiser, scheduler, embedding_seed=self.seed)
        return self.model

    def generate(self, indices: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        """The final latents of a whole generation (no VAE)."""
        return self.model(seeds, self.num_inference_steps, self.guidance_scale, self.latent_size)

    def timed_call(self, generate: Any, torch_device: torch.device) -> TimedCall:
        if self.unit == GENERATION:
            return super().timed_call(generate, torch_device)
        return DenoiserCall(self.model, [self.seed + i for i in range(self.batch_size)], self.num_inference_steps,
                            self.guidance_scale, self.latent_size, torch_device)

    def describe(self) -> dict[str, Any]:
        cfg = self.guidance_scale > 1.0 and self.family != "diffusers_flux"  # Flux embeds its guidance
        denoiser_batch = self.batch_size * (2 if cfg else 1)
        return {**super().describe(), "weights": "random init (speed only)",
                "prompts": "random text embeddings of the text encoders' shapes", "latent_size": self.latent_size,
                "denoiser_batch": denoiser_batch, "unet_batch": denoiser_batch, "unit": self.unit}


class DenoiserCall(TimedCall):
    """One denoiser call inside a running generation (``unit="call"``): each call denoises the current step of a
    real sampler loop and :meth:`advance` steps the sampler with its prediction, so the method sees the timesteps,
    latents and call count of a generation. :meth:`start` begins a generation and runs the method's warm-up
    calls untimed (CAT pruning's ``t0`` full calls); a generation that runs out of steps starts again in
    :meth:`advance`, with its warm-up, so no timed call is ever a warm-up call. The baseline's calls (the patch
    paused) denoise the same step and do not advance it.

    ``start(warmup, cycle=n)`` (a cache's cycle, :meth:`tokred.Method.cycle_calls`) makes each timed call a cycle
    of ``n`` denoiser calls at the next ``n`` timesteps (``unit`` "cycle of n denoiser calls"), for the baseline
    and the method alike; the calls of a cycle start from the latents at its start (stepping the sampler between
    them would change the scheduler's state inside the baseline's timed calls), and :meth:`advance` steps the
    sampler with their predictions in turn. A generation restarts where fewer than ``n`` steps are left, so every
    cycle is ``n`` consecutive calls of one generation (DeepCache's: one full call and ``n - 1`` reusing ones)."""

    stateful = True

    def __init__(self, pipe: A.RandomInitPipeline, seeds: list[int], steps: int, guidance_scale: float,
                 latent_size: int, torch_device: torch.device) -> None:
        super().__init__(self._call, "denoiser call")
        self.pipe, self.seeds, self.steps = pipe, seeds, steps
        self.guidance_scale, self.latent_size, self.torch_device = guidance_scale, latent_size, torch_device
        self.warmup_calls = 0
        self.run: A.DenoisingRun | None = None
        self.last: list[torch.Tensor] = []  # the predictions of the latest timed call, for advance()

    @torch.no_grad()
    def _call(self) -> torch.Tensor:
        if self.run is None:
            self.start(self.warmup_calls, self.calls)
        run = self.run if self.calls == 1 else dataclasses.replace(self.run)  # a cycle: its own index
        self.last = []
        for i in range(self.calls):
            run.index += 1 if i else 0
            self.last.append(self.pipe.call(run))
        synchronize(self.torch_device)
        return self.last[-1]

    @torch.no_grad()
    def start(self, warmup_calls: int = 0, cycle: int = 1) -> None:
        if warmup_calls + cycle > self.steps:
            what = "call" if cycle == 1 else f"cycle of {cycle} calls"
            raise ValueError(
                f"a generation of {self.steps} steps has no {what} after the method's {warmup_calls} warm-up calls; "
                "raise num_inference_steps"
            )
        self.warmup_calls, self.calls = warmup_calls, cycle
        self.unit = "denoiser call" if cycle == 1 else f"cycle of {cycle} denoiser calls"
        self.run = self.pipe.begin(self.seeds, self.steps, self.guidance_scale, self.latent_size)
        for _ in range(warmup_calls):
            self.pipe.step(self.run, self.pipe.call(self.run))
        self.last = []

    @torch.no_grad()
    def advance(self) -> None:
        if self.run is None or not self.last:
            return
        for prediction in self.last:
            self.pipe.step(self.run, prediction)
        self.last = []
        if self.run.index + self.calls > len(self.run.timesteps):
            self.start(self.warmup_calls, self.calls)


class PretrainedPipeline(_ArchitectureWorkload):
    kind = "full"
    summary = "a diffusers pipeline with its weights"
    settings = frozenset({"model", "architecture", "fid_real_dir", "clip_model", "prompts"})

    def __init__(self, device: str, *, model: str | None = None, **settings: Any) -> None:
        super().__init__(device, **settings)
        if model is not None and not isinstance(model, str):
            raise ValueError(f"model must be a Hugging Face id or a local directory (a string), got {model!r}")
        self.model_name = model or self.arch.hub_id
        if self.num_inference_steps is None:
            self.num_inference_steps = self.arch.default_steps

    def default_num_images(self) -> int:
        return 2000

    def build(self, torch_device: torch.device, torch_dtype: torch.dtype) -> Any:
        import diffusers

        pipeline_cls = getattr(diffusers, self.arch.pipeline_class)
        kwargs: dict[str, Any] = {"torch_dtype": torch_dtype}
        if "safety_checker" in inspect.signature(pipeline_cls.__init__).parameters:
            kwargs.update(safety_checker=None, requires_safety_checker=False)  # it would black out images, skew FID
        local = os.path.isdir(self.model_name)
        if local:  # components saved as absent (SD3 without its T5 encoder) must be passed as None to load
            index = os.path.join(self.model_name, "model_index.json")
            if os.path.isfile(index):
                with open(index, encoding="utf-8") as fh:
                    absent = [k for k, v in json.load(fh).items() if isinstance(v, list) and v == [None, None]]
                kwargs.update({k: None for k in absent if k not in kwargs})
        try:
            pipe = pipeline_cls.from_pretrained(self.model_name, **kwargs)
        except (OSError, ValueError) as err:
            where = f"the local directory {self.model_name!r}" if local else hf_cache_hint()
            raise FileNotFoundError(
                f"{self.arch.pipeline_class} weights {self.model_name!r} not found: looked in {where}. Pass "
                f"model=<local directory saved with save_pretrained> or download the model once with network "
                f"access. Cause: {type(err).__name__}: {err}"
            ) from err
        denoiser = getattr(pipe, self.arch.denoiser_attr, None)
        if denoiser is None or type(denoiser).__name__ != self.arch.model_class:
            found = type(getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)).__name__
            raise UnsupportedModelError(
                f"{self.model_name!r} has a {found}; architecture {self.architecture!r} expects a "
                f"{self.arch.model_class} (valid architectures for it: {', '.join(A.architecture_of(found)) or 'none'})"
            )
        if self.scheduler_name is not None:
            pipe.scheduler = make_scheduler(self.scheduler_name, pipe.scheduler.config)
        pipe = pipe.to(torch_device)
        pipe.set_progress_bar_config(disable=True)
        self.model = pipe
        if self.resolution is None:  # Flux's transformer has no sample_size: the architecture's default
            sample_size = getattr(denoiser.config, "sample_size", None)
            self.resolution = (int(sample_size) * int(pipe.vae_scale_factor) if sample_size
                               else self.arch.default_resolution)
        if self.resolution % int(pipe.vae_scale_factor) != 0:
            raise ValueError(f"resolution {self.resolution} must be a multiple of {pipe.vae_scale_factor}")
        self.prompts = self.given_prompts or imagenet_prompts()
        return pipe

    def generate(self, indices: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        if self.arch.model_class == "DiTTransformer2DModel":  # class-conditional: the prompts name ImageNet classes
            return self.generate_classes(indices, seeds)
        out = self.model(
            [self.prompt_for(i) for i in indices],
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=self.resolution,
            width=self.resolution,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            output_type="pt",
        )
        return to_uint8(out.images, (0.0, 1.0))

    def generate_classes(self, indices: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        """DiT: image ``i`` of ImageNet class ``i % 1000`` (given prompts: class names of the pipeline's
        ``id2label``, through ``DiTPipeline.get_label_ids``), at the model's own resolution."""
        if self.given_prompts is None:
            labels = [int(i) % 1000 for i in indices]
        else:
            labels = self.model.get_label_ids([self.prompt_for(i) for i in indices])
        out = self.model(
            class_labels=labels,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            output_type="np",
        )
        return to_uint8(torch.from_numpy(out.images).permute(0, 3, 1, 2), (0.0, 1.0))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "prompts": "ImageNet classes (tomesd FID protocol)"
                if self.given_prompts is None else f"{len(self.prompts)} given"}


WORKLOADS: dict[str, type[DiffusionWorkload]] = {
    w.kind: w for w in (EmbeddedDigits, RandomInitDenoiser, PretrainedPipeline)
}

