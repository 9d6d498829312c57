"""The interface every token-reduction method implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .adapters.base import Adapter
    from .patch import Patch


class Method:
    """A token-reduction method.

    Subclasses set ``name`` (through :func:`tokred.register_method`), ``options`` (one options dataclass
    per supported model family; see :mod:`tokred.options`), optionally ``presets`` (named option sets per
    family, used by the benchmarks) and implement :meth:`install`.

    ``install`` receives a fresh :class:`~tokred.patch.Patch` whose adapter knows the model's blocks and
    whose state counts steps and generations; every change to the model must go through the patch so
    that ``remove()`` can undo it.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[dict[str, type]] = {}
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}

    def __init__(self, options: Any) -> None:
        self.options = options

    @classmethod
    def families(cls) -> list[str]:
        return sorted(cls.options)

    def check(self, adapter: Adapter) -> None:
        """Raise :class:`~tokred.errors.TokredError` if this model cannot take these options."""

    def install(self, patch: Patch) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement install()")
