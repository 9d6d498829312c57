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
