"""Model-family adapters and the lookup from a user's object to its adapter."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from .base import Adapter
from .diffusers_dit import DiffusersDiTAdapter
from .diffusers_flux import DiffusersFluxAdapter
from .diffusers_mmdit import DiffusersMMDiTAdapter
from .diffusers_unet import DiffusersUNetAdapter
from .timm_vit import TimmViTAdapter

ADAPTERS: list[type[Adapter]] = [TimmViTAdapter, DiffusersUNetAdapter, DiffusersMMDiTAdapter]
ADAPTERS.append(DiffusersDiTAdapter)  # PixArt-α/Σ, DiT-XL/2
ADAPTERS.append(DiffusersFluxAdapter)


def register_adapter(adapter_cls: type[Adapter]) -> type[Adapter]:
    """Add an adapter for another model family (checked after the built-in ones)."""
    if adapter_cls not in ADAPTERS:
        ADAPTERS.append(adapter_cls)
    return adapter_cls


def supported_families() -> str:
    return "; ".join(f"{a.family} ({a.description})" for a in ADAPTERS)


def resolve_adapter(obj: Any) -> Adapter:
    """The adapter for ``obj``; the error names every supported model family."""
    for adapter_cls in ADAPTERS:
        adapter = adapter_cls.match(obj)
        if adapter is not None:
            adapter.check()
            return adapter
    raise UnsupportedModelError(
        f"unsupported model {type(obj).__module__}.{type(obj).__qualname__}; "
        f"tokred supports: {supported_families()}"
    )


__all__ = ["ADAPTERS", "Adapter", "register_adapter", "resolve_adapter", "supported_families"]
