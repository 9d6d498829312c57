"""A reversible set of changes to a model: forwards swapped, attributes set, hooks registered.

Every change goes through :class:`Patch`, which records how to undo it, so ``remove()`` restores the model
exactly: parameters and buffers are never touched, replaced forwards are instance attributes that are
deleted again, and hooks are removed.

Lifecycle rules (each one tested):

* ``remove()`` restores only what the patch changed, newest first, and leaves later changes of the user
  alone: an attribute the user set again after ``apply`` (e.g. their own wrapper around a block's
  ``forward``) stays. Such a wrapper that still calls the patched forward then reaches the original one,
  because a removed patch's forwards and hooks pass straight through. ``remove()`` twice is harmless.
* Forwards and hooks act only on the module they were installed on, while the patch is active: a copy of a
  patched block (``copy.deepcopy(block)``, or a block swapped in while patched) runs unpatched, and
  ``remove()`` also clears such copies it finds inside the model.
* ``copy.deepcopy(patched_model)`` returns an independent copy carrying its own, fresh patch of the same
  method, options and seed; removing either patch leaves the other alone. (A pipeline's deep copy gets the
  patch on its denoiser, which then starts generations by the timestep rule.)
* ``with patch:`` removes the patch on exit. Entering a patch that is already in a ``with`` block, or one
  that was removed, raises :class:`~tokred.errors.TokredError`.
* ``pause()`` / ``resume()`` (or ``with patch.paused():``) make the model compute as if unpatched, without
  undoing anything: every installed forward, hook and wrapper passes straight through while paused, and the
  method's state (its caches, the step count of the generation) is kept for when it resumes. Paused calls do
  not count as denoiser steps. Benchmarks use it to time the unreduced model between calls of a method whose
  state spans calls (CAT pruning's caches, CA-ToMe's reused pairs).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import TokredError
from .state import RunState
from .tokens import BlockTokens, TokenCounter

if TYPE_CHECKING:
    from .adapters.base import Adapter
    from .method import Method, MethodState

_MISSING = object()
PATCH_ATTR = "_tokred_patch"
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


@dataclasses.dataclass
class _AttrChange:
    obj: Any
    name: str
    value: Any
    previous: Any

    def undo(self) -> None:
        # Only our own value is taken back: a value the user set afterwards stays.
        if vars(self.obj).get(self.name, _MISSING) is not self.value:
            return
        if self.previous is _MISSING:
            delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, self.previous)

    def undo_on_copy(self, memo: dict[int, Any]) -> None:
        target = memo.get(id(self.obj))
        if target is None or target is self.obj:
            return
        if self.previous is _MISSING:
            vars(target).pop(self.name, None)
        else:
            setattr(target, self.name, copy.deepcopy(self.previous, memo))


@dataclasses.dataclass
class _HookChange:
    module: Any
    handle: Any

    def undo(self) -> None:
        self.handle.remove()

    def undo_on_copy(self, memo: dict[int, Any]) -> None:
        target = memo.get(id(self.module))
        if target is None or target is self.module:
            return
        for name in _HOOK_DICTS:
            hooks = getattr(target, name, None)
            if isinstance(hooks, dict):
                hooks.pop(self.handle.id, None)


@dataclasses.dataclass
class _Callback:
    fn: Callable[[], None]
    on_copy: Callable[[dict[int, Any]], None] | None = None

    def undo(self) -> None:
        self.fn()

    def undo_on_copy(self, memo: dict[int, Any]) -> None:
        if self.on_copy is not None:
            self.on_copy(memo)


class Patch:
    """The handle returned by :func:`tokred.apply`. Use ``remove()`` or a ``with`` block to undo it.

    Attributes: ``adapter`` (drives the model family's blocks), ``method`` and ``options`` (the parsed options
    dataclass), ``state`` (:class:`~tokred.state.RunState`), ``method_state`` (the method's typed state),
    ``active``.
    """

    def __init__(self, adapter: Adapter, method: Method, state: RunState) -> None:
        self.adapter = adapter
        self.method = method
        self.options = method.options
        self.state = state
        self.tokens = TokenCounter()
        self._changes: list[_AttrChange | _HookChange | _Callback] = []
        # ``active``: the installed forwards and hooks act (False while paused and after removal)
        self.active = True
        self.removed = False
        self._entered = False

    @property
    def method_state(self) -> MethodState:
        """The method's own typed state (its ``State`` class), reset at every generation."""
        return self.state.method

    # --- per-block token counts ------------------------------------------------------------------------------
    def token_counts(self) -> dict[str, BlockTokens]:
        """Mean token counts per block name over the calls since :meth:`reset_token_counts` (or ``apply``); calls of
        a ``torch.compile``'d model are not counted (:mod:`tokred.tokens`)."""
        return self.tokens.means()

    def reset_token_counts(self) -> None:
        self.tokens.reset()

    # --- recording changes -------------------------------------------------------------------------------
    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` and remember the previous value (or its absence)."""
        # Only the instance's own attribute is restored; a class attribute shows through again on undo.
        previous = vars(obj).get(name, _MISSING)
        setattr(obj, name, value)
        self._changes.append(_AttrChange(obj, name, value, previous))

    def replace_forward(self, module: Any, forward: Callable[..., Any]) -> None:
        """Make ``forward(module, *args, **kwargs)`` the module's forward until removal.

        The installed forward runs ``forward`` only for this very module while the patch is active; anywhere
        else (a deep copy of the module, or after ``remove()`` through a user's wrapper) it runs what it
        replaced.
        """
        patch = self
        previous = vars(module).get("forward", _MISSING)
        # The class's forward, read now: torch.compile cannot trace ``type(mod).forward`` ("Dynamo does not know
        # how to trace method `forward` of class `type`"), which a paused patch's compiled call used to reach.
        class_forward = type(module).forward

        def patched(mod: Any, *args: Any, **kwargs: Any) -> Any:
            if mod is module and patch.active:
                return forward(mod, *args, **kwargs)
            if mod is module:
                return class_forward(mod, *args, **kwargs) if previous is _MISSING else previous(*args, **kwargs)
            return type(mod).forward(mod, *args, **kwargs)

        patched._tokred_patch_id = id(self)  # lets remove() find stray copies
        self.set_attr(module, "forward", types.MethodType(patched, module))

    def wrap_method(self, obj: Any, name: str, before: Callable[..., None]) -> None:
        """Call ``before(*args, **kwargs)`` ahead of ``obj.name(...)`` until removal."""
        original = getattr(obj, name)
        patch = self

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if patch.active:
                before(*args, **kwargs)
            return original(*args, **kwargs)

        self.set_attr(obj, name, wrapped)

    def register_forward_pre_hook(
        self, module: Any, hook: Callable[..., Any], *, with_kwargs: bool = False, outside_compile: bool = False
    ) -> None:
        """``module.register_forward_pre_hook(hook)`` until removal; the hook runs only for this module while
        the patch is active.

        ``outside_compile=True`` (the run-state bookkeeping on a denoiser: step counting, timestep reads, cache
        decisions) makes the hook a :func:`torch.compiler.disable` frame. ``torch.compile(denoiser)`` runs a
        module's hooks as frames of their own, so the hook then runs eagerly before each compiled call: its Python
        state (the step, a host read of the timestep) is neither traced nor guarded, and the compiled forward sees
        only what the hook decided. (Compiling a module *around* the denoiser inlines the hook: a graph break.)"""
        guarded = self._guard_maybe_outside_compile(module, hook, outside_compile)
        self._changes.append(
            _HookChange(module, module.register_forward_pre_hook(guarded, with_kwargs=with_kwargs))
        )

    def register_forward_hook(
        self, module: Any, hook: Callable[..., Any], *, with_kwargs: bool = False, outside_compile: bool = False
    ) -> None:
        """``module.register_forward_hook(hook)`` until removal (same guard and ``outside_compile`` as the
        pre-hook: on a denoiser, work after each compiled call that must not be traced, e.g. CAT's selection)."""
        guarded = self._guard_maybe_outside_compile(module, hook, outside_compile)
        self._changes.append(
            _HookChange(module, module.register_forward_hook(guarded, with_kwargs=with_kwargs))
        )

    def _guard_maybe_outside_compile(self, module: Any, hook: Callable[..., Any], outside_compile: bool):
        """:meth:`_guard`, as a :func:`torch.compiler.disable` frame with ``outside_compile``."""
        guarded = self._guard(module, hook)
        if outside_compile:
            import torch

            guarded = torch.compiler.disable(guarded)
        return guarded

    def add_hook(self, handle: Any) -> None:
        """Keep a ``torch.utils.hooks.RemovableHandle`` to remove with the patch (prefer the guarded
        :meth:`register_forward_pre_hook` / :meth:`register_forward_hook`)."""
        self._changes.append(_Callback(handle.remove))

    def on_remove(self, fn: Callable[[], None], on_copy: Callable[[dict[int, Any]], None] | None = None) -> None:
        """Call ``fn()`` when the patch is removed; ``on_copy(memo)``, if given, does the same on a deep copy of
        the patched model (``memo`` maps ``id`` of an original object to its copy)."""
        self._changes.append(_Callback(fn, on_copy))

    def _guard(self, module: Any, hook: Callable[..., Any]) -> Callable[..., Any]:
        patch = self

        def guarded(mod: Any, *args: Any) -> Any:
            if mod is module and patch.active:
                return hook(mod, *args)
            return None

        return guarded

    # --- lifecycle -------------------------------------------------------------------------------------
    @property
    def is_paused(self) -> bool:
        return not self.active and not self.removed

    def pause(self) -> None:
        """Compute as the unpatched model until :meth:`resume`, keeping the method's state (see the module
        docstring). Pausing a paused patch is harmless; pausing a removed one is an error."""
        self._check_not_removed("pause")
        self.active = False

    def resume(self) -> None:
        """Act again after :meth:`pause`, with the state the method had when it was paused."""
        self._check_not_removed("resume")
        self.active = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[Patch]:
        """``with patch.paused(): model(x)`` runs the unpatched computation; the patch acts again after."""
        was_active = self.active
        self.pause()
        try:
            yield self
        finally:
            if was_active and not self.removed:
                self.resume()

    def _check_not_removed(self, what: str) -> None:
        if self.removed:
            raise TokredError(
                f"cannot {what} this {self.method.name!r} patch: it was removed; apply the method again "
                "(tokred.apply(...))"
            )

    def remove(self) -> None:
        """Undo every change, newest first. Calling it twice is harmless."""
        self.active = False
        self.removed = True
        while self._changes:
            self._changes.pop().undo()
        self._clear_strays()

    def _clear_strays(self) -> None:
        """Delete forwards of this patch that copies of patched modules carry inside the model."""
        modules = getattr(self.adapter.root, "modules", None)
        if modules is None:
            return
        for module in modules():
            forward = vars(module).get("forward")
            if getattr(getattr(forward, "__func__", None), "_tokred_patch_id", None) == id(self):
                del module.forward

    def reset(self) -> None:
        """Start a new generation by hand (pipelines and timestep jumps do this automatically)."""
        self.state.reset()

    def copy_into(self, clone_root: Any, memo: dict[int, Any]) -> None:
        """On ``clone_root``, a deep copy of the patched model made with ``memo``, take back every change this
        patch made, so the copy is the unpatched model (newest first, as :meth:`remove`: an attribute changed twice,
        e.g. a forward wrapped in another, gets its first previous value back)."""
        for change in reversed(self._changes):
            change.undo_on_copy(memo)

    def option_values(self) -> dict[str, Any]:
        """The options as keyword arguments for :func:`tokred.apply` (a composite's as ``member.option``)."""
        return self.method.option_values()

    def __deepcopy__(self, memo: dict[int, Any]) -> Patch:
        # The patch is not part of a model's copy (the copy gets a fresh one, see the module docstring).
        return self

    def __enter__(self) -> Patch:
        if self.removed:
            raise TokredError(
                f"this {self.method.name!r} patch was removed; apply the method again (tokred.apply(...)) to use it"
            )
        if self._entered:
            raise TokredError(
                f"this {self.method.name!r} patch is already in a with block; re-entering it is not supported "
                "(its with block removes it on exit)"
            )
        self._entered = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._entered = False
        self.remove()

    def __repr__(self) -> str:
        status = "removed" if self.removed else ("active" if self.active else "paused")
        return f"Patch({self.method.name!r} on {self.adapter.family}, {status}, options={self.options})"
