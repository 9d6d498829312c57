"""The text_to_image task: a tiny Stable Diffusion pipeline saved and loaded back through from_pretrained (the
real loading path), the embedded digits diffusion model, quality metrics, errors, and ToMe through the task."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_clip_tokenizer, tiny_sd_pipeline

import tokred
from tokred.bench.task import get_task
from tokred.tasks.text_to_image import SCHEDULERS, digit_label, imagenet_prompts

FAST = dict(num_images=2, batch_size=2, num_inference_steps=2, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread, and much faster on a shared machine (no OpenMP spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _embedded_diffusion_available() -> bool:
    try:
        from tokred.tasks.embedded.diffusion import DEFAULT_WEIGHTS
        from tokred.tasks.embedded.vit import DEFAULT_WEIGHTS as VIT_WEIGHTS
    except ImportError:
        return False
    return DEFAULT_WEIGHTS.is_file() and VIT_WEIGHTS.is_file()


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd")
    tiny_sd_pipeline().save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def sd_task(sd_dir):
    task = get_task("text_to_image")(size="full", model=sd_dir, **FAST)
    task.setup()
    return task


def test_registered_with_metric_directions():
    cls = get_task("text_to_image")
    assert cls.family == "diffusers_unet"
    better = {m.name: m.better for m in cls.metrics}
    assert better["fid"] == "lower" and better["psnr"] == "higher" and better["class_accuracy"] == "higher"
    assert better["s_per_image"] == "lower" and better["gflops"] == "lower"


def test_loads_through_from_pretrained_with_defaults(sd_task, sd_dir):
    assert type(sd_task.model).__name__ == "StableDiffusionPipeline"
    assert sd_task.resolution == 32  # the U-Net's 16 x the VAE's factor 2
    assert sd_task.prompts[0] == "A high quality photograph of a tench."
    info = sd_task.describe()
    assert info["model"] == sd_dir and info["scheduler"] == "DDIMScheduler" and info["dtype"] == "float32"
    assert info["num_inference_steps"] == 2 and info["guidance_scale"] == 7.5


def test_same_seed_same_image_and_seed_per_index(sd_task):
    pair = sd_task.generate([0, 1])
    assert pair.dtype == torch.uint8 and pair.shape == (2, 3, 32, 32)
    assert torch.equal(sd_task.generate([1])[0], pair[1])  # image 1 does not depend on its batch
    assert not torch.equal(pair[0], pair[1])


def test_reference_psnr_and_tome_lowers_flops(sd_task):
    reference_quality = sd_task.record_reference()
    assert "psnr" not in reference_quality and "ssim" not in reference_quality  # no fidelity to itself
    base = sd_task.evaluate()
    assert base["psnr"] == 100.0 and base["ssim"] == pytest.approx(1.0)  # identical images (PSNR capped)
    assert base.n["psnr"] == 2 and base.ci["psnr"] == (100.0, 100.0)
    speed = sd_task.measure_speed(memory=False)
    assert {"unet_share", "gflops", "unet_gflops", "batch_size"} == set(speed) - {"unet_calls_per_batch"}
    assert 0 < speed["unet_share"] <= 1 and speed["unet_calls_per_batch"] == 2
    assert 0 < speed["unet_gflops"] < speed["gflops"]
    with tokred.apply(sd_task.model, "tome", ratio=0.5):
        reduced = sd_task.measure_speed(memory=False)
        quality = sd_task.evaluate()
    assert reduced["unet_gflops"] < speed["unet_gflops"] and reduced["gflops"] < speed["gflops"]
    assert quality["psnr"] < 100.0 and quality["ssim"] < 1.0
    assert sd_task.evaluate()["psnr"] == 100.0  # removed: the unreduced images again


def test_peak_memory(sd_task):
    speed = sd_task.measure_speed(flops=False, share=False)
    assert speed["peak_mem_mb"] > 0 and "gflops" not in speed and "unet_share" not in speed


class _MeanColour(torch.nn.Module):
    """A toy FID feature extractor: per-channel means and standard deviations of uint8 images."""

    num_features = 6

    def forward(self, images):
        x = images.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_fid_with_custom_features_and_real_folder(sd_dir, tmp_path):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = torch.randint(0, 256, (40, 50, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(tmp_path / f"real{i}.png")
    task = get_task("text_to_image")(
        size="full", model=sd_dir, fid=_MeanColour(), fid_real_dir=str(tmp_path), **{**FAST, "num_images": 3}
    )
    task.setup()
    result = task.evaluate()
    assert result["fid"] >= 0 and result.n["fid"] == 3 and result.n["kid"] == 3
    lo, hi = result.ci["fid"]
    assert 0 <= lo <= hi
    assert result.ci["kid"][0] <= result.ci["kid"][1]
    assert task._real_features.shape == (4, 6)


def test_fid_against_reference_without_real_images(sd_dir):
    task = get_task("text_to_image")(size="full", model=sd_dir, fid=_MeanColour(), **FAST)
    task.setup()
    assert "fid_vs_reference" not in task.record_reference()
    result = task.evaluate()
    assert result["fid_vs_reference"] == pytest.approx(0.0, abs=1e-6) and result.n["fid_vs_reference"] == 2


def test_clip_score_with_local_clip(sd_dir, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path / "clip")
    task = get_task("text_to_image")(size="full", model=sd_dir, clip_model=str(tmp_path / "clip"), **FAST)
    task.setup()
    result = task.evaluate()
    assert 0.0 <= result["clip_score"] <= 100.0 and result.n["clip_score"] == 2
    lo, hi = result.ci["clip_score"]
    assert lo <= result["clip_score"] <= hi


@pytest.mark.parametrize("name", ["pndm", "euler", "dpmsolver++"])
def test_scheduler_by_name(sd_dir, name):
    task = get_task("text_to_image")(size="full", model=sd_dir, scheduler=name, **FAST)
    task.setup()
    assert type(task.model.scheduler).__name__ == SCHEDULERS[name][0]
    if name == "pndm":
        assert task.model.scheduler.config.skip_prk_steps
    assert task.generate([0]).shape == (1, 3, 32, 32)


def test_prompts_from_file(sd_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red cube\n\na blue ball\n")
    task = get_task("text_to_image")(size="full", model=sd_dir, prompts=str(tmp_path / "prompts.txt"), **FAST)
    task.setup()
    assert task.prompts == ["a red cube", "a blue ball"] and task.prompt_for(3) == "a blue ball"


def test_errors(sd_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown scheduler 'nope'.*ddim"):
        get_task("text_to_image")(size="full", model=sd_dir, scheduler="nope", **FAST).setup()
    with pytest.raises(FileNotFoundError, match="local directory"):
        get_task("text_to_image")(size="full", model=str(tmp_path), **FAST).setup()
    with pytest.raises(FileNotFoundError, match="prompts file"):
        get_task("text_to_image")(size="full", model=sd_dir, prompts=str(tmp_path / "none.txt"), **FAST).setup()
    with pytest.raises(FileNotFoundError, match="fid_real_dir"):
        task = get_task("text_to_image")(
            size="full", model=sd_dir, fid=_MeanColour(), fid_real_dir=str(tmp_path / "none"), **FAST
        )
        task.setup()
        task.evaluate()
    with pytest.raises(ValueError, match="size='full'"):
        get_task("text_to_image")(size="embedded", model=sd_dir)


def test_missing_hub_weights_offline_names_the_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    task = get_task("text_to_image")(size="full", model="someone/not-cached-sd", **FAST)
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        task.setup()


def test_inception_fid_needs_torch_fidelity(sd_dir):
    pytest.importorskip("torchmetrics")
    try:
        import torch_fidelity  # noqa: F401

        pytest.skip("torch-fidelity is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="torch-fidelity"):
        get_task("text_to_image")(size="full", model=sd_dir, fid="inception", **FAST).setup()


def test_default_dtype_is_fp16_on_cuda_for_full_only():
    assert get_task("text_to_image")(size="full", device="cuda").dtype == "float16"
    assert get_task("text_to_image")(size="full", device="cpu").dtype == "float32"
    assert get_task("text_to_image")(size="embedded", device="cuda").dtype == "float32"


def test_prompt_helpers():
    prompts = imagenet_prompts()
    assert len(prompts) == 1000 and prompts[1] == "A high quality photograph of a goldfish."
    assert digit_label("a handwritten digit 7") == 7 and digit_label("3") == 3
    with pytest.raises(ValueError, match="one digit"):
        digit_label("12")


@pytest.mark.skipif(not _embedded_diffusion_available(), reason="embedded digits diffusion model not built yet")
def test_embedded_digits_diffusion_accuracy_and_tome():
    # 30 samples (3 per digit) at the default 20 DDIM steps: about 30 s on one CPU thread
    task = get_task("text_to_image")(size="embedded", num_images=30, progress=False)
    task.setup()
    assert task.describe()["fid_features"] == "digits ViT pre-logits" and task.guidance_scale == 2.0
    assert task.default_threads() == 1
    base = task.record_reference()
    assert base["class_accuracy"] >= 80.0, base
    assert 0 <= base["fid"] < 50, base  # a random-init model scores about 150 in this space
    assert base.n == {"class_accuracy": 30, "fid": 30, "kid": 30}
    lo, hi = base.ci["class_accuracy"]
    assert lo < base["class_accuracy"] <= hi
    task.batch_size = 2  # FLOPs of a 2-image batch: one generation each
    speed = task.measure_speed(memory=False, share=False)
    with tokred.apply(task.model, "tome", ratio=0.5):
        reduced = task.measure_speed(memory=False, share=False)
    assert reduced["unet_gflops"] < 0.85 * speed["unet_gflops"]


# --- every setting checked at construction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # each of these ran a wrong benchmark or was silently replaced by a default (`x or default`) before
        (dict(num_inference_steps=-3), r"num_inference_steps must be an int >= 1 or None, got -3"),
        (dict(num_inference_steps=0), r"num_inference_steps must be an int >= 1 or None, got 0"),
        (dict(num_inference_steps=2.5), r"num_inference_steps must be an int >= 1 or None, got 2.5"),
        (dict(batch_size=0), r"batch_size must be an int >= 1 or None, got 0"),
        (dict(num_images=0), r"num_images must be an int >= 1 or None, got 0"),
        (dict(num_images=-1), r"num_images must be an int >= 1 or None, got -1"),
        (dict(prompts=[]), r"prompts must be a prompts file or a non-empty list of strings, got \[\]"),
        (dict(prompts=["a handwritten digit 3", ""]), r"prompts must be non-empty strings"),
        (dict(prompts=["a cat"]), r"embedded prompts must name exactly one digit 0-9, got 'a cat'"),
        (dict(guidance_scale=-1.0), r"guidance_scale must be a finite number >= 0 or None, got -1.0"),
        (dict(guidance_scale=float("nan")), r"guidance_scale must be a finite number >= 0 or None, got nan"),
        (dict(guidance_scale="high"), r"guidance_scale must be a finite number >= 0 or None, got 'high'"),
        (dict(resolution=64), r"resolution must be 32 \(or None\) for the embedded 32x32 digits model, got 64"),
        (dict(size="full", resolution=0), r"resolution must be an int >= 8 or None, got 0"),
        (dict(size="arch", resolution=100), r"resolution must be a multiple of 64 for this U-Net, got 100"),
        (dict(seed=-1), r"seed must be an int in \[0, 9223372036854775807\], got -1"),
        (dict(seed=2**80), r"seed must be an int in \[0, 9223372036854775807\]"),
        (dict(seed="abc"), r"seed must be an int in \[0, 9223372036854775807\], got 'abc'"),
        (dict(num_real_images=1), r"num_real_images must be an int >= 2 or None, got 1"),
        (dict(scheduler="nope"), r"unknown scheduler 'nope'; valid: ddim"),
        (dict(fid="fancy"), r"fid must be 'auto', 'inception', an nn.Module or None, got 'fancy'"),
        (dict(fid=torch.nn.Identity()), r"a custom fid feature module needs an int attribute num_features"),
        (dict(progress=1), r"progress must be True or False, got 1"),
        (dict(size="arch", prompts=["a cat"]), r"prompts= applies to size='embedded' or 'full'; size='arch'"),
        (dict(size="arch", model="x"), r"model= applies to size='full'"),
        (dict(size="arch", clip_model="x"), r"clip_model and fid_real_dir apply to size='full'"),
        (dict(unet_config={}), r"unet_config= applies to size='arch'"),
        (dict(size="arch", unet_config={"layers": 3}), r"sd15 config: unknown UNet2DConditionModel arguments layers"),
        (dict(size="arch", unit="image"), r"unit must be one of call, generation, got 'image'"),
        (dict(size="arch", architecture="sd3", resolution=136), r"multiple of 16 for this transformer's patches"),
    ],
)
def test_every_setting_is_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_task("text_to_image")(**kwargs)


def test_empty_prompts_file_is_an_error(tmp_path):
    (tmp_path / "p.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        get_task("text_to_image")(size="full", prompts=str(tmp_path / "p.txt"))


def test_removed_timing_settings_are_unknown():
    # measure_speed no longer times anything: warmup/repeats are gone, not silently ignored
    for name in ("warmup", "repeats"):
        with pytest.raises(TypeError, match=name):
            get_task("text_to_image")(**{name: 1})


# --- size="arch": SD1.5's architecture at random init ---------------------------------------------------------------

TINY_ARCH = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
    sample_size=8,
)
TINY_ARCH_TASK = dict(size="arch", unet_config=TINY_ARCH, resolution=128, num_inference_steps=10, progress=False,
                      unit="generation")


def test_arch_defaults_follow_the_device():
    cpu = get_task("text_to_image")(size="arch")
    assert (cpu.dtype, cpu.resolution, cpu.num_inference_steps, cpu.batch_size) == ("float32", 512, 50, 1)
    assert cpu.guidance_scale == 7.5 and cpu.default_threads() >= 1
    cuda = get_task("text_to_image")(size="arch", device="cuda")  # (constructing needs no GPU)
    assert (cuda.dtype, cuda.resolution, cuda.num_inference_steps) == ("float16", 512, 50)
    assert cuda.default_threads() is None
    sd3 = get_task("text_to_image")(size="arch", architecture="sd3", device="cuda")
    assert (sd3.resolution, sd3.num_inference_steps, sd3.guidance_scale) == (1024, 28, 7.0)
    assert get_task("text_to_image")(size="arch", architecture="sdxl").resolution == 512  # capped on a CPU


def test_arch_config_is_sd15_unet():
    """The arch workload's U-Net is SD1.5's (built on the meta device: no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    from tokred.tasks.architectures import SD15_SCHEDULER_CONFIG, sd15_unet_config
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5's U-Net
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(blocks) == 16 and blocks[0].attn2.to_k.in_features == 768
    assert unet.conv_in.in_channels == 4 and unet.conv_in.out_channels == 320
    assert SD15_SCHEDULER_CONFIG["beta_schedule"] == "scaled_linear" and SD15_SCHEDULER_CONFIG["steps_offset"] == 1


def test_arch_tiny_generation_speed_only():
    task = get_task("text_to_image")(**TINY_ARCH_TASK)
    task.setup()
    assert type(task.model.scheduler).__name__ == "DDIMScheduler"
    assert task.record_reference() == {} and task.evaluate() == {}
    latents = task.workload()()
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()
    assert torch.equal(task.generate([0]), latents)  # seeded
    info = task.describe()
    assert info["latent_size"] == 16 and info["unet_batch"] == 2 and info["weights"] == "random init (speed only)"
    speed = task.measure_speed(memory=False)
    assert "unet_share" not in speed and speed["unet_gflops"] == pytest.approx(speed["gflops"], rel=0.01)
    with tokred.apply(task.model, "tome", ratio=0.5):
        assert task.measure_speed(memory=False)["unet_gflops"] < speed["unet_gflops"]


TINY_SDXL_ARCH = dict(
    block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
    cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    norm_num_groups=16, layers_per_block=1,
)


def test_arch_sdxl_has_its_conditioning_and_default_level():
    """architecture="sdxl": SDXL's layout (no attention at full resolution) with its text_time conditioning in
    the loop; every method acts at its SDXL default level (2) and the tokens per block go down."""
    task = get_task("text_to_image")(size="arch", architecture="sdxl", unet_config=TINY_SDXL_ARCH, resolution=128,
                                     num_inference_steps=3, progress=False)
    task.setup()
    assert task.describe()["model"].startswith("SDXL base 1.0") and task.model.pooled[0].shape == (32,)
    base = task.generate([0])
    assert base.shape == (1, 4, 16, 16) and torch.isfinite(base).all()
    for method in ("tome", "todo"):  # (CA-ToMe's threshold merges next to nothing on random weights)
        with tokred.apply(task.model, method) as patch:
            out = task.generate([0])
            counts = patch.token_counts()
        assert not torch.equal(out, base), method
        assert any(min(c.attn, c.kv) < c.tokens for c in counts.values()), method
        assert all(c.tokens == 64 for c in counts.values() if min(c.attn, c.kv) < c.tokens), method  # level 2 only
    assert torch.equal(task.generate([0]), base)


def test_arch_settings_are_checked():
    task = get_task("text_to_image")
    with pytest.raises(ValueError, match="unknown architecture 'sd4'; valid: sd15, sd2, sdxl, sd3, sd35, "):
        task(size="arch", architecture="sd4")
    with pytest.raises(ValueError, match="architecture= applies to size='arch' or 'full'"):
        task(size="embedded", architecture="sdxl")


def test_arch_tiny_through_the_harness_every_method():
    """What `tokred run --task text_to_image --size arch` writes, on a tiny U-Net: FLOPs-ideal speedup, measured
    speedup with an interval and efficiency for every method, no quality, CA-ToMe's caveat. (4 steps; CAT with
    t0=2 so that it prunes some of them.)"""
    from tokred.bench.harness import TaskRun, plan_cases

    settings = {**{k: v for k, v in TINY_ARCH_TASK.items() if k != "size"}, "num_inference_steps": 4, "threads": 1}
    run = TaskRun("text_to_image", size="arch", task_kwargs=settings, rounds=2)
    cases = plan_cases("text_to_image", "tome,ca_tome", "ratio0.5,config_3")
    cases += plan_cases("text_to_image", "cat_pruning", options={"t0": 2, "alpha": 0.3}, baseline=False)
    rows = {c.method: run.run_case(c).extra_info for c in cases}
    assert set(rows) == {"baseline", "tome", "ca_tome", "cat_pruning"}
    for info in rows.values():
        assert info["size"] == "arch" and info["quality"] == {} and info["quality_ci"] == {}
        assert info["speedup_ci"][0] <= info["speedup"] <= info["speedup_ci"][1] and info["rounds"] == 2
        assert info["flops_ideal_speedup"] > 0 and info["efficiency"] > 0
        assert any("random weights" in n for n in info["notes"])
        assert info["threads"] == 1
    assert rows["tome"]["flops_ideal_speedup"] > 1.1
    assert rows["cat_pruning"]["flops_ideal_speedup"] > 1.0  # steps 3 and 4 pruned
    assert any("CA-ToMe's merge count depends on trained features" in n for n in rows["ca_tome"]["notes"])
    assert not any("CA-ToMe" in n for n in rows["tome"]["notes"])
