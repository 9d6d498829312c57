"""``apply`` and ``remove``: the one-line entry points."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from .adapters import resolve_adapter
from .errors import InvalidOptionError, UnsupportedModelError
from .options import is_int
from .patch import PATCH_ATTR, Patch
from .registry import get_method
from .state import RunState

SEED_RANGE = "None or an int in [0, 2**64)"


def apply(model: Any, method: str | Sequence[str], *, seed: int | None = None, **options: Any) -> Patch:
    """Patch ``model`` in place with ``method`` and return the :class:`~tokred.patch.Patch`.

    ``model`` is a timm VisionTransformer, a diffusers UNet2DConditionModel or SD3Transformer2DModel, or a
    diffusers pipeline with a ``.unet`` / ``.transformer``. Options are the method's own (see ``tokred list``
    or the method's docstring). ``method`` may be a composition, ``"deepcache+tome"`` or ``["deepcache", "tome"]``
    (one patch; each member's options as ``tome={"ratio": 0.5}`` or ``**{"tome.ratio": 0.5}``, see
    :mod:`tokred.compose`). ``seed`` fixes the patch's private random stream; by default it is forked from
    torch's global RNG at the start of each generation. A previous patch on the same model is removed first:
    patches never stack.

    Every mistake (unknown method, bad option or seed, unsupported model) raises here, before anything changes.
    """
    method_cls = get_method(method)
    if not (seed is None or (is_int(seed) and 0 <= seed < 2**64)):
        raise InvalidOptionError(f"{method_cls.name}: seed={seed!r} is invalid; valid: {SEED_RANGE}")
    adapter = resolve_adapter(model)
    if adapter.family not in method_cls.options:
        raise UnsupportedModelError(method_cls.unsupported_reason(adapter.family))
    parsed = method_cls.parse_options(adapter.family, options)
    instance = method_cls(parsed)
    instance.check(adapter)

    remove(model)
    patch = Patch(adapter, instance, RunState(seed=seed, method=method_cls.State()))
    try:
        adapter.attach(patch)
        instance.install(patch)
        patch.set_attr(adapter.root, PATCH_ATTR, patch)
        patch.set_attr(adapter.root, "__deepcopy__", _deepcopy_hook(adapter.root, patch))
    except BaseException:
        patch.remove()
        raise
    return patch


def _deepcopy_hook(root: Any, patch: Patch):
    """``root.__deepcopy__``: copy the unpatched model, then give the copy its own patch (same method, options
    and seed). ``copy.deepcopy`` looks the hook up on the instance, so the model's class is untouched."""

    def deepcopy_patched(memo: dict[int, Any]) -> Any:
        own = vars(root).pop("__deepcopy__")
        try:
            clone = copy.deepcopy(root, memo)
        finally:
            vars(root)["__deepcopy__"] = own
        patch.copy_into(clone, memo)
        apply(clone, patch.method.name, seed=patch.state.seed, **patch.option_values())
        return clone

    return deepcopy_patched


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
    patch = vars(root).get(PATCH_ATTR) if hasattr(root, "__dict__") else None
    return patch if isinstance(patch, Patch) and not patch.removed else None


def remove(model: Any) -> bool:
    """Remove whatever tokred patched on ``model`` (or the denoiser of a pipeline). Returns whether there was one."""
    patch = get_patch(model)
    if patch is None:
        return False
    patch.remove()
    return True
