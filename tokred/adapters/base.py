"""What every model-family adapter provides."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from ..patch import Patch


def has_class_named(obj: Any, name: str, module_prefix: str = "") -> bool:
    """True if ``obj``'s class or a base class is called ``name`` (and lives under ``module_prefix``).

    Matching by name keeps tokred from importing diffusers just to check a timm model, and vice versa.
    """
    return any(
        cls.__name__ == name and cls.__module__.startswith(module_prefix) for cls in type(obj).__mro__
    )


class Adapter:
    """Knows where the transformer blocks of one model family are and how to drive its run state.

    ``root`` is the ``nn.Module`` that gets patched (the ViT, or the U-Net of a pipeline); ``container``
    is what the user passed (the same module, or the pipeline).
    """

    family: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, container: Any, root: torch.nn.Module) -> None:
        self.container = container
        self.root = root

    @classmethod
    def match(cls, obj: Any) -> Adapter | None:
        """An adapter for ``obj`` if it belongs to this family, else None."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise :class:`~tokred.errors.UnsupportedModelError` if the model has blocks we cannot patch."""

    def attach(self, patch: Patch) -> None:
        """Install the hooks that keep ``patch.state`` (steps, generations) up to date."""


def attach_denoiser_state(
    patch: Patch,
    denoiser: torch.nn.Module,
    scheduler: Any = None,
    sample: tuple[str, int] = ("sample", 0),
    timestep: tuple[str, int] = ("timestep", 1),
) -> None:
    """Keep ``patch.state`` in step with a diffusion denoiser (U-Net, MMDiT).

    A forward pre-hook on ``denoiser`` reads the latent input ``sample`` and the ``timestep`` argument, each
    given as ``(keyword, position)`` because pipelines pass them either way, records the latent size and
    counts the call (a timestep that goes up starts a new generation, see
    :meth:`~tokred.state.RunState.begin_call`). When the denoiser belongs to a pipeline, the pipeline's
    ``scheduler.set_timesteps``, which every pipeline calls once at the start of a generation, resets the state.
    """
    state = patch.state
    sample_name, sample_pos = sample
    timestep_name, timestep_pos = timestep

    def before_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[sample_pos] if len(args) > sample_pos else kwargs.get(sample_name)
        t = args[timestep_pos] if len(args) > timestep_pos else kwargs.get(timestep_name)
        if x is not None:
            state.latent_size = (int(x.shape[-2]), int(x.shape[-1]))
        state.begin_call(t)

    patch.add_hook(denoiser.register_forward_pre_hook(before_forward, with_kwargs=True))
    if scheduler is not None and hasattr(scheduler, "set_timesteps"):
        patch.wrap_method(scheduler, "set_timesteps", lambda *a, **k: state.reset())
