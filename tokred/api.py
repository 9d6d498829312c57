"""``apply`` and ``remove``: the one-line entry points."""

from __future__ import annotations

from typing import Any

from .adapters import resolve_adapter
from .errors import UnsupportedModelError
from .options import parse_options
from .patch import PATCH_ATTR, Patch
from .registry import get_method
from .state import RunState


def apply(model: Any, method: str, *, seed: int | None = None, **options: Any) -> Patch:
    """Patch ``model`` in place with ``method`` and return the :class:`~tokred.patch.Patch`.

    ``model`` is a timm VisionTransformer, a diffusers UNet2DConditionModel, or a diffusers pipeline with
    a ``.unet``. Options are the method's own (see ``tokred list`` or the method's docstring). ``seed``
    fixes the patch's private random stream; by default it is forked from torch's global RNG at the start
    of each generation. A previous patch on the same model is removed first: patches never stack.

    Every mistake (unknown method, bad option, unsupported model) raises here, before anything changes.
    """
    method_cls = get_method(method)
    adapter = resolve_adapter(model)
    if adapter.family not in method_cls.options:
        raise UnsupportedModelError(
            f"method {method_cls.name!r} does not support {adapter.family} models; "
            f"it supports: {', '.join(method_cls.families())}"
        )
    parsed = parse_options(method_cls.options[adapter.family], options, context=f"{method_cls.name} ({adapter.family})")
    instance = method_cls(parsed)
    instance.check(adapter)

    remove(model)
    patch = Patch(adapter, instance, RunState(seed=seed))
    try:
        adapter.attach(patch)
        instance.install(patch)
        patch.set_attr(adapter.root, PATCH_ATTR, patch)
    except BaseException:
        patch.remove()
        raise
    return patch


# Attributes under which pipelines hold the denoiser that tokred patches.
DENOISER_ATTRS = ("unet", "transformer")


def _patched_root(model: Any) -> Any:
    """The module a patch lives on: ``model`` itself, or the pipeline's ``.unet`` / ``.transformer``."""
    if hasattr(model, "_modules"):
        return model
    for name in DENOISER_ATTRS:
        denoiser = getattr(model, name, None)
        if denoiser is not None:
            return denoiser
    return model


def get_patch(model: Any) -> Patch | None:
    """The active patch on ``model`` (or the denoiser of a pipeline), if any."""
    root = _patched_root(model)
    return vars(root).get(PATCH_ATTR) if hasattr(root, "__dict__") else None


def remove(model: Any) -> bool:
    """Remove whatever tokred patched on ``model`` (or the denoiser of a pipeline). Returns whether there was one."""
    patch = get_patch(model)
    if patch is None:
        return False
    patch.remove()
    return True
