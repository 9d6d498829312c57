"""FLOPs per denoiser call of PixArt-Σ / PixArt-α / DiT-XL/2 (random weights), baseline and every method at its
defaults, and CAT pruning's MACs per generation at the paper's settings. Deterministic: counts, not timings.

    python benchmarks/dit_flops.py                          # PixArt-Σ at 1024 px, DiT-XL/2 at 256 px
    python benchmarks/dit_flops.py --arch pixart_sigma --resolution 512

A full-depth model at 1024 px is slow to evaluate on a CPU, and CAT pruning and CA-ToMe need real values (their
choices read the activations), so the meta device is no option for them. Every block of these models has the same
shapes and every method reduces every block alike (ToMe: ``int(ratio * N)`` tokens; ToDo: the downsampled grid;
CAT: ``int(alpha * N)`` recomputed tokens; CA-ToMe: what its threshold finds, block by block), so the script counts
the architecture with 1 and 2 blocks and extrapolates linearly to the real depth: ``F(L) = F(1) + (L - 1) * (F(2) -
F(1))``, exact for ToMe, ToDo and CAT (CA-ToMe's second block stands for every later one). Counts are per image
(batch 1); a classifier-free-guidance call (batch 2) is twice that. CAT's pruned call is counted after ``t0=2`` full
calls (its cost does not depend on ``t0``); per generation, ``t0`` calls are full and the rest pruned.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import tokred
from tokred.flops import count_flops
from tokred.tasks import architectures as A

METHODS: dict[str, dict[str, Any]] = {  # every diffusers_dit method at its defaults (CAT: t0=2 to reach a pruned call)
    "tome": {},
    "ca_tome": {},
    "todo": {},
    "cat_pruning": {"t0": 2},
}
TIMESTEPS = (900, 800, 700)


def counts(arch: str, resolution: int, layers: int) -> dict[str, int]:
    """FLOPs of one denoiser call (batch 1) of ``arch`` cut to ``layers`` blocks: the baseline and each method."""
    spec = A.get_architecture(arch)
    model = A.build_from_config(arch, A.config_with(arch, {"num_layers": layers}))
    inputs = spec.inputs(resolution=resolution, batch=1)

    def call(t: int) -> Any:
        return model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)})

    out = {"baseline": count_flops(lambda: call(TIMESTEPS[0]))}
    for method, options in METHODS.items():
        with tokred.apply(model, method, **options), torch.no_grad():
            for t in TIMESTEPS[:-1] if method == "cat_pruning" else ():
                call(t)  # CAT's full calls: the reference, then the clustering and first selection
            out[method] = count_flops(lambda: call(TIMESTEPS[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=["pixart_sigma", "pixart_alpha", "dit_xl2"], action="append")
    parser.add_argument("--resolution", type=int, help="image side in px (default: the architecture's own)")
    args = parser.parse_args()
    torch.manual_seed(0)
    for arch in args.arch or ["pixart_sigma", "dit_xl2"]:
        spec = A.get_architecture(arch)
        resolution = args.resolution or spec.default_resolution
        depth = int(spec.config()["num_layers"])
        one, two = counts(arch, resolution, 1), counts(arch, resolution, 2)
        full = {k: one[k] + (depth - 1) * (two[k] - one[k]) for k in one}
        base = full["baseline"]
        print(f"\n{spec.description} at {resolution}x{resolution} px ({resolution // 8}x{resolution // 8} latent, "
              f"{depth} blocks): GFLOPs per denoiser call, per image (x2 for a CFG call)")
        for name, flops in full.items():
            print(f"  {name:<12} {flops / 1e9:10.1f}  {flops / base:6.3f} of baseline")
        pruned = full["cat_pruning"] / base
        print("  CAT pruning (t0=8, alpha=0.3), MACs per generation against the baseline:")
        for steps in sorted({spec.default_steps, 28, 50}):
            ratio = (8 + (steps - 8) * pruned) / steps
            print(f"    {steps:>3} steps: {ratio:.3f} of the baseline's MACs ({1 - ratio:.1%} saved)")


if __name__ == "__main__":
    main()
