"""Scale-out with accelerate: a 2-process CPU launch (torchrun, gloo) of the text_to_image task gives exactly
the images and metrics of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_sd_pipeline

import tokred
from tokred.bench.task import get_task
from tokred.tasks import sharding
from tokred.tasks.embedded.diffusion import DEFAULT_WEIGHTS as DIGITS_DIFFUSION

SETTINGS = dict(num_images=5, batch_size=2, num_inference_steps=2)


def test_single_process_shard_and_gather_are_identity():
    with sharding.shard(range(5)) as mine:
        assert mine == [0, 1, 2, 3, 4]
    assert sharding.gather([1, 2]) == [1, 2]
    assert sharding.num_processes() == 1 and sharding.is_main_process()


def _launch_two(task_args: list[str], tmp_path):
    """Run ``python -m tokred.tasks.sharding`` on 2 CPU processes (torchrun, gloo) with ToMe applied after the
    reference; returns the gathered images and the JSON result written by process 0."""
    images_file, result_file = tmp_path / "images.pt", tmp_path / "result.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "tokred.tasks.sharding", "text_to_image", "--device", "cpu", *task_args, "--set", "progress=False",
        "--reference", "--method", "tome", "--method-option", "ratio=0.5",
        "--save-images", str(images_file), "--out", str(result_file),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(result_file.read_text())
    assert result["num_processes"] == 2
    assert result["metrics_n"] and set(result["metrics_ci"]) <= set(result["metrics"])
    return torch.load(images_file), {**result["metrics"], "n": result["metrics_n"]}


def _one_process(**kwargs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task = get_task("text_to_image")(progress=False, **kwargs)
        task.setup()
        task.record_reference()
        with tokred.apply(task.model, "tome", ratio=0.5):
            return task.generate_images(), task.evaluate()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # ~30 s; the embedded test below covers the same sharding code (and FID) in the default run
def test_two_cpu_processes_match_one(tmp_path):
    """The real StableDiffusionPipeline path (from_pretrained of a saved tiny pipeline), sharded."""
    model_dir = tmp_path / "tiny_sd"
    tiny_sd_pipeline().save_pretrained(str(model_dir))
    args = ["--size", "full", "--set", f"model={model_dir}"]
    sharded_images, sharded = _launch_two([*args, *[f"--set={k}={v}" for k, v in SETTINGS.items()]], tmp_path)
    images, metrics = _one_process(size="full", model=str(model_dir), **SETTINGS)

    assert sharded_images.shape == images.shape == (5, 3, 32, 32)
    assert torch.equal(sharded_images, images)  # each image's seed and batch are its global index's
    assert sharded["n"]["psnr"] == 5 == metrics.n["psnr"]  # every image scored once, on one process or two
    assert sharded["psnr"] == pytest.approx(metrics["psnr"]) and metrics["psnr"] < 100
    assert sharded["ssim"] == pytest.approx(metrics["ssim"])


@pytest.mark.skipif(not DIGITS_DIFFUSION.is_file(), reason="embedded digits diffusion model not built yet")
def test_two_cpu_processes_match_one_embedded_fid(tmp_path):
    """The embedded model adds sharded feature extraction (real and generated) and FID on the gathered features."""
    settings = dict(num_images=5, batch_size=2, num_inference_steps=3)
    sharded_images, sharded = _launch_two(
        ["--size", "embedded", *[f"--set={k}={v}" for k, v in settings.items()]], tmp_path
    )
    images, metrics = _one_process(size="embedded", **settings)
    assert torch.equal(sharded_images, images)
    assert sharded.pop("n") == metrics.n
    assert sharded.keys() == metrics.keys() >= {"fid", "class_accuracy", "psnr", "ssim"}
    for key, value in metrics.items():
        assert sharded[key] == pytest.approx(value, rel=1e-6), key
