"""DeepCache (methods/deepcache.py): parity with the official ``DeepCache`` 0.1.1 helper on whole generations of
tiny SD 1.5- and SDXL-layout pipelines, the non-uniform schedule against the official pipeline's formula, what is
computed on reusing calls, and the lifecycle."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
from conftest import require_reference
from tiny_models import tiny_sd_pipeline, tiny_sd_unet
from tiny_sdxl import tiny_sdxl_pipeline

import tokred
from tokred.errors import InvalidOptionError, UnsupportedModelError
from tokred.methods.deepcache import nonuniform_full_steps

SETTINGS = [(3, 0), (2, 1), (4, 5)]  # (cache_interval, cache_branch_id)
RTOL = 1e-5


def generate(pipe, steps: int = 10, **kwargs) -> torch.Tensor:
    size = {"height": 32, "width": 32}  # 16x16 latents on both tiny pipelines
    with torch.no_grad():
        return pipe("a red cube", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                    output_type="pt", **size, **kwargs).images  # fmt: skip


def official(pipe, interval: int, branch: int, runs: int = 1) -> list[torch.Tensor]:
    helper = require_reference("DeepCache").DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return [generate(pipe) for _ in range(runs)]
    finally:
        helper.disable()


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sdxl_pipe():
    return tiny_sdxl_pipeline()


@pytest.mark.parametrize("interval,branch", SETTINGS)
@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_images_match_the_official_helper(layout, interval, branch, sd_pipe, sdxl_pipe):
    pipe = sd_pipe if layout == "sd15" else sdxl_pipe
    baseline = generate(pipe)
    first, second = official(pipe, interval, branch, runs=2)  # the helper's state carries over: same image here
    with tokred.apply(pipe, "deepcache", cache_interval=interval, cache_branch_id=branch):
        ours, again = generate(pipe), generate(pipe)
    assert relative_difference(ours, first) <= RTOL and relative_difference(again, second) <= RTOL
    assert torch.equal(ours, again)  # same seed, same image
    assert relative_difference(ours, baseline) > 1e-3  # it does reuse
    assert torch.equal(generate(pipe), baseline)  # remove() is exact


def test_unet_blocks_match_deepcache_numbering(sd_pipe):
    """The U-Net of the SD1.5-layout pipeline has 4 levels of 3 up layers: branch ids 0-11 are valid, 12 is not."""
    unet = sd_pipe.unet
    assert len(unet.up_blocks) == 4 and all(len(b.resnets) == 3 for b in unet.up_blocks)
    tokred.apply(sd_pipe, "deepcache", cache_branch_id=11).remove()
    with pytest.raises(InvalidOptionError, match=r"cache_branch_id=12 .* 0 <= cache_branch_id < 12"):
        tokred.apply(sd_pipe, "deepcache", cache_branch_id=12)
    assert tokred.get_patch(sd_pipe) is None


# --- the non-uniform schedule -------------------------------------------------------------------------------------
def official_quad_center():
    """The official pipeline's ``sample_from_quad_center``, read from the installed package (its module does not
    import under diffusers 0.42)."""
    package = require_reference("DeepCache")
    source = (Path(package.__file__).parent / "sd" / "pipeline_stable_diffusion.py").read_text()
    node = next(n for n in ast.parse(source).body if getattr(n, "name", "") == "sample_from_quad_center")
    import numpy as np

    namespace = {"np": np}
    exec(compile(ast.Module([node], []), "pipeline_stable_diffusion.py", "exec"), namespace)
    return namespace["sample_from_quad_center"]


def test_nonuniform_schedule_is_the_official_formula():
    reference = official_quad_center()
    for steps in (10, 20, 25, 50, 100):
        for interval in (2, 3, 5, 10):
            for center, power in ((15, 1.4), (10, 1.2), (0, 2.0)):
                slow = -(-steps // interval)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the official code casts complex values to int
                    expected = [int(i) for i in reference(steps, slow, center=center, pow=power)[0]]
                assert nonuniform_full_steps(steps, interval, center, power) == expected
    assert nonuniform_full_steps(50, 3, 15, 1.4)[:6] == [0, 3, 6, 8, 11, 13]


class ConvCounter:
    """Counts the convolutions that really run, per U-Net call (the skipped modules' convolutions do not)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[int] = []
        convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
        self.handles = [c.register_forward_hook(lambda *_: self.bump()) for c in convs]
        self.handles.append(unet.register_forward_pre_hook(lambda *_: self.calls.append(0)))

    def bump(self) -> None:
        self.calls[-1] += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_nonuniform_generation_runs_full_steps_where_scheduled(sd_pipe):
    counter = ConvCounter(sd_pipe.unet)
    try:
        with tokred.apply(sd_pipe, "deepcache", cache_interval=3, uniform=False, center=4):
            generate(sd_pipe, steps=12)
    finally:
        counter.remove()
    full = max(counter.calls)
    assert [i for i, n in enumerate(counter.calls) if n == full] == nonuniform_full_steps(12, 3, 4, 1.4)


def test_nonuniform_needs_a_pipeline():
    with pytest.raises(InvalidOptionError, match="uniform=False needs each generation's number of steps"):
        tokred.apply(tiny_sd_unet(), "deepcache", uniform=False)


# --- what runs on reusing calls ---------------------------------------------------------------------------------
def denoise(unet, timesteps=(900, 800, 700, 600), same_input: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return [unet(sample if same_input else sample + 0.1 * i, t, encoder_hidden_states=text).sample
                for i, t in enumerate(timesteps)]  # fmt: skip


def test_reusing_calls_compute_fewer_blocks_and_tokens():
    unet = tiny_sd_unet()
    counter = ConvCounter(unet)
    with tokred.apply(unet, "deepcache", cache_interval=3, cache_branch_id=0) as patch:
        denoise(unet, timesteps=(900, 800, 700))
        counts = patch.token_counts()
    counter.remove()
    full, reused = counter.calls[0], counter.calls[1:]
    # branch 0 keeps conv_in, the last up block's last layer (resnet: 2 convs and the shortcut; the transformer's
    # 1x1 proj_in/proj_out) and conv_out
    assert reused == [7, 7] and full > 5 * reused[0]
    live = "up_blocks.3.attentions.2.transformer_blocks.0"
    for name, c in counts.items():
        assert c.calls == 3 and c.tokens > 0
        if name == live:
            assert c.attn == c.mlp == c.cross == c.tokens
        else:  # computed on the full call only
            assert c.attn == c.kv == c.mlp == c.cross == c.tokens / 3


@pytest.mark.parametrize("branch", [0, 4, 9, 11])
def test_a_reusing_call_on_the_same_input_equals_the_full_call(branch):
    """With the deep feature of the same input, the shallow branch gives the full output: also with FreeU, whose
    in-place scaling would compound on a feature kept by reference (as the official helper keeps it)."""
    unet = tiny_sd_unet()
    for freeu in (False, True):
        if freeu:
            unet.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
        full = denoise(unet, timesteps=(900,), same_input=True)[0]
        with tokred.apply(unet, "deepcache", cache_interval=4, cache_branch_id=branch):
            outs = denoise(unet, timesteps=(900, 900, 900), same_input=True)
        assert all(torch.allclose(o, full, rtol=1e-5, atol=1e-6) for o in outs), (freeu, branch)


def test_a_new_sample_shape_within_a_generation_runs_in_full():
    unet = tiny_sd_unet()
    counter = ConvCounter(unet)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 77, 32, generator=g)
    with tokred.apply(unet, "deepcache"), torch.no_grad():
        unet(torch.randn(2, 4, 16, 16, generator=g), 900, encoder_hidden_states=text)
        unet(torch.randn(1, 4, 16, 16, generator=g), 800, encoder_hidden_states=text[:1])  # would reuse
        unet(torch.randn(1, 4, 16, 16, generator=g), 700, encoder_hidden_states=text[:1])
    counter.remove()
    assert counter.calls[1] == counter.calls[0] > counter.calls[2]


def test_paused_calls_leave_the_cache_and_steps_alone():
    unet = tiny_sd_unet()
    reference = tiny_sd_unet()
    with tokred.apply(reference, "deepcache"):
        expected = denoise(reference)
    with tokred.apply(unet, "deepcache") as patch:
        outs = []
        for i, out in enumerate(denoise(unet)):
            outs.append(out)
            if i == 0:
                with patch.paused():
                    denoise(unet, timesteps=(850,))
        assert patch.state.step == 4
    assert all(torch.equal(a, b) for a, b in zip(outs, expected, strict=True))


# --- options and models ----------------------------------------------------------------------------------------
def test_options_are_checked_at_apply():
    unet = tiny_sd_unet()
    for bad, message in (
        ({"cache_interval": 0}, "cache_interval"),
        ({"cache_branch_id": -1}, "cache_branch_id"),
        ({"pow": 1.0}, "pow"),
        ({"uniform": 1}, "uniform"),
    ):
        with pytest.raises(InvalidOptionError, match=message):
            tokred.apply(unet, "deepcache", **bad)
    assert tokred.get_method("deepcache").presets == {
        "diffusers_unet": {f"interval{k}": {"cache_interval": k, "cache_branch_id": 0} for k in (2, 3, 5)}
    }
    assert tokred.get_method("deepcache")(None).warmup_calls() == 0


def test_interval_one_is_the_unpatched_model():
    unet = tiny_sd_unet()
    baseline = denoise(unet)
    with tokred.apply(unet, "deepcache", cache_interval=1):
        assert all(torch.equal(a, b) for a, b in zip(denoise(unet), baseline, strict=True))


def test_other_families_are_refused(tiny_vit):
    with pytest.raises(UnsupportedModelError, match="does not support timm_vit models; it supports: diffusers_unet"):
        tokred.apply(tiny_vit, "deepcache")
