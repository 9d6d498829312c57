"""The real denoiser configurations of tasks/architectures.py: built on the meta device (no memory), their
parameter counts are the published checkpoints', and their CFG-step inputs fit them."""

import pytest
import torch

import tokred
from tokred.tasks import architectures as A


@pytest.mark.parametrize("name", list(A.ARCHITECTURES))
def test_parameter_count_is_the_published_checkpoints(name):
    model = A.build(name, device="meta")
    assert A.parameter_count(model) == A.ARCHITECTURES[name].parameters


def test_sdxl_layout_has_no_attention_at_full_resolution():
    unet = A.build("sdxl", device="meta")
    patch = tokred.apply(unet, "tome")  # shape-only planning: ToMe needs no values at apply
    try:
        assert patch.adapter.levels() == [2, 4]
        counts = {lvl: sum(1 for v in patch.adapter.level.values() if v == lvl) for lvl in (2, 4)}
        # transformer_layers_per_block (1, 2, 10) by level 1/2/4: 2 down + 3 up attentions at 2 and 4, mid at 4
        assert counts == {2: 2 * 2 + 3 * 2, 4: 2 * 10 + 10 + 3 * 10}
    finally:
        patch.remove()


@pytest.mark.parametrize("name", list(A.ARCHITECTURES))
def test_inputs_fit_the_model(name):
    """One CFG step's inputs run through the model on the meta device (shapes only) and give the latent shape."""
    arch = A.ARCHITECTURES[name]
    model = A.build(name, device="meta")
    inputs = arch.inputs(resolution=256, batch=2, device="meta")
    with torch.no_grad():
        out = model(**inputs).sample
    latent = inputs["sample" if "sample" in inputs else "hidden_states"]
    if arch.family == "diffusers_flux":  # 2x2-packed tokens of 4 x 16 channels
        assert out.shape == latent.shape and latent.shape[-2:] == ((256 // 16) ** 2, 64)
    else:
        channels = int(model.config.out_channels or latent.shape[1])  # PixArt, DiT: noise and learned sigma
        assert out.shape == (*latent.shape[:1], channels, *latent.shape[2:]) and latent.shape[-1] == 256 // 8


def test_unknown_architecture_and_bad_resolution_are_named():
    with pytest.raises(ValueError, match="valid: sd15, sd2, sdxl, sd3, sd35, pixart_alpha, pixart_sigma, dit_xl2, "
                                         "flux_dev, flux_schnell"):
        A.get_architecture("sd4")
    with pytest.raises(ValueError, match="multiple of the VAE's scale factor 8"):
        A.sdxl_unet_inputs(resolution=1000 + 1)
