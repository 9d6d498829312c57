"""Benchmark tasks; importing this package registers them (``tokred.bench.task.get_task("vit_classification")``).

* ``vit_classification``: timm ViT image classification (embedded digits ViT, or any timm ViT on ImageFolder data).
* ``text_to_image``: diffusers text-to-image (embedded digits diffusion model, or Stable Diffusion 1.5).

Shared pieces: :mod:`.measure` (timing, FLOPs, memory), :mod:`.quality` (accuracy, FID, CLIP, PSNR/SSIM),
:mod:`.sharding` (multi-process evaluation with accelerate). Tasks use the tokred core only, never methods.
"""

from . import text_to_image, vit_classification  # noqa: F401
