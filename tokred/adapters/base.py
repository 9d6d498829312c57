"""What every model-family adapter provides, and the denoiser bookkeeping shared by the diffusion adapters.

An adapter is created per ``apply``: it knows the model family's transformer blocks (``blocks``: ``(name,
module)`` pairs in execution order), reproduces their forward once with the reduction points of
:mod:`tokred.reduction`, and keeps the run state in step with the model (``attach``, called before the
method's ``install``). A method fills the points in through :meth:`Adapter.install_blocks`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    from ..patch import Patch
    from ..reduction import Planner


def has_class_named(obj: Any, name: str, module_prefix: str = "") -> bool:
    """True if ``obj``'s class or a base class is called ``name`` (and lives under ``module_prefix``).

    Matching by name keeps tokred from importing diffusers just to check a timm model, and vice versa.
    """
    return any(
        cls.__name__ == name and cls.__module__.startswith(module_prefix) for cls in type(obj).__mro__
    )


def require_concrete(root: torch.nn.Module, method: str) -> None:
    """Refuse a model whose weights are on the ``meta`` device, for methods whose choices depend on values
    (thresholds, clustering), which a meta tensor does not have."""
    for tensor in (*root.parameters(), *root.buffers()):
        if tensor.device.type == "meta":
            raise UnsupportedModelError(
                f"{method}: the model is on the meta device (no values); its token choices depend on the "
                "activations, so load or initialise real weights first (model.to_empty(...) / from_pretrained)"
            )
        break


class Adapter:
    """Knows where the transformer blocks of one model family are and drives their forward.

    ``root`` is the ``nn.Module`` that gets patched (the ViT, or the denoiser of a pipeline); ``container`` is
    what the user passed (the same module, or the pipeline). ``blocks`` lists ``(name, module)`` for every
    transformer block the adapter's forward can run.
    """

    family: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, container: Any, root: torch.nn.Module) -> None:
        self.container = container
        self.root = root
        self.blocks: list[tuple[str, torch.nn.Module]] = []

    @classmethod
    def match(cls, obj: Any) -> Adapter | None:
        """An adapter for ``obj`` if it belongs to this family, else None."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise :class:`~tokred.errors.UnsupportedModelError` if the model has blocks we cannot patch."""

    def attach(self, patch: Patch) -> None:
        """Install the hooks that keep ``patch.state`` (steps, generations) up to date."""

    def install_blocks(self, patch: Patch, planner: Planner, names: set[str] | None = None) -> None:
        """Run every block (or those in ``names``) through the adapter's forward, asking ``planner`` for the plan
        of each call. Every family takes plans; each documents the points its blocks offer (diffusion denoisers:
        ``attn``/``kv``/``cross``/``attn2``/``kv2``/``mlp``; timm ViTs: ``tokens``, and keyword options)."""
        raise UnsupportedModelError(f"the {self.family} adapter has no planned block forward")


# --- diffusion denoisers ------------------------------------------------------------------------------------


def pipeline_scheduler(container: Any, denoiser: torch.nn.Module) -> Any:
    """The scheduler the pipeline holds *now* (pipelines may swap it), or None for a bare denoiser."""
    if container is denoiser:
        return None
    return getattr(container, "scheduler", None)


def expected_calls(scheduler: Any) -> int | None:
    """How many denoiser calls the scheduler's current timesteps make (after an img2img ``begin_index``)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    try:
        total = len(timesteps)
    except TypeError:
        return None
    begin = getattr(scheduler, "begin_index", None)
    return max(total - int(begin), 0) if isinstance(begin, int) else total


def attach_denoiser_state(
    patch: Patch,
    container: Any,
    denoiser: torch.nn.Module,
    sample: tuple[str, int] = ("sample", 0),
    timestep: tuple[str, int] = ("timestep", 1),
    auxiliary_kwarg: str | None = None,
    timestep_scale: float = 1.0,
) -> None:
    """Keep ``patch.state`` in step with a diffusion denoiser (U-Net, MMDiT).

    A forward pre-hook on ``denoiser`` reads the latent input ``sample`` and the ``timestep`` argument, each
    given as ``(keyword, position)`` because pipelines pass them either way, records the latent size and
    counts the call. A new generation starts when the pipeline's *current* scheduler holds new timesteps
    (every pipeline calls ``scheduler.set_timesteps`` once per generation, which replaces them; reading the
    scheduler at call time follows ``pipe.scheduler = ...`` swaps) or when the timestep goes up (see
    :meth:`~tokred.state.RunState.begin_call`). Nothing on the scheduler is changed. A call with a true
    ``auxiliary_kwarg`` (SD3's ``skip_layers``) is a second pass of the same step: it is not counted.
    ``timestep_scale`` brings the timestep to the 0-1000 scale methods read (Flux is called with ``t / 1000``).
    """
    state = patch.state
    sample_name, sample_pos = sample
    timestep_name, timestep_pos = timestep

    def before_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        scheduler = pipeline_scheduler(patch.adapter.container, denoiser)
        if scheduler is not None:
            state.follow_scheduler(getattr(scheduler, "timesteps", None), expected_calls(scheduler))
        x = args[sample_pos] if len(args) > sample_pos else kwargs.get(sample_name)
        t = args[timestep_pos] if len(args) > timestep_pos else kwargs.get(timestep_name)
        if x is not None:
            state.latent_size = (int(x.shape[-2]), int(x.shape[-1]))
        if t is not None and timestep_scale != 1.0:
            t = t * timestep_scale
        auxiliary = auxiliary_kwarg is not None and bool(kwargs.get(auxiliary_kwarg))
        state.begin_call(t, auxiliary=auxiliary)

    patch.register_forward_pre_hook(denoiser, before_forward, with_kwargs=True, outside_compile=True)


def grid_for(latent_size: tuple[int, int] | None, num_tokens: int, level: int) -> tuple[int, int] | None:
    """(h, w) of a block's token grid at ``level`` (its downsampling) for a latent of ``latent_size``, or None
    when ``num_tokens`` is not that grid (sides round up as the U-Net's strided convolutions do)."""
    if latent_size is None:
        return None
    lh, lw = latent_size
    h, w = math.ceil(lh / level), math.ceil(lw / level)
    return (h, w) if h * w == num_tokens else None


def hook_prediction(patch: Any, proj: torch.nn.Module, grid_of: Any, fn: Any) -> None:
    """Let ``fn(tokens [B, N, C], grid)`` rewrite the per-token prediction ``proj`` outputs, in every counted call
    (auxiliary calls and outputs that are not token sequences pass through). ``grid_of(N)`` is the patch grid of
    ``N`` tokens, or None when they are not on one (the call is left alone). The transformer adapters'
    ``install_output`` (CAT pruning's reuse of cached predictions)."""
    state = patch.state

    def after_proj(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if out.ndim != 3 or state.auxiliary:
            return None
        grid = grid_of(out.shape[1])
        if grid is None:
            return None
        new = fn(out, grid)
        return None if new is out else new

    patch.register_forward_hook(proj, after_proj)
