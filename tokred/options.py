"""Declarative method options: dataclass fields that carry their own documentation and validity check.

A method declares its options as a dataclass whose fields are made with :func:`option`. ``parse_options``
turns user keyword arguments into that dataclass, rejecting unknown names (listing the valid ones) and
out-of-range values (naming the option and its range), so every mistake surfaces when ``apply`` is called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from .errors import InvalidOptionError

Check = Callable[[Any], bool]


def option(default: Any, *, valid: str, check: Check | None = None, doc: str = "") -> Any:
    """A dataclass field with a human-readable valid range (``valid``) and a predicate (``check``)."""
    return dataclasses.field(default=default, metadata={"valid": valid, "check": check, "doc": doc})


# Reusable predicates. Booleans are excluded from numbers on purpose: ``ratio=True`` is a mistake.
def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def int_at_least(low: int) -> Check:
    return lambda v: is_int(v) and v >= low


def number_in(low: float, high: float) -> Check:
    return lambda v: is_number(v) and low <= v <= high


def one_of(*choices: Any) -> Check:
    return lambda v: v in choices


def optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def fields_in_order(options_cls: type) -> list[dataclasses.Field]:
    """The options of ``options_cls``, its own first and then those it inherits (shared layout options)."""
    fields = dataclasses.fields(options_cls)
    own = set(vars(options_cls).get("__annotations__", {}))
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def describe(options_cls: type) -> list[dict[str, Any]]:
    """Name, default, valid range and doc of each option, for ``tokred list`` and error messages."""
    rows = []
    for f in fields_in_order(options_cls):
        rows.append(
            {
                "name": f.name,
                "default": f.default,
                "valid": f.metadata.get("valid", ""),
                "doc": f.metadata.get("doc", ""),
            }
        )
    return rows


def parse_options(options_cls: type, values: Mapping[str, Any], *, context: str) -> Any:
    """Build ``options_cls`` from ``values``; raise :class:`InvalidOptionError` naming what is wrong."""
    fields = {f.name: f for f in fields_in_order(options_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(f"{name} ({f.metadata.get('valid', '')})" for name, f in fields.items())
        raise InvalidOptionError(
            f"{context}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}. "
            f"Valid options: {valid or 'none'}."
        )
    for name, value in values.items():
        check = fields[name].metadata.get("check")
        if check is not None and not check(value):
            raise InvalidOptionError(
                f"{context}: option {name!r}={value!r} is invalid; valid: {fields[name].metadata['valid']}."
            )
    parsed = options_cls(**values)
    validate = getattr(parsed, "validate", None)
    if validate is not None:
        try:
            validate()
        except (ValueError, TypeError) as err:
            raise InvalidOptionError(f"{context}: {err}") from None
    return parsed
