"""The vit_classification task: tiny timm ViT on an ImageFolder (the real data path), the embedded digits ViT,
errors, and ToMe applied through the task."""

from __future__ import annotations

import pytest
import torch

import tokred
from tokred.bench.task import get_task, list_tasks
from tokred.errors import UnsupportedModelError

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2, num_classes=3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread, and much faster on a shared machine (no OpenMP spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _embedded_available() -> bool:
    try:
        from tokred.tasks.embedded.vit import DEFAULT_WEIGHTS
    except ImportError:
        return False
    return DEFAULT_WEIGHTS.is_file()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    gen = torch.Generator().manual_seed(0)
    for c in range(3):
        (root / f"class{c}").mkdir()
        for i in range(4):
            pixels = torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / f"class{c}" / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_task(image_folder):
    task = get_task("vit_classification")(
        size="full",
        model="vit_tiny_patch16_224",
        pretrained=False,
        model_kwargs=TINY,
        data_dir=str(image_folder),
        batch_size=5,
        progress=False,
    )
    task.setup()
    return task


def test_registered_with_metric_directions():
    assert "vit_classification" in list_tasks()
    cls = get_task("vit_classification")
    assert cls.family == "timm_vit"
    better = {m.name: m.better for m in cls.metrics}
    assert better["top1"] == "higher" and better["agreement"] == "higher"
    assert better["gflops"] == "lower" and better["throughput_per_s"] == "higher" and better["latency_ms"] == "lower"


def test_tiny_vit_on_image_folder(tiny_task):
    assert tiny_task.input_size == (3, 32, 32)  # the model's own size, not its pretrained config's 224
    assert len(tiny_task.dataset) == 12
    base = tiny_task.record_reference()
    assert tiny_task.reference.shape == (12,)
    assert set(base) == {"top1", "top5"}  # the unreduced model's quality, without agreement with itself
    result = tiny_task.evaluate()
    assert result.n == {"top1": 12, "top5": 12, "agreement": 12}
    assert 0 <= result["top1"] <= result["top5"] == 100.0  # 3 classes: top-5 always hits
    assert result["agreement"] == 100.0 and result["top1"] == base["top1"]
    # Wilson intervals: 12/12 hits -> [75.75%, 100%]
    assert result.ci["top5"] == pytest.approx((75.75, 100.0), abs=0.01)
    lo, hi = result.ci["top1"]
    assert lo <= result["top1"] <= hi
    info = tiny_task.describe()
    assert info["model"] == "vit_tiny_patch16_224" and info["batch_size"] == 5 and "ImageFolder" in info["data"]


def test_tome_through_task_lowers_flops_and_remove_restores(tiny_task):
    tiny_task.record_reference()
    base = tiny_task.measure_speed(memory=False)
    assert set(base) == {"gflops", "batch_size"}  # no wall time: the harness times the workload
    patch = tokred.apply(tiny_task.model, "tome", r=4)
    try:
        reduced = tiny_task.measure_speed(memory=False)
        assert reduced["gflops"] < base["gflops"]
        tiny_task.evaluate()  # runs with the patch
    finally:
        patch.remove()
    assert tiny_task.measure_speed(memory=False)["gflops"] == pytest.approx(base["gflops"])
    assert tiny_task.evaluate()["agreement"] == 100.0


def test_peak_memory_and_workload(tiny_task):
    speed = tiny_task.measure_speed(flops=False)
    assert speed["peak_mem_mb"] > 0
    both = tiny_task.measure_speed()  # one call for both
    assert both["gflops"] > 0 and both["peak_mem_mb"] > 0
    out = tiny_task.workload()()
    assert out.shape == (5, 3)


def test_num_images_subset(image_folder):
    task = get_task("vit_classification")(
        size="full",
        model="vit_tiny_patch16_224",
        pretrained=False,
        model_kwargs=TINY,
        data_dir=str(image_folder),
        num_images=4,
        progress=False,
    )
    task.setup()
    assert [task.dataset.dataset.targets[i] for i in task.dataset.indices] == [0, 0, 1, 2]  # evenly spaced


def test_speed_without_data_but_evaluate_explains():
    task = get_task("vit_classification")(
        size="full", model="vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, batch_size=2, progress=False
    )
    task.setup()
    assert task.measure_speed(memory=False)["gflops"] > 0
    with pytest.raises(FileNotFoundError, match="data_dir"):
        task.evaluate()


def test_unsupported_family_names_the_supported_one():
    task = get_task("vit_classification")(size="full", model="resnet18", pretrained=False)
    with pytest.raises(UnsupportedModelError, match="timm_vit"):
        task.setup()


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown timm model"):
        get_task("vit_classification")(size="full", model="no_such_vit_xyz", pretrained=False).setup()


def test_missing_data_folder(tmp_path):
    task = get_task("vit_classification")(
        size="full",
        model="vit_tiny_patch16_224",
        pretrained=False,
        model_kwargs=TINY,
        data_dir=str(tmp_path / "missing"),
    )
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        task.setup()


def test_class_count_mismatch(image_folder):
    task = get_task("vit_classification")(
        size="full",
        model="vit_tiny_patch16_224",
        pretrained=False,
        model_kwargs={**TINY, "num_classes": 5},
        data_dir=str(image_folder),
    )
    with pytest.raises(ValueError, match="3 class folders"):
        task.setup()


def test_missing_checkpoint(tmp_path):
    task = get_task("vit_classification")(
        size="full", model="vit_tiny_patch16_224", checkpoint=str(tmp_path / "nope.pth"), model_kwargs=TINY
    )
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        task.setup()


def test_local_checkpoint_is_loaded(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    task = get_task("vit_classification")(
        size="full", model="vit_tiny_patch16_224", checkpoint=str(tmp_path / "w.safetensors"), model_kwargs=TINY
    )
    task.setup()
    assert torch.equal(task.model.pos_embed, source.pos_embed)


def test_missing_pretrained_weights_offline_names_the_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    task = get_task("vit_classification")(size="full", model="vit_tiny_patch16_224", pretrained=True)
    with pytest.raises(FileNotFoundError, match="Hugging Face cache") as info:
        task.setup()
    assert str(tmp_path) in str(info.value) and "checkpoint=" in str(info.value)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="model= applies to size='arch' or 'full'; size='embedded'"):
        get_task("vit_classification")(size="embedded", model="vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="dtype"):
        get_task("vit_classification")(dtype="float64")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # each of these was silently replaced by a default (`x or default`) or accepted before
        (dict(batch_size=0), r"batch_size must be an int >= 1 or None, got 0"),
        (dict(batch_size=-2), r"batch_size must be an int >= 1 or None, got -2"),
        (dict(batch_size=2.5), r"batch_size must be an int >= 1 or None, got 2.5"),
        (dict(num_images=0), r"num_images must be an int >= 1 or None, got 0"),
        (dict(num_images=True), r"num_images must be an int >= 1 or None, got True"),
        (dict(num_workers=-1), r"num_workers must be an int >= 0, got -1"),
        (dict(progress="yes"), r"progress must be True or False, got 'yes'"),
        (dict(size="full", pretrained="no"), r"pretrained must be True or False, got 'no'"),
        (dict(size="full", model_kwargs=[1]), r"model_kwargs must be a dict"),
        (dict(size="full", model=3), r"model must be a string or None, got 3"),
        (dict(size="arch", pretrained=True), r"pretrained= applies to size='full'; size='arch' \(.*random init"),
        (dict(size="arch", data_dir="x"), r"data_dir= applies to size='full'; size='arch' \(.*random init"),
        (dict(size="embedded", pretrained=False), r"pretrained= applies to size='full'; size='embedded' \(the digits"),
        (dict(size="embedded", model_kwargs={}), r"model_kwargs= applies to size='arch' or 'full'; size='embedded'"),
        (dict(size="huge"), r"unknown size 'huge' for vit_classification; valid sizes: embedded, arch, full"),
    ],
)
def test_every_setting_is_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_task("vit_classification")(**kwargs)


def test_removed_timing_settings_are_unknown():
    # measure_speed no longer times anything: warmup/repeats are gone, not silently ignored
    with pytest.raises(TypeError, match="repeats"):
        get_task("vit_classification")(repeats=3)


def test_arch_size_random_vit_speed_only():
    task = get_task("vit_classification")(size="arch", model="vit_tiny_patch16_224", model_kwargs=TINY,
                                          progress=False)  # fmt: skip
    assert task.batch_size == 8 and not task.pretrained and task.default_threads() >= 1
    task.setup()
    assert task.record_reference() == {} and task.evaluate() == {}
    assert task.workload()().shape == (8, 3)
    assert task.measure_speed(memory=False)["gflops"] > 0
    info = task.describe()
    assert info["weights"] == "random init (speed only)" and info["data"] == "random images (speed only)"


@pytest.mark.parametrize(
    "name, params_m, width, heads",
    [("deit_small_patch16_224", 22.05, 384, 6), ("vit_base_patch16_224", 86.57, 768, 12)],
)
def test_arch_models_are_the_real_deit_s_and_vit_b(name, params_m, width, heads):
    """The arch workload's ViTs are timm's DeiT-S and ViT-B (built on the meta device: no memory, no weights)."""
    import timm

    from tokred.tasks.classification_workloads import VIT_ARCH_MODELS

    assert name in VIT_ARCH_MODELS
    assert get_task("vit_classification")(size="arch").model_name == "deit_small_patch16_224"
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)
    assert model.embed_dim == width and len(model.blocks) == 12 and model.blocks[0].attn.num_heads == heads
    assert model.patch_embed.num_patches == 196


@pytest.mark.skipif(not _embedded_available(), reason="embedded digits ViT not built yet")
def test_embedded_digits_vit_accuracy_and_tome():
    task = get_task("vit_classification")(size="embedded", progress=False)
    assert task.default_threads() == 1
    task.setup()
    task.record_reference()
    base = task.evaluate()
    assert base["top1"] >= 95.0, base
    assert base["agreement"] == 100.0
    speed = task.measure_speed(memory=False)
    with tokred.apply(task.model, "tome", r=4):
        reduced = task.evaluate()
        reduced_speed = task.measure_speed(memory=False)
    assert reduced_speed["gflops"] < speed["gflops"]
    assert reduced["top1"] >= 90.0 and reduced["agreement"] >= 90.0, reduced
    assert task.describe()["data"].startswith("scikit-learn digits")


# --- workloads (tokred.tasks.classification_workloads) ---------------------------------------------------------


def test_workloads_table_and_profiles():
    from tokred.tasks.classification_workloads import EmbeddedDigitsViT, PretrainedViT, RandomInitViT

    cls = get_task("vit_classification")
    assert cls.workloads == {"embedded": EmbeddedDigitsViT, "arch": RandomInitViT, "full": PretrainedViT}
    assert cls.sizes() == ("embedded", "arch", "full")
    assert cls.profile("embedded", "quick")["task"] == {"num_images": 120}
    assert cls.profile("embedded", "quick")["budget_s"] == 2.0
    assert cls.profile("embedded", "default") == {"budget_s": 10.0, "max_rounds": 100, "processes": 3,
                                                  "min_time_s": 4.0, "task": {}}
    assert cls.profile("arch", "default")["budget_s"] == 30.0
    assert cls.profile("arch", "quick") == {"budget_s": 5.0, "max_rounds": 10, "task": {}}
    assert cls.profile("full", "default") == {"task": {}} and cls.profile("full", "quick") == {"task": {}}
    assert [w.random_weights for w in cls.workloads.values()] == [False, True, False]
    assert [w.default_threads("cpu") >= 1 for w in cls.workloads.values()] == [True, True, True]
    assert EmbeddedDigitsViT.default_threads("cpu") == 1


def test_foreign_setting_names_the_size_that_takes_it():
    with pytest.raises(ValueError, match=r"data_dir= applies to size='full'; size='arch'") as info:
        get_task("vit_classification")(size="arch", data_dir="/data/imagenet/val")
    assert "does not take it" in str(info.value)
    with pytest.raises(ValueError, match=r"checkpoint= applies to size='full'; size='embedded'"):
        get_task("vit_classification")(checkpoint="w.pth")
    with pytest.raises(ValueError, match=r"model= applies to size='arch' or 'full'"):
        get_task("vit_classification")(model="vit_tiny_patch16_224")
    # arch is random init: pretrained=False is what it does anyway, so it is accepted
    task = get_task("vit_classification")(size="arch", pretrained=False)
    assert not task.pretrained and task.random_weights


def test_random_init_workload_builds_tiny_and_times_a_batch():
    from tokred.tasks.classification_workloads import RandomInitViT

    spec = RandomInitViT(model="vit_tiny_patch16_224", model_kwargs=TINY)
    model = spec.build(torch.device("cpu"), torch.float32)
    assert spec.input_size == (3, 32, 32) and spec.dataset() is None
    assert spec.timing_batch(None, 3).shape == (3, 3, 32, 32)
    assert model(spec.timing_batch(None, 3)).shape == (3, 3)
    assert spec.describe() == {"model": "vit_tiny_patch16_224", "weights": "random init (speed only)",
                               "data": "random images (speed only)"}  # fmt: skip
    assert RandomInitViT.default_batch_size("cpu") == 8 and RandomInitViT.default_batch_size("cuda:0") == 32

    task = get_task("vit_classification")(size="arch", model="vit_tiny_patch16_224", model_kwargs=TINY,
                                          batch_size=2, progress=False)  # fmt: skip
    assert task.notes() == [RandomInitViT.note] and "no quality" in task.notes()[0]
    task.setup()
    call = task.workload()
    assert call.unit == "batch of 2 images" and call().shape == (2, 3)


def test_pretrained_workload_builds_tiny_and_times_a_batch(tiny_task, image_folder):
    from tokred.tasks.classification_workloads import PretrainedViT

    spec = PretrainedViT(model="vit_tiny_patch16_224", model_kwargs=TINY, pretrained=False,
                         data_dir=str(image_folder))  # fmt: skip
    spec.build(torch.device("cpu"), torch.float32)
    data = spec.dataset()
    assert len(data) == 12 and spec.timing_batch(data, 5).shape == (5, 3, 32, 32)
    assert spec.describe()["data"] == f"ImageFolder {image_folder}" and spec.describe()["weights"].startswith("random")
    assert tiny_task.notes() == [] and not tiny_task.random_weights
    call = tiny_task.workload()
    assert call.unit == "batch of 5 images" and call().shape == (5, 3)


@pytest.mark.skipif(not _embedded_available(), reason="embedded digits ViT not built yet")
def test_embedded_workload_builds_and_times_a_batch():
    from tokred.tasks.classification_workloads import EmbeddedDigitsViT

    spec = EmbeddedDigitsViT()
    spec.build(torch.device("cpu"), torch.float32)
    assert spec.input_size is not None and len(spec.dataset()) > 100
    assert EmbeddedDigitsViT.default_batch_size("cpu") == 64
    task = get_task("vit_classification")(batch_size=4, progress=False)
    assert task.notes() == [] and task.describe()["weights"].startswith("embedded")
    task.setup()
    call = task.workload()
    assert call.unit == "batch of 4 images" and call().shape[0] == 4
