"""Typed workloads (issue 15): every architecture of the table as a random-init workload on a tiny configuration,
one denoiser call as the timed unit (a stateful call: the patch paused, not removed, for the baseline), resolution
sweeps (one case per resolution), SD3 through the arch and full workloads end to end, and Patch.pause()."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_sd_unet
from tiny_sd3 import tiny_sd3_pipeline, tiny_sd3_transformer

import tokred
from tokred.bench.harness import TaskRun, expand_sweeps, plan_cases
from tokred.bench.task import get_task
from tokred.tasks import architectures as A
from tokred.tasks.diffusion_workloads import WORKLOADS

METHODS = ("tome", "ca_tome", "cat_pruning", "todo")

# tiny configurations of each architecture's denoiser class, overriding the real configuration's widths
TINY_UNET = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=4, norm_num_groups=8, sample_size=8)
TINY = {
    "sd15": TINY_UNET,
    "sd2": {**TINY_UNET, "attention_head_dim": (2, 4)},
    "sdxl": dict(block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
                 cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                 norm_num_groups=16, layers_per_block=1),
    "sd3": dict(sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16),
    "sd35": dict(sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                 caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16,
                 dual_attention_layers=(0,)),
    "flux_dev": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
    "flux_schnell": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
}
TINY_PIXART = dict(sample_size=8, num_layers=2, attention_head_dim=12, num_attention_heads=2, cross_attention_dim=24,
                   caption_channels=32)
TINY.update({
    "pixart_alpha": TINY_PIXART,
    "pixart_sigma": TINY_PIXART,
    "dit_xl2": dict(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2),
})
RESOLUTION = {"sd15": 128, "sd2": 128, "sdxl": 256, "sd3": 128, "sd35": 128, "pixart_alpha": 64, "pixart_sigma": 64,
              "dit_xl2": 64, "flux_dev": 128, "flux_schnell": 128}


def latent_shape(name: str, side: int) -> tuple[int, ...]:
    """The trailing shape of a latent (or noise prediction) ``side`` wide: a map, or Flux's 2x2-packed tokens."""
    if A.ARCHITECTURES[name].family == "diffusers_flux":
        return ((side // 2) ** 2, 64)
    return (side, side)


def test_the_table_has_every_denoiser_family():
    assert list(A.ARCHITECTURES) == ["sd15", "sd2", "sdxl", "sd3", "sd35", "pixart_alpha", "pixart_sigma", "dit_xl2",
                                     "flux_dev", "flux_schnell"]
    assert {a.family for a in A.ARCHITECTURES.values()} == {"diffusers_unet", "diffusers_mmdit", "diffusers_dit",
                                                           "diffusers_flux"}
    assert set(WORKLOADS) == {"embedded", "arch", "full"}
    assert A.ARCHITECTURES["sd3"].pipeline_class == "StableDiffusion3Pipeline"


@pytest.mark.parametrize("name", list(A.ARCHITECTURES))
def test_arch_workload_builds_and_runs_one_denoiser_call(name):
    """Each architecture's workload on a tiny configuration: its denoiser class and family, its conditioning in a
    real sampler loop, one denoiser call as the timed unit, and a whole generation."""
    task = get_task("text_to_image")(size="arch", architecture=name, config=TINY[name], resolution=RESOLUTION[name],
                                     num_inference_steps=3, progress=False)
    assert get_task("text_to_image").family_for("arch", {"architecture": name}) == A.ARCHITECTURES[name].family
    task.setup()
    assert type(task.work.denoiser()).__name__ == A.ARCHITECTURES[name].model_class
    call = task.workload()
    assert call.unit == "denoiser call" and call.stateful
    call.start(0)
    eps = call()
    side = RESOLUTION[name] // 8
    assert eps.shape[-2:] == latent_shape(name, side) and torch.isfinite(eps).all()
    call.advance()
    assert call.run.index == 1
    info = task.describe()
    # one image, both CFG branches; Flux embeds its guidance (dev) or has none (schnell): one branch
    branches = 1 if A.ARCHITECTURES[name].family == "diffusers_flux" else 2
    assert info["architecture"] == name and info["denoiser_batch"] == branches
    latents = task.generate([0])
    assert latents.shape[-2:] == latent_shape(name, side) and torch.isfinite(latents).all()


def test_foreign_settings_name_the_workload_that_takes_them():
    with pytest.raises(ValueError, match="config= applies to size='arch'"):
        get_task("text_to_image")(size="full", config={})
    with pytest.raises(ValueError, match="unit= applies to size='arch'"):
        get_task("text_to_image")(size="embedded", unit="call")


def test_resolution_list_gives_one_run_per_resolution():
    runs = expand_sweeps("text_to_image", {"resolution": (64, 128), "architecture": "sd15,sd3"})
    assert [v for v, _ in runs] == ["sd15-64", "sd15-128", "sd3-64", "sd3-128"]
    assert runs[3][1] == {"resolution": 128, "architecture": "sd3"}
    assert expand_sweeps("text_to_image", {"resolution": 64}) == [("", {"resolution": 64})]
    assert expand_sweeps("vit_classification", {"batch_size": 8}) == [("", {"batch_size": 8})]


def test_cli_resolution_sweep_writes_one_case_per_resolution(tmp_path):
    """`tokred run --set resolution=64,128`: each method at each resolution, in one results file, each benchmark
    saying its resolution and the unit that was timed."""
    import json

    from tokred.bench.cli import main

    out = tmp_path / "sweep.json"
    code = main(["run", "--task", "text_to_image", "--size", "arch", "--methods", "tome", "--presets", "default",
                 "--set", f"config={TINY_UNET!r}", "--set", "resolution=64,128", "--set", "threads=1",
                 "--rounds", "2", "--out", str(out)])
    assert code == 0
    rows = [b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]]
    assert sorted((r["method"], r["resolution"]) for r in rows) == [
        ("baseline", 64), ("baseline", 128), ("tome", 64), ("tome", 128)]
    assert {r["unit"] for r in rows} == {"denoiser call"} and {r["architecture"] for r in rows} == {"sd15"}
    assert all(r["rounds"] == 2 for r in rows)


def test_sd3_arch_through_the_harness_every_method():
    """The SD3 path end to end: the arch workload's denoiser calls, every diffusion method planned for the MMDiT
    family, CAT pruning's timed calls pruned (its t0 warm-up calls run untimed first)."""
    settings = {"architecture": "sd3", "config": TINY["sd3"], "resolution": 128, "num_inference_steps": 8,
                "threads": 1}
    run = TaskRun("text_to_image", size="arch", task_kwargs=settings, rounds=2)
    run.build()
    assert run.family == "diffusers_mmdit"
    cases = plan_cases("text_to_image", ",".join(METHODS), "default", family=run.family)
    cases = [c if c.method != "cat_pruning" else type(c)(c.task, c.method, c.preset, {"t0": 2}) for c in cases]
    rows = {c.method: run.run_case(c).extra_info for c in cases}
    assert set(rows) == {"baseline", *METHODS}
    for method, info in rows.items():
        assert info["unit"] == "denoiser call" and info["architecture"] == "sd3" and info["resolution"] == 128
        assert info["speedup_ci"][0] <= info["speedup"] <= info["speedup_ci"][1], method
    cat = rows["cat_pruning"]
    assert cat["flops_ideal_speedup"] > 1.05  # the counted call prunes (the tiny model: text tokens stay)
    assert all(c["attn"] < c["tokens"] for c in cat["tokens"].values())
    assert rows["tome"]["flops_ideal_speedup"] > 1.0 and rows["todo"]["flops_ideal_speedup"] > 1.0
    assert any("CA-ToMe's merge count" in n for n in rows["ca_tome"]["notes"])


def test_sd3_full_loads_its_pipeline_from_pretrained(tmp_path):
    """--size full --set architecture=sd3: StableDiffusion3Pipeline.from_pretrained on a tiny pipeline saved here
    (the real loading path, offline), generating images that ToMe changes and remove() restores."""
    tiny_sd3_pipeline().save_pretrained(str(tmp_path / "sd3"))
    task = get_task("text_to_image")(size="full", architecture="sd3", model=str(tmp_path / "sd3"), num_images=2,
                                     batch_size=1, num_inference_steps=2, progress=False, fid=None)
    task.setup()
    assert type(task.model).__name__ == "StableDiffusion3Pipeline" and task.resolution == 32
    assert task.workload().unit == "generation of 1 image (2 steps)"
    base = task.generate([0])
    assert base.dtype == torch.uint8 and base.shape == (1, 3, 32, 32)
    with tokred.apply(task.model, "tome", ratio=0.5):
        assert not torch.equal(task.generate([0]), base)
    assert torch.equal(task.generate([0]), base)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["unet", "mmdit"])
def test_paused_patch_computes_as_unpatched_and_keeps_its_state(method, family):
    """patch.pause(): the model's output equals the unpatched model's exactly; the method's step count and state
    stay as they were, and the method acts again after resume()."""
    if family == "unet":
        model = tiny_sd_unet()
        x = torch.randn(2, 4, 16, 16)
        kwargs = {"encoder_hidden_states": torch.randn(2, 77, model.config.cross_attention_dim)}

        def call(t):
            return model(x, t, **kwargs).sample
    else:
        model = tiny_sd3_transformer()
        x = torch.randn(2, 16, 16, 16)
        kwargs = {"encoder_hidden_states": torch.randn(2, 10, 64), "pooled_projections": torch.randn(2, 64)}

        def call(t):
            return model(hidden_states=x, timestep=torch.full((2,), float(t)), **kwargs).sample

    with torch.no_grad():
        base = call(900)
        options = {"t0": 2, "alpha": 0.5} if method == "cat_pruning" else {}
        options.update({"threshold": 0.0} if method == "ca_tome" else {})
        patch = tokred.apply(model, method, **options)
        first = call(900)
        step = patch.state.step
        with patch.paused():
            assert torch.equal(call(900), base)
            assert patch.is_paused and tokred.get_patch(model) is patch
        assert patch.state.step == step  # paused calls are not steps
        reduced = call(800)
        assert patch.state.step == step + 1
        if method == "cat_pruning":  # calls 1-2 (t0) are full; call 3 prunes, with the caches of calls 1-2
            reduced = call(700)
            assert not torch.equal(reduced, call_unpatched(patch, call, 700))
        else:
            assert not torch.equal(first, base)
        patch.remove()
        with pytest.raises(tokred.TokredError, match="was removed"):
            patch.pause()
        assert torch.equal(call(900), base)


def call_unpatched(patch, call, t):
    with patch.paused():
        return call(t)


def test_tokred_02_arch_names_still_work_deprecated():
    """tasks/arch.py of tokred 0.2 was merged into the architecture table; its names keep working for one minor
    version, each with a DeprecationWarning naming the replacement."""
    from tokred.tasks import arch

    with pytest.warns(DeprecationWarning, match="use tokred.tasks.architectures.config_with"):
        config = arch.sd15_unet_config({"cross_attention_dim": 32})
    assert config == A.config_with("sd15", {"cross_attention_dim": 32})
    with pytest.warns(DeprecationWarning, match="RandomInitPipeline"):
        pipe = arch.ArchDiffusion(A.build_unet(A.config_with("sd15", TINY_UNET)), A.sd15_scheduler())
    latents = pipe([0], 2, 7.5, 16)
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()
    with pytest.warns(DeprecationWarning):
        assert arch.latent_multiple(A.sd15_unet_config()) == 8 and arch.VIT_ARCH_MODELS == A.VIT_ARCH_MODELS
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        arch.nope  # noqa: B018
