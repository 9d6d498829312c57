"""Small models shipped with tokred so benchmarks run offline: both trained on scikit-learn's digits.

* :mod:`.data`: the fixed train/test split of the digits, upsampled to 32x32 in [-1, 1].
* :mod:`.vit`: a timm ViT classifier (64 patch tokens + cls), ``load_digits_vit()``.
* :mod:`.diffusion`: a class-conditional pixel-space diffusers U-Net (1024 tokens in its top transformer
  blocks), ``load_digits_diffusion()`` and ``sample_digits(...)``.

Weights live in ``weights/``; ``train_vit.py`` and ``train_diffusion.py`` reproduce them.
"""
