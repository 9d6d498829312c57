"""The denoisers people run (SDXL base's U-Net, SD3-medium's MMDiT; full configurations, random weights): FLOPs
and time of one denoiser call (batch 2, one classifier-free-guidance step) per built-in method at its defaults.

What "one call" is for each method (:func:`prepared`):

* ``baseline``: the unpatched model;
* ``tome``, ``todo``: the first call after ``apply`` (their work is the same at every call);
* ``ca_tome``: the first call, which computes the merge pairs (the later calls of its ``compute_on`` schedule
  reuse them and skip the similarity work); on random weights the merged count says nothing about a trained
  model, so it is reported (``merged``);
* ``cat_pruning``: a *pruned* call, with ``t0=2``: calls 1 (reference) and 2 (clustering) run in full first, call
  3 is counted and timed (every later call prunes alike). With the default ``t0=8`` a generation's first 8 calls
  cost the baseline's.

FLOPs (deterministic; the same on any device; minutes per call on a small CPU at 1024²)::

    python benchmarks/test_models.py --arch sdxl sd3 --resolution 1024 [--dtype float32] [--json out.json]
    python benchmarks/test_models.py --arch flux_dev --resolution 1024 --batch 1 --device meta   # 12B: shapes only

On ``--device meta`` (nothing allocated) CA-ToMe is not counted (its merge count needs values) and CAT's pruned call
is counted with its own block plans on a fixed selection (:func:`meta_cat_pruned_call_flops`). Flux.1 runs one
branch per call (guidance embedded, no CFG): ``--batch 1`` is one image.

Timing (pytest-benchmark; the baseline and the method alternate within each round)::

    pytest benchmarks/test_models.py --benchmark-only --tokred-device=cuda --tokred-dtype=float16 \
        --benchmark-json=results/models.json

``TOKRED_MODELS_RESOLUTION`` sets the timed size (default: 1024 on a GPU, where both models fit 24 GiB in fp16
or fp32 at batch 2; 512 on CPU, where one 1024² SD3 call takes several minutes), ``TOKRED_MODELS_ARCHS`` the
architectures (default ``sdxl,sd3``), ``TOKRED_MODELS_ROUNDS`` the rounds (default 3).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import paired_rounds, timed_call

import tokred
from tokred.flops import count_flops
from tokred.tasks import architectures as A

METHODS = ("tome", "ca_tome", "cat_pruning", "todo")
OPTIONS: dict[str, dict[str, Any]] = {"cat_pruning": {"t0": 2}}  # a pruned call is call 3
PRIMING_CALLS: dict[str, int] = {"cat_pruning": 2}
FAMILY = {"UNet2DConditionModel": "diffusers_unet", "SD3Transformer2DModel": "diffusers_mmdit",
          "FluxTransformer2DModel": "diffusers_flux"}
# On the meta device (no values; a model too large for memory, e.g. Flux.1's 12B parameters) methods whose choices
# read the activations refuse to apply; CAT's pruned call is counted with a fixed selection instead (its FLOPs do
# not depend on which tokens are selected), CA-ToMe's merge count cannot be known.
META_SKIPPED = {"ca_tome": "its merge count is read from the activations (the meta device has no values)"}


def methods_for(arch: A.Architecture) -> list[str]:
    """The methods of :data:`METHODS` that are registered and support this architecture's family."""
    registered = set(tokred.list_methods())
    family = FAMILY.get(arch.model_class) or A.FAMILIES[arch.model_class]  # PixArt, DiT: diffusers_dit
    return [m for m in METHODS if m in registered and family in tokred.get_method(m).options]


@contextlib.contextmanager
def prepared(model: torch.nn.Module, inputs: dict[str, Any], method: str) -> Iterator[Callable[[], Any]]:
    """A call of ``model`` as ``method`` runs it in the steady state described in the module docstring (the
    patch applied and primed); the patch is removed on exit. Calls repeat one timestep, so they all belong to
    one generation."""

    def call() -> Any:
        return model(**inputs)

    if method == "baseline":
        yield call
        return
    patch = tokred.apply(model, method, **OPTIONS.get(method, {}))
    try:
        with torch.no_grad():
            for _ in range(PRIMING_CALLS.get(method, 0)):
                call()
        yield call
    finally:
        patch.remove()


def reduction_info(patch: tokred.Patch | None) -> dict[str, Any]:
    """Mean attention-query and MLP tokens per block call, against the tokens entering, and CA-ToMe's merged
    counts of the last call."""
    if patch is None:
        return {}
    counts = patch.token_counts()
    info: dict[str, Any] = {}
    if counts:
        info["tokens_in"] = sum(c.tokens * c.calls for c in counts.values()) / sum(c.calls for c in counts.values())
        info["attn_tokens"] = sum(c.attn * c.calls for c in counts.values()) / sum(c.calls for c in counts.values())
        info["mlp_tokens"] = sum(c.mlp * c.calls for c in counts.values()) / sum(c.calls for c in counts.values())
    stats = getattr(patch.method_state, "block_stats", None)
    if stats:
        merged = [r for stat in stats.values() for r in stat.r]
        entering = [stat.tokens for stat in stats.values()]
        info["merged"] = {"blocks": len(stats), "mean": statistics.fmean(merged), "min": min(merged),
                          "max": max(merged), "of_tokens": statistics.fmean(entering)}
    return info


def meta_cat_pruned_call_flops(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """GFLOPs of CAT's pruned call on a meta-device model: CAT's own block plans (:class:`CatPolicy`) with the
    caches recorded by a full call and the selection fixed to the first ``int(alpha * N)`` tokens of each sample
    (the k-means and the selection need values; the pruned call's FLOPs do not depend on which tokens it takes)."""
    from tokred.adapters import resolve_adapter
    from tokred.methods.cat_pruning import CatOptions, CatPolicy, CatState
    from tokred.patch import Patch
    from tokred.state import RunState

    options = CatOptions(**OPTIONS["cat_pruning"])
    adapter = resolve_adapter(model)
    state = RunState(method=CatState())
    patch = Patch(adapter, tokred.get_method("cat_pruning")(options), state)
    try:
        adapter.attach(patch)
        policy = CatPolicy(options, state, True, getattr(adapter, "single_blocks", ()))
        # the policy's per-call decisions (which calls record, which prune) are made before each call
        patch.register_forward_pre_hook(adapter.root, lambda module, args, kwargs: policy.before_call(),
                                        with_kwargs=True)
        adapter.install_blocks(patch, policy.plan)
        with torch.no_grad():
            for _ in range(options.t0):  # calls 1..t0: call t0 records the caches
                model(**inputs)
        latent = inputs.get("hidden_states", inputs.get("sample"))
        tokens = latent.shape[1] if latent.ndim == 3 else state.latent_size[0] * state.latent_size[1] // 4
        batch = latent.shape[0]
        st: CatState = state.method
        st.shape, st.sel_step = (batch, tokens, 0), options.t0 + 1
        st.sel = torch.arange(policy.budget(tokens), device=latent.device)[None].expand(batch, -1)
        patch.reset_token_counts()
        start = time.perf_counter()
        flops = count_flops(lambda: model(**inputs))
        return {"gflops": flops / 1e9, "count_seconds": time.perf_counter() - start, **reduction_info(patch),
                "note": "meta device: CAT's pruned-call plans with a fixed selection of int(alpha * N) tokens"}
    finally:
        patch.remove()


def count_call_flops(model: torch.nn.Module, inputs: dict[str, Any], method: str) -> dict[str, Any]:
    """GFLOPs of one call of ``method`` (see :func:`prepared`), with its token counts for that call."""
    if next(model.parameters()).device.type == "meta" and method == "cat_pruning":
        return meta_cat_pruned_call_flops(model, inputs)
    with prepared(model, inputs, method) as call:
        patch = tokred.get_patch(model)
        if patch is not None:
            patch.reset_token_counts()
        start = time.perf_counter()
        flops = count_flops(call)
        seconds = time.perf_counter() - start
        return {"gflops": flops / 1e9, "count_seconds": seconds, **reduction_info(patch)}


def flop_table(name: str, resolution: int, batch: int = 2, dtype: torch.dtype = torch.float32,
               device: str = "cpu", methods: list[str] | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """FLOPs per call of the baseline and every method (or those in ``methods``) on architecture ``name``, and
    their ratios to the baseline."""
    arch = A.get_architecture(name)
    model = A.build(name, device=device, dtype=dtype)
    inputs = arch.inputs(resolution=resolution, batch=batch, device=device, dtype=dtype)
    rows: dict[str, Any] = {}
    for method in ["baseline", *(m for m in methods_for(arch) if methods is None or m in methods)]:
        if device == "meta" and method in META_SKIPPED:
            log(f"{name} {resolution}px batch {batch} {method}: not counted on the meta device: {META_SKIPPED[method]}")
            continue
        rows[method] = count_call_flops(model, inputs, method)
        rows[method]["ratio"] = rows[method]["gflops"] / rows["baseline"]["gflops"]
        log(f"{name} {resolution}px batch {batch} {method}: {json.dumps(rows[method])}")
    return {"arch": name, "model": arch.description, "resolution": resolution, "batch": batch,
            "dtype": str(dtype).removeprefix("torch."), "options": OPTIONS, "calls": rows}


# --- pytest-benchmark -------------------------------------------------------------------------------------------
ROUNDS = int(os.environ.get("TOKRED_MODELS_ROUNDS", "5"))
ARCHS = os.environ.get("TOKRED_MODELS_ARCHS", "sdxl,sd3").split(",")


def _resolution(device: str) -> int:
    value = os.environ.get("TOKRED_MODELS_RESOLUTION")
    return int(value) if value else (1024 if device.startswith("cuda") else 512)


def _setting(request: pytest.FixtureRequest, name: str, default: Any) -> Any:
    try:  # the tokred pytest plugin's options, when it is installed
        return request.config.getoption(name) or default
    except ValueError:
        return default


@pytest.fixture(scope="module", params=ARCHS)
def denoiser(request):
    from tokred.bench.measure import resolve_device, torch_dtype

    device = str(resolve_device(_setting(request, "tokred_device", "cpu")))
    dtype = torch_dtype(_setting(request, "tokred_dtype", "float32"))
    arch = A.get_architecture(request.param)
    model = A.build(arch.name, device=device, dtype=dtype)
    inputs = arch.inputs(resolution=_resolution(device), batch=2, device=device, dtype=dtype)
    yield arch, model, inputs, device
    del model


@pytest.mark.parametrize("method", METHODS)
def test_denoiser_call(benchmark, denoiser, method):
    """Paired rounds (:func:`conftest.paired_rounds`): each round times one baseline call (unpatched) and one call
    of the method as :func:`prepared` defines it (applied and primed afresh every round, removed after), in
    rotating order; the warm-up round is dropped."""
    arch, model, inputs, device = denoiser
    if method not in methods_for(arch):
        pytest.skip(f"{method} is not registered or does not support {arch.name}")

    def variant(name: str) -> Callable[[], float]:
        def run() -> float:
            with prepared(model, inputs, name) as call:
                return timed_call(call)

        return run

    paired_rounds(benchmark, {"baseline": variant("baseline"), method: variant(method)}, rounds=ROUNDS)
    benchmark.extra_info.update(
        model=f"{arch.description} config, random init",
        resolution=_resolution(device),
        batch=2,
        method=method,
        options=OPTIONS.get(method, {}),
        device=device,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="FLOPs per denoiser call of each method (random weights)")
    parser.add_argument("--arch", nargs="+", default=["sdxl", "sd3"], choices=list(A.ARCHITECTURES))
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all)")
    parser.add_argument("--json", default=None, help="write the table here (atomically)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tables = []
    for name in args.arch:
        tables.append(flop_table(name, args.resolution, args.batch, dtype, args.device, args.methods))
        if args.json:
            tmp = f"{args.json}.tmp"
            with open(tmp, "w") as f:
                json.dump(tables, f, indent=1)
            os.replace(tmp, args.json)
    for table in tables:
        print(f"\n{table['model']}, {table['resolution']}px, batch {table['batch']}, {table['dtype']}")
        for method, row in table["calls"].items():
            extra = f"  merged {row['merged']}" if "merged" in row else ""
            print(f"  {method:12s} {row['gflops']:10.1f} GFLOPs  x{row['ratio']:.3f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
