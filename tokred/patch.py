"""A reversible set of changes to a model: forwards swapped, attributes set, hooks registered.

Every change goes through :class:`Patch`, which records how to undo it, so ``remove()`` restores the model
exactly: parameters and buffers are never touched, replaced forwards are instance attributes that are
deleted again, and hooks are removed.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .state import RunState

if TYPE_CHECKING:
    from .adapters.base import Adapter
    from .method import Method

_MISSING = object()
PATCH_ATTR = "_tokred_patch"


class Patch:
    """The handle returned by :func:`tokred.apply`. Use ``remove()`` or a ``with`` block to undo it."""

    def __init__(self, adapter: Adapter, method: Method, state: RunState) -> None:
        self.adapter = adapter
        self.method = method
        self.options = method.options
        self.state = state
        self._undo: list[Callable[[], None]] = []
        self.active = True

    # --- recording changes -------------------------------------------------------------------------
    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` and remember the previous value (or its absence)."""
        # Only the instance's own attribute is restored; a class attribute shows through again on undo.
        previous = vars(obj).get(name, _MISSING)

        def undo() -> None:
            if previous is _MISSING:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
            else:
                setattr(obj, name, previous)

        setattr(obj, name, value)
        self._undo.append(undo)

    def replace_forward(self, module: Any, forward: Callable[..., Any]) -> None:
        """Make ``forward(module, *args, **kwargs)`` the module's forward until removal."""
        self.set_attr(module, "forward", types.MethodType(forward, module))

    def wrap_method(self, obj: Any, name: str, before: Callable[..., None]) -> None:
        """Call ``before(*args, **kwargs)`` ahead of ``obj.name(...)`` until removal."""
        original = getattr(obj, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            before(*args, **kwargs)
            return original(*args, **kwargs)

        self.set_attr(obj, name, wrapped)

    def add_hook(self, handle: Any) -> None:
        """Keep a ``torch.utils.hooks.RemovableHandle`` to remove with the patch."""
        self._undo.append(handle.remove)

    def on_remove(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    # --- lifecycle -------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Undo every change, newest first. Calling it twice is harmless."""
        while self._undo:
            self._undo.pop()()
        self.active = False

    def reset(self) -> None:
        """Start a new generation by hand (pipelines and timestep jumps do this automatically)."""
        self.state.reset()

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        status = "active" if self.active else "removed"
        return f"Patch({self.method.name!r} on {self.adapter.family}, {status}, options={self.options})"
