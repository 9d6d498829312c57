"""The text_to_image task: a tiny Stable Diffusion pipeline saved and loaded back through from_pretrained (the
real loading path), the embedded digits diffusion model, quality metrics, errors, and ToMe through the task."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_clip_tokenizer, tiny_sd_pipeline

import tokred
from tokred.bench.task import get_task
from tokred.tasks.text_to_image import SCHEDULERS, digit_label, imagenet_prompts

FAST = dict(num_images=2, batch_size=2, num_inference_steps=2, progress=False, warmup=0, repeats=1)


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
    sd_task.record_reference()
    base = sd_task.evaluate()
    assert base["psnr"] == 100.0 and base["ssim"] == pytest.approx(1.0)
    speed = sd_task.measure_speed(memory=False)
    assert {"s_per_image", "throughput_per_s", "latency_ms", "unet_share", "gflops", "unet_gflops"} <= speed.keys()
    assert 0 < speed["unet_share"] <= 1 and speed["unet_calls_per_batch"] == 2
    assert 0 < speed["unet_gflops"] < speed["gflops"]
    with tokred.apply(sd_task.model, "tome", ratio=0.5):
        reduced = sd_task.measure_speed(memory=False)
        quality = sd_task.evaluate()
    assert reduced["unet_gflops"] < speed["unet_gflops"] and reduced["gflops"] < speed["gflops"]
    assert quality["psnr"] < 100.0 and quality["ssim"] < 1.0
    assert sd_task.evaluate()["psnr"] == 100.0  # removed: the unreduced images again


def test_peak_memory(sd_task):
    speed = sd_task.measure_speed(flops=False)
    assert speed["peak_mem_mb"] > 0


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
    assert result["fid"] >= 0 and result["num_images"] == 3
    assert task._real_features.shape == (4, 6)


def test_fid_against_reference_without_real_images(sd_dir):
    task = get_task("text_to_image")(size="full", model=sd_dir, fid=_MeanColour(), **FAST)
    task.setup()
    task.record_reference()
    assert task.evaluate()["fid_vs_reference"] == pytest.approx(0.0, abs=1e-6)


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
    assert 0.0 <= result["clip_score"] <= 100.0


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
    base = task.evaluate()
    assert base["class_accuracy"] >= 80.0, base
    assert 0 <= base["fid"] < 50, base  # a random-init model scores about 150 in this space
    task.batch_size = 2  # FLOPs of a 2-image batch: one generation each
    speed = task.measure_speed(timing=False, memory=False)
    with tokred.apply(task.model, "tome", ratio=0.5):
        reduced = task.measure_speed(timing=False, memory=False)
    assert reduced["unet_gflops"] < 0.85 * speed["unet_gflops"]
