"""tokred: token-reduction methods for transformers behind one interface.

>>> import timm, tokred
>>> model = timm.create_model("deit_small_patch16_224")
>>> patch = tokred.apply(model, "tome", r=13)      # patched in place
>>> patch.remove()                                 # bit-exact original again

The core (this package without :mod:`tokred.bench`) needs only torch; the model's own library (timm,
diffusers) is imported only when its adapter is used. The names below are loaded on first use, so
``import tokred`` itself (and the pytest plugin's start-up) imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# public name -> submodule that defines it
_EXPORTS = {
    "apply": "api",
    "get_patch": "api",
    "remove": "api",
    "InvalidOptionError": "errors",
    "TokredError": "errors",
    "TokredWarning": "errors",
    "UnknownMethodError": "errors",
    "UnknownTaskError": "errors",
    "UnsupportedModelError": "errors",
    "Method": "method",
    "Patch": "patch",
    "get_method": "registry",
    "list_methods": "registry",
    "register_method": "registry",
}

__all__ = [
    "InvalidOptionError",
    "Method",
    "Patch",
    "TokredError",
    "TokredWarning",
    "UnknownMethodError",
    "UnknownTaskError",
    "UnsupportedModelError",
    "apply",
    "get_method",
    "get_patch",
    "list_methods",
    "register_method",
    "remove",
]

if TYPE_CHECKING:  # pragma: no cover
    from .api import apply, get_patch, remove
    from .errors import (
        InvalidOptionError,
        TokredError,
        TokredWarning,
        UnknownMethodError,
        UnknownTaskError,
        UnsupportedModelError,
    )
    from .method import Method
    from .patch import Patch
    from .registry import get_method, list_methods, register_method


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokred' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
