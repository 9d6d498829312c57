"""The coverage matrix: every built-in method on every model family, tested the way users call it.

Each family is a tiny configuration of the real class (timm's own architectures with their variant flags;
diffusers' ``UNet2DConditionModel``, ``SD3Transformer2DModel``, ``PixArtTransformer2DModel``,
``DiTTransformer2DModel`` and ``FluxTransformer2DModel`` in each model's layout). Each cell applies the
method at its defaults (CAT pruning with ``t0=2``, first-block cache and pyramid attention broadcast with options
that make them cache in a three-call generation; see :data:`MATRIX_OPTIONS`) and is

* **works** when all four hold: it runs; the same seed gives the same output; the per-block token counts
  (``patch.token_counts()``) show fewer tokens than entered in some sublayer (a cache: a block or attention it
  skipped computed 0 tokens on that call); ``remove()`` gives the baseline
  output bit-exactly and leaves no patched forward behind;
* **refused: <reason>** when ``tokred.apply`` raises a :class:`tokred.TokredError` (the reason is the error's
  first clause), leaves no patch and the output is the baseline's bit-exactly.

Anything else fails its test. The README's ``## Coverage`` table is generated from these cells
(:func:`matrix_markdown`); ``test_readme_matrix_is_current`` fails when it differs. Rewrite it with

    python tests/test_coverage_matrix.py --write    # or TOKRED_WRITE_COVERAGE=1 pytest tests/test_coverage_matrix.py
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tiny model builders, also when run as a script

import tokred  # noqa: E402
from tokred.adapters import resolve_adapter  # noqa: E402
from tokred.errors import TokredError  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- coverage-matrix:start -->", "<!-- coverage-matrix:end -->"
WRITE_ENV = "TOKRED_WRITE_COVERAGE"

# Options the matrix passes on top of the defaults: CAT's default t0=8 computes 8 calls in full before it
# prunes; the matrix's generations have 3 calls, so t0=2 makes the third one pruned. The caches: on these random
# weights the first block's residual changes by 0.3 to 0.5 between calls on SD3 and Flux (less on PixArt and DiT;
# trained models: far less), and the broadcast's default window (100, 800) holds only the third call, which its
# skip range 2 computes.
MATRIX_OPTIONS: dict[str, dict[str, Any]] = {
    "cat_pruning": {"t0": 2},
    "first_block_cache": {"threshold": 0.5},
    "pab": {"spatial_attention_timestep_skip_range": (0, 1000)},
}
TIMESTEPS = (900, 800, 700)  # one short generation: the timestep rising again starts the next one


# --- families ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One row of the matrix: ``build()`` the tiny model, ``run(model)`` its output for fixed inputs (one
    forward for a ViT, one short generation of denoiser calls for a diffusion model)."""

    group: str
    name: str
    config: str  # what the tiny model is a configuration of, for the table
    build: Callable[[], torch.nn.Module]
    run: Callable[[torch.nn.Module], torch.Tensor]


def vit_family(name: str, arch: str) -> Family:
    def build() -> torch.nn.Module:
        from tiny_models import tiny_timm_vit

        return tiny_timm_vit(arch)

    def run(model: torch.nn.Module) -> torch.Tensor:
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return model(x)

    return Family("timm ViT", name, f"`{arch}`", build, run)


def smooth_latents(batch: int, channels: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Random latents with spatial structure, as an image's latents have (neighbouring tokens alike), so
    similarity-driven methods see something to merge; white noise alone would make every token unlike its
    neighbours."""
    coarse = torch.randn(batch, channels, size // 4, size // 4, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear") + 0.1 * torch.randn(
        batch, channels, size, size, generator=g
    )


def unet_family(name: str, config: str, builder: str, latent: int, text_width: int, sdxl: bool = False) -> Family:
    def build() -> torch.nn.Module:
        import tiny_models
        import tiny_sdxl

        return getattr(tiny_sdxl if sdxl else tiny_models, builder)()

    def run(model: torch.nn.Module) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        sample = smooth_latents(2, 4, latent, g)
        kwargs: dict[str, Any] = {"encoder_hidden_states": torch.randn(2, 77, text_width, generator=g)}
        if sdxl:
            from tiny_sdxl import sdxl_added_cond

            kwargs["added_cond_kwargs"] = sdxl_added_cond(2, 8 * latent, 8 * latent)
        with torch.no_grad():
            return torch.stack([model(sample + 0.1 * i, t, **kwargs).sample for i, t in enumerate(TIMESTEPS)])

    return Family("U-Net", name, config, build, run)


def mmdit_family(name: str, config: str, builder: str) -> Family:
    def build() -> torch.nn.Module:
        import tiny_sd3

        return getattr(tiny_sd3, builder)()

    def run(model: torch.nn.Module) -> torch.Tensor:
        import tiny_sd3

        g = torch.Generator().manual_seed(0)
        sample = smooth_latents(2, 16, 16, g)
        text, pooled = torch.randn(2, 8, 64, generator=g), torch.randn(2, 64, generator=g)
        return torch.stack(tiny_sd3.sd3_denoise(model, sample, text, pooled, TIMESTEPS))

    return Family("MMDiT", name, config, build, run)


def dit_family(name: str, config: str, model: str) -> Family:
    """PixArt-α / PixArt-Σ (``PixArtTransformer2DModel``, cross-attention to caption tokens) and DiT
    (``DiTTransformer2DModel``, class labels), 16x16 latents on a patch-2 grid."""

    def build() -> torch.nn.Module:
        import tiny_dit

        return tiny_dit.tiny_dit_transformer() if model == "dit" else tiny_dit.tiny_pixart_transformer(
            alpha=model == "alpha"
        )

    def run(model_: torch.nn.Module) -> torch.Tensor:
        import tiny_dit

        g = torch.Generator().manual_seed(0)
        sample = smooth_latents(2, 4, 16, g)
        if model == "dit":
            return torch.stack(tiny_dit.dit_denoise(model_, sample, torch.tensor([1, 1000]), TIMESTEPS))
        text = torch.randn(2, 6, tiny_dit.TEXT_WIDTH, generator=g)
        return torch.stack(tiny_dit.pixart_denoise(model_, sample, text, TIMESTEPS))

    return Family("DiT", name, config, build, run)


def flux_family(name: str, config: str, guidance_embeds: bool) -> Family:
    def build() -> torch.nn.Module:
        from tiny_flux import tiny_flux_transformer

        return tiny_flux_transformer(guidance_embeds=guidance_embeds)

    def run(model: torch.nn.Module) -> torch.Tensor:
        from tiny_flux import flux_denoise

        return torch.stack(flux_denoise(model, timesteps=tuple(t / 1000 for t in TIMESTEPS)))

    return Family("Flux", name, config, build, run)


FAMILIES: list[Family] = [
    vit_family("plain", "vit_small_patch16_224"),
    vit_family("LayerScale (DeiT-3)", "deit3_small_patch16_224"),
    vit_family("distilled (DeiT)", "deit_small_distilled_patch16_224"),
    vit_family("registers + cls (DINOv2-reg)", "vit_small_patch14_reg4_dinov2"),
    vit_family("registers, no cls, avg pool", "vit_betwixt_patch16_reg4_gap_256"),
    vit_family("no cls, MAP pooling (SigLIP)", "vit_base_patch16_siglip_224"),
    vit_family("DINOv2 (LayerScale)", "vit_small_patch14_dinov2"),
    vit_family("CLIP (pre-norm)", "vit_base_patch32_clip_224"),
    unet_family("SD 1.x", "SD1.5 layout", "tiny_sd_unet", latent=8, text_width=32),
    unet_family("SD 2.x", "SD2 layout: linear proj, heads per level", "tiny_sd2_unet", latent=8, text_width=32),
    unet_family("SDXL", "SDXL layout: text_time, 1/1/2 layers", "tiny_sdxl_unet", latent=16, text_width=64, sdxl=True),
    mmdit_family("SD3", "SD3 MMDiT", "tiny_sd3_transformer"),
    mmdit_family("SD3.5", "SD3.5: dual attention, qk rms-norm", "tiny_sd35_transformer"),
    dit_family("PixArt-α", "PixArt-α: ada_norm_single, T5 cross-attention, size conditions", "alpha"),
    dit_family("PixArt-Σ", "PixArt-Σ: ada_norm_single, T5 cross-attention", "sigma"),
    dit_family("DiT-XL/2", "DiT: ada_norm_zero, class labels", "dit"),
    flux_family("Flux.1-dev", "Flux.1: dual + single-stream blocks, RoPE, guidance embedding", True),
    flux_family("Flux.1-schnell", "Flux.1: dual + single-stream blocks, RoPE, no guidance embedding", False),
]


def builtin_methods() -> list[str]:
    """Every method that ships with tokred, and the declared compositions of those (plugins installed beside it are
    not part of the README)."""
    return [n for n in tokred.list_methods()
            if all(m.__module__.startswith("tokred.methods") for m in getattr(tokred.get_method(n), "members", ())
                   or (tokred.get_method(n),))]


# --- one cell ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    status: str  # "works", "refused" or "broken"
    detail: str = ""
    # a working cell's Method.compile_support_for(family), its kind only ("fullgraph", "island", "no"; None: unstated)
    compiles: str | None = None

    def markdown(self) -> str:
        if self.status != "works":
            return f"{self.status}: {self.detail}"
        return f"works (torch.compile: {self.compiles or 'not stated'})"


def tokens_went_down(counts: dict[str, Any]) -> bool:
    """Some block computed one of its sublayers on fewer tokens than entered it."""
    return any(
        min(c.attn, c.kv, c.mlp, c.tokens if c.cross is None else c.cross) < c.tokens for c in counts.values()
    )


def leftover_forwards(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in vars(m)]


def refusal_reason(err: TokredError) -> str:
    """The error's first clause (up to ';'), with the method's name and family prefix dropped."""
    text = str(err).split(";")[0].strip()
    return re.sub(r"\|", "/", text)


def evaluate(family: Family, model: torch.nn.Module, baseline: torch.Tensor, method: str) -> Cell:
    options = MATRIX_OPTIONS.get(method, {})
    try:
        patch = tokred.apply(model, method, **options)
    except TokredError as err:
        problems = []
        if tokred.get_patch(model) is not None or leftover_forwards(model):
            problems.append("a refused apply left a patch behind")
        if not torch.equal(family.run(model), baseline):
            problems.append("a refused apply changed the output")
        if not str(err):
            problems.append("the refusal has no message")
        return Cell("broken", "; ".join(problems)) if problems else Cell("refused", refusal_reason(err))
    problems = []
    support = tokred.get_method(method).compile_support_for(resolve_adapter(model).family)
    try:
        torch.manual_seed(0)
        first = family.run(model)
        counts = patch.token_counts()
        torch.manual_seed(0)
        second = family.run(model)
    except Exception as err:  # a crash is a finding of the matrix, reported as such
        patch.remove()
        return Cell("broken", f"crashed: {type(err).__name__}: {err}")
    patch.remove()
    if not torch.equal(first, second):
        problems.append("not deterministic")
    if not tokens_went_down(counts):
        problems.append("no block reduced its tokens")
    if not torch.equal(family.run(model), baseline) or leftover_forwards(model) or tokred.get_patch(model):
        problems.append("remove() is not exact")
    if problems:
        return Cell("broken", "; ".join(problems))
    return Cell("works", compiles=support.split(":")[0] if support else None)


_MODELS: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
_CELLS: dict[tuple[str, str], Cell] = {}


def model_and_baseline(family: Family) -> tuple[torch.nn.Module, torch.Tensor]:
    if family.name not in _MODELS:
        model = family.build()
        _MODELS[family.name] = (model, family.run(model))
    return _MODELS[family.name]


def cell(family: Family, method: str) -> Cell:
    key = (family.name, method)
    if key not in _CELLS:
        model, baseline = model_and_baseline(family)
        _CELLS[key] = evaluate(family, model, baseline, method)
    return _CELLS[key]


# --- the table -----------------------------------------------------------------------------------------------------
def matrix_markdown(cells: Callable[[Family, str], Cell] = cell) -> str:
    """The README's coverage table: one row per family, one column per built-in method."""
    methods = builtin_methods()
    lines = [
        "| family | variant | tiny configuration of | " + " | ".join(f"`{m}`" for m in methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for family in FAMILIES:
        row = [family.group, family.name, family.config] + [cells(family, m).markdown() for m in methods]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


SECTION = re.compile(re.escape(START) + r"\n(.*?)" + re.escape(END), flags=re.S)


def readme_matrix(text: str) -> str | None:
    """The table between the README's markers (None when the markers are missing)."""
    match = SECTION.search(text)
    return match.group(1).rstrip("\n") if match else None


def write_readme(table: str) -> None:
    text = README.read_text()
    if readme_matrix(text) is None:
        raise SystemExit(f"README.md has no {START} ... {END} section to write the coverage table into")
    README.write_text(SECTION.sub(lambda _: f"{START}\n{table}\n{END}", text, count=1))


# --- tests ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", builtin_methods())
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_cell_works_or_is_refused(family, method):
    result = cell(family, method)
    assert result.status in ("works", "refused"), f"{family.name} x {method}: {result.detail}"


def test_readme_matrix_is_current():
    expected = matrix_markdown()
    if os.environ.get(WRITE_ENV):
        write_readme(expected)
    found = readme_matrix(README.read_text())
    assert found == expected, (
        "README.md's coverage table differs from what the tests find. Regenerate it with "
        f"`python tests/test_coverage_matrix.py --write` (or {WRITE_ENV}=1 pytest tests/test_coverage_matrix.py). "
        f"Expected:\n{expected}"
    )


# --- no silent no-ops: accepted options reduce something, zero strength stays the exact identity ---------------------
def sd1_unet_without_cross_attention():
    import copy

    from tiny_models import tiny_sd_unet

    unet = copy.deepcopy(tiny_sd_unet())
    for module in unet.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            module.attn2 = module.norm2 = None  # BasicTransformerBlock's layout without cross_attention_dim
    return unet


@pytest.mark.parametrize("method", ["tome", "ca_tome"])
@pytest.mark.parametrize(
    "build,options,match",
    [
        ("sd1", {"merge_attn": False}, "merge_attn, merge_crossattn and merge_mlp are False"),
        ("sd3", {"merge_attn": False}, "merge_attn and merge_mlp are False"),
        ("sd1_no_cross", {"merge_attn": False, "merge_crossattn": True}, "none of the selected blocks has cross-att"),
    ],
)
def test_options_that_reduce_nothing_are_refused(build, options, method, match):
    from tiny_models import tiny_sd_unet
    from tiny_sd3 import tiny_sd3_transformer

    model = {"sd1": tiny_sd_unet, "sd3": tiny_sd3_transformer, "sd1_no_cross": sd1_unet_without_cross_attention}[
        build
    ]()
    with pytest.raises(TokredError, match=match):
        tokred.apply(model, method, **options)
    assert tokred.get_patch(model) is None and not leftover_forwards(model)


def test_cross_attention_alone_still_merges_where_blocks_have_it():
    family = next(f for f in FAMILIES if f.name == "SD 1.x")
    model = family.build()
    with tokred.apply(model, "tome", merge_attn=False, merge_crossattn=True) as patch:
        family.run(model)
        assert all(c.cross < c.tokens and c.attn == c.tokens for c in patch.token_counts().values())


def test_vit_schedules_that_round_to_nothing_and_empty_vits_are_refused():
    from tiny_models import tiny_timm_vit

    one_block = tiny_timm_vit("vit_small_patch16_224", depth=1)
    with pytest.raises(TokredError, match=r"r=\(1, 0.5\) rounds down to 0 in every one of the 1 blocks"):
        tokred.apply(one_block, "tome", r=(1, 0.5))
    for zero in (0, [0], (0, -1)):  # zero strength on purpose: the exact identity
        tokred.apply(one_block, "tome", r=zero).remove()
    with pytest.raises(TokredError, match="no blocks"):
        tokred.apply(tiny_timm_vit("vit_small_patch16_224", depth=0), "tome")


ZERO_STRENGTH = {
    "tome": {"ratio": 0.0},
    "ca_tome": {"threshold": 1.0},
    "cat_pruning": {"t0": 2, "alpha": 1.0},
    "todo": {"downsample_factor": 1},
    "deepcache": {"cache_interval": 1},
    "pab": {"spatial_attention_block_skip_range": 1, "spatial_attention_timestep_skip_range": (0, 1000)},
}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.group != "timm ViT"], ids=lambda f: f.name)
def test_zero_strength_options_are_accepted_and_exact(family):
    model, baseline = model_and_baseline(family)
    adapter_family = resolve_adapter(model).family
    for method in builtin_methods():
        options = ZERO_STRENGTH.get(method)
        if options is None or adapter_family not in tokred.get_method(method).options:
            continue
        with tokred.apply(model, method, **options):
            torch.manual_seed(0)
            assert torch.equal(family.run(model), baseline), method


if __name__ == "__main__":
    torch.set_num_threads(1)  # as tests/conftest.py: the tiny models are overhead-bound
    table = matrix_markdown()
    if "--write" in sys.argv[1:]:
        write_readme(table)
    print(table)
