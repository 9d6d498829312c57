"""Benchmark tasks; importing this package registers them (``tokred.bench.task.get_task("vit_classification")``).

* ``vit_classification``: timm ViT image classification (embedded digits ViT, or any timm ViT on ImageFolder data).
* ``text_to_image``: diffusers text-to-image (embedded digits diffusion model, or Stable Diffusion 1.5).

Shared pieces: :mod:`tokred.bench.measure` (FLOPs, memory; the harness times the workloads), :mod:`.quality`
(accuracy, FID, KID, CLIP, PSNR/SSIM, with intervals), :mod:`.arch` (the real architectures at random init,
``size="arch"``), :mod:`.sharding` (multi-process evaluation with accelerate). Tasks use the tokred core only,
never methods.
"""

from . import text_to_image, vit_classification  # noqa: F401
