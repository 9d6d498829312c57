"""Name -> class registries for methods (and, through the same helper, tasks).

Built-in methods register with the :func:`register_method` decorator when ``tokred.methods`` is imported;
third-party packages declare an entry point in the group ``tokred.methods`` whose value is either a
:class:`~tokred.method.Method` subclass (registered under the entry point's name) or a module that
registers its methods on import.
"""

from __future__ import annotations

import fnmatch
import importlib
import threading
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

from .errors import UnknownMethodError
from .method import Method

METHOD_ENTRY_POINT_GROUP = "tokred.methods"


class Registry:
    """A name-keyed registry filled by a decorator, a built-in package and an entry-point group."""

    def __init__(
        self, kind: str, builtin_package: str, entry_point_group: str, base: type, error: type[Exception]
    ) -> None:
        self.kind = kind
        self.error = error
        self.builtin_package = builtin_package
        self.entry_point_group = entry_point_group
        self.base = base
        self._items: dict[str, type] = {}
        self._loaded = False
        # Loading imports the built-ins and the entry points, which register themselves; other threads wait
        # until that has finished (re-entrant: a built-in module registering while loading holds it already).
        self._lock = threading.RLock()

    def register(self, name: str | None = None) -> Callable[[type], type]:
        def decorator(cls: type) -> type:
            key = name or getattr(cls, "name", "") or cls.__name__.lower()
            if not isinstance(cls, type) or not issubclass(cls, self.base):
                raise TypeError(f"can only register subclasses of {self.base.__name__}, got {cls!r}")
            with self._lock:
                existing = self._items.get(key)
                if existing is not None and existing is not cls:
                    raise ValueError(f"{self.kind} {key!r} is already registered by {existing.__module__}")
                cls.name = key
                self._items[key] = cls
            return cls

        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:  # another thread finished loading while this one waited
                return
            importlib.import_module(self.builtin_package)
            for ep in entry_points(group=self.entry_point_group):
                if ep.name in self._items:
                    continue
                obj = ep.load()
                if isinstance(obj, type) and issubclass(obj, self.base):
                    self.register(ep.name)(obj)
            self._loaded = True  # only now: a thread that sees it set finds every built-in registered

    def names(self, pattern: str | None = "*") -> list[str]:
        if pattern is None:
            pattern = "*"
        if not isinstance(pattern, str):
            raise TypeError(f"list of {self.kind}s: pattern must be a glob string such as 'to*' or None, "
                            f"got {type(pattern).__name__} {pattern!r}")
        self._load()
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def get(self, name: str) -> Any:
        if not isinstance(name, str):
            raise self.error(f"{self.kind} names are strings, got {type(name).__name__} {name!r}; "
                             f"valid {self.kind}s: {', '.join(self.names()) or 'none'}")
        self._load()
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(self.names()) or "none"
            raise self.error(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}") from None


methods = Registry("method", "tokred.methods", METHOD_ENTRY_POINT_GROUP, Method, UnknownMethodError)


def register_method(name: str | None = None) -> Callable[[type], type]:
    """Class decorator: ``@register_method("tome")`` makes the method available by that name."""
    return methods.register(name)


def list_methods(pattern: str | None = "*") -> list[str]:
    """Names of the registered methods and of the declared compositions (:func:`tokred.compose.declare_composition`)
    matching a glob ``pattern`` (None: all), sorted."""
    from .compose import declared_names

    names = methods.names(pattern)
    return sorted(names + [n for n in declared_names() if fnmatch.fnmatch(n, pattern or "*") and n not in names])


def get_method(name: str | Sequence[str]) -> type[Method]:
    """The method class registered as ``name``; the error lists the valid names. A composition (``"deepcache+tome"``
    or a list of names, see :mod:`tokred.compose`) gives its composite class, built on first use."""
    from .compose import SEPARATOR, composite_method

    if isinstance(name, list | tuple) or (isinstance(name, str) and SEPARATOR in name):
        return composite_method(name)
    return methods.get(name)
