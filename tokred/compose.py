"""Compositions: several methods as one patch, ``tokred.apply(model, "deepcache+tome")``.

A composition is a method of kind ``"composite"`` built on demand from registered methods, its *members*
(``tokred.get_method("deepcache+tome")`` or ``tokred.get_method(["deepcache", "tome"])``). One
:class:`~tokred.patch.Patch` holds every member's changes, so ``remove()`` undoes them all (newest first) and a
deep copy of the patched model gets its own patch of the same composition.

Order
    A cache is the outermost member: it decides which blocks run on each denoiser call; the token-reduction
    member acts inside the blocks that do run (on a cache's reusing calls, only in the blocks it recomputes; the
    skipped blocks compute nothing and record 0 tokens). The canonical name lists the cache first, whatever order
    the names were given in (``"tome+deepcache"`` is ``"deepcache+tome"``). Members are installed innermost first,
    so the cache's wrappers wrap the token method's block forwards.

Options
    Each member's options are addressed by its name, as a dict (``tokred.apply(unet, "deepcache+tome",
    deepcache={"cache_interval": 3}, tome={"ratio": 0.5})``) or dotted (``**{"tome.ratio": 0.5}``, and in the
    CLI and presets ``tome.ratio=0.5``); both forms may be mixed, but an option given twice is an error. Each
    member validates its own options (the error names the member); a bare option name is refused with the
    dotted name to use. ``patch.options["tome"]`` (or ``patch.options.tome``) is a member's parsed options;
    ``patch.option_values()`` gives them dotted.

Rules (each refused with its reason when the composition is named)
    * at least two members, each a registered method, none given twice, none a composition itself;
    * at most one cache (two caches would both decide which blocks run);
    * at most one method that is not a cache: the token methods all drive the transformer blocks through the
      adapter's one block planner per block (one would replace the other's forward);
    * the members must share a model family; the composition supports the families all of them support.

State, counting and timing
    The composition's state (``patch.method_state``) holds each member's typed state (``state["tome"]``), all
    reset at every generation. Each member sees the patch through :class:`MemberPatch`: the same adapter, run
    state, token counter and change log, with its own method, options and state. ``warmup_calls`` is the largest
    member's; ``cycle_calls`` the least common multiple of the members' cycles (None when one has none).

Presets
    A composition's presets combine its members' presets: :func:`declare_composition` names one preset of each
    member (``declare_composition(deepcache="interval3", tome="ratio0.5")`` gives the preset
    ``interval3+ratio0.5`` of ``deepcache+tome`` with the options ``deepcache.cache_interval=3, ...,
    tome.ratio=0.5``). Declared compositions are listed by ``tokred.list_methods()`` (and so benchmarked by
    ``tokred bench``) once all their members are registered; any other composition works by name with its
    members' default options (preset ``default``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .errors import InvalidOptionError, TokredError, TokredWarning, UnknownMethodError
from .method import Method, MethodState

SEPARATOR = "+"
CACHE = "cache"

# declare_composition's calls, resolved when asked for (members may register later): [{member: preset}]
_DECLARED: list[dict[str, str]] = []
# built composites by their members' classes (outermost first)
_BUILT: dict[tuple[type[Method], ...], type[Composite]] = {}


class CompositeState(MethodState):
    """Each member's typed state by member name (``state["tome"]``), reset and begun together."""

    members: ClassVar[tuple[tuple[str, type[MethodState]], ...]] = ()

    def __init__(self) -> None:
        self.states: dict[str, MethodState] = {name: cls() for name, cls in self.members}

    def __getitem__(self, name: str) -> MethodState:
        return self.states[name]

    def reset(self) -> None:
        for state in self.states.values():
            state.reset()

    def begin_call(self) -> None:
        for state in self.states.values():
            state.begin_call()


def combined_compile_support(members: tuple[type[Method], ...], families: list[str]) -> str | dict[str, str] | None:
    """A composition's :attr:`~tokred.method.Method.compile_support`: "fullgraph" where every member is, else the
    members' islands (or the first "no: ...") joined; None where a member does not say. One value when the families
    agree, else a dict by family."""
    per: dict[str, str | None] = {}
    for family in families:
        values = [(c.name, c.compile_support_for(family)) for c in members]
        if any(v is None for _, v in values):
            per[family] = None
            continue
        refused = [f"no: {name}: {v[len('no: '):]}" for name, v in values if v.startswith("no")]
        islands = [f"{name}: {v[len('island: '):]}" for name, v in values if v.startswith("island")]
        per[family] = refused[0] if refused else ("island: " + "; ".join(islands) if islands else "fullgraph")
    distinct = set(per.values())
    if len(distinct) == 1:
        return distinct.pop()
    return {family: value for family, value in per.items() if value is not None}


class CompositeOptions:
    """The parsed options of each member, outermost first: ``options["tome"]`` or ``options.tome``."""

    def __init__(self, members: Mapping[str, Any]) -> None:
        self.members = dict(members)

    def __getitem__(self, name: str) -> Any:
        return self.members[name]

    def __getattr__(self, name: str) -> Any:
        members = self.__dict__.get("members", {})
        if name in members:
            return members[name]
        raise AttributeError(f"{type(self).__name__} has no member {name!r}; members: {', '.join(members)}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompositeOptions) and self.members == other.members

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return " + ".join(f"{name}: {opts!r}" for name, opts in self.members.items())


class MemberRunState:
    """The run state as one member sees it: the patch's (step, generation, generator, ...) with ``method`` its own
    state."""

    def __init__(self, run: Any, method: MethodState) -> None:
        object.__setattr__(self, "_run", run)
        object.__setattr__(self, "method", method)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._run, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._run, name, value)


class MemberPatch:
    """The patch as one member of a composition sees it while it installs: the composition's patch (adapter,
    token counter, recording methods, ``active``) with the member's own ``method``, ``options`` and state
    (``method_state``, ``state.method``). Every change it records is the composition's, undone by its
    ``remove()``."""

    def __init__(self, patch: Any, method: Method, state: MethodState) -> None:
        self._patch = patch
        self.method = method
        self.options = method.options
        self.state = MemberRunState(patch.state, state)

    @property
    def method_state(self) -> MethodState:
        return self.state.method

    def __getattr__(self, name: str) -> Any:
        return getattr(self._patch, name)


class Composite(Method):
    """A composition of registered methods (see the module docstring); built by :func:`composite_method`."""

    kind = "composite"
    members: ClassVar[tuple[type[Method], ...]] = ()  # outermost first
    State = CompositeState

    def __init__(self, options: CompositeOptions) -> None:
        super().__init__(options)
        self.parts: list[tuple[str, Method]] = [(cls.name, cls(options[cls.name])) for cls in self.members]

    @classmethod
    def member_names(cls) -> list[str]:
        return [m.name for m in cls.members]

    @classmethod
    def parse_options(cls, family: str, values: dict[str, Any]) -> CompositeOptions:
        given = split_options(cls.name, cls.members, family, values)
        return CompositeOptions({m.name: m.parse_options(family, given[m.name]) for m in cls.members})

    @classmethod
    def describe_options(cls, family: str) -> list[dict[str, Any]]:
        return [{**row, "name": f"{m.name}.{row['name']}"} for m in cls.members for row in m.describe_options(family)]

    @classmethod
    def unsupported_reason(cls, family: str) -> str:
        missing = [m.name for m in cls.members if family not in m.options]
        why = "; ".join(f"{m} supports {', '.join(get(m).families())}" for m in missing)
        return (f"method {cls.name!r} does not support {family} models: {why}; {cls.name} supports: "
                f"{', '.join(cls.families()) or 'no family'}")

    def option_values(self) -> dict[str, Any]:
        return {f"{name}.{k}": v for name, method in self.parts for k, v in method.option_values().items()}

    def warmup_calls(self) -> int:
        return max(int(method.warmup_calls()) for _, method in self.parts)

    def cycle_calls(self) -> int | None:
        cycles = [method.cycle_calls() for _, method in self.parts]
        if any(c is None for c in cycles):
            return None
        return math.lcm(*(int(c) for c in cycles))

    def check(self, adapter: Any) -> None:
        for _, method in self.parts:
            method.check(adapter)

    def install(self, patch: Any) -> None:
        # innermost first: an outer member (the cache) wraps what the inner one installed
        states = patch.method_state
        for name, method in reversed(self.parts):
            method.install(MemberPatch(patch, method, states[name]))


def get(name: str) -> type[Method]:
    from .registry import methods

    return methods.get(name)


def member_names(spec: str | Sequence[str]) -> list[str]:
    """``"deepcache+tome"`` or ``["deepcache", "tome"]`` (or ``["deepcache+tome"]``) -> ``["deepcache", "tome"]``."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise UnknownMethodError("an empty list names no method; give method names, e.g. ['deepcache', 'tome']")
    names = []
    for item in items:
        if not isinstance(item, str):
            raise UnknownMethodError(f"method names are strings, got {type(item).__name__} {item!r}")
        names.extend(part.strip() for part in item.split(SEPARATOR))
    if any(not n for n in names):
        raise UnknownMethodError(f"composition {SEPARATOR.join(items)!r} has an empty member name; write the "
                                 f"member names joined by {SEPARATOR!r}, e.g. 'deepcache+tome'")
    return names


def composite_method(spec: str | Sequence[str]) -> type[Method]:
    """The composite method class of ``spec`` (see the module docstring), built once; a single name gives that
    method itself. Refuses unknown members and incompatible ones with the reason."""
    names = member_names(spec)
    label = SEPARATOR.join(names)
    if len(names) == 1:
        return get(names[0])
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UnknownMethodError(f"composition {label!r} names {', '.join(repeated)} twice; each member once")
    classes = []
    for name in names:
        try:
            classes.append(get(name))
        except UnknownMethodError as err:
            raise UnknownMethodError(f"composition {label!r}: {err}") from None
    for cls in classes:
        if issubclass(cls, Composite) or cls.kind == "composite":
            raise UnknownMethodError(f"composition {label!r}: {cls.name!r} is itself a composition; list its members "
                                     "instead")
    caches = [c.name for c in classes if c.kind == CACHE]
    others = [c.name for c in classes if c.kind != CACHE]
    if len(caches) > 1:
        raise UnknownMethodError(
            f"composition {label!r} has {len(caches)} caches ({', '.join(caches)}): each decides which blocks run on "
            "a call, so they cannot share a model; compose one cache with one token-reduction method"
        )
    if len(others) > 1:
        raise UnknownMethodError(
            f"composition {label!r} has {len(others)} token-reduction methods ({', '.join(others)}): they all drive "
            "the transformer blocks through the adapter's one block planner per block, so one would replace the "
            "other's forward; compose at most one of them with a cache"
        )
    ordered = tuple(c for c in classes if c.kind == CACHE) + tuple(c for c in classes if c.kind != CACHE)
    built = _BUILT.get(ordered)
    if built is not None:
        return built
    families = sorted(set.intersection(*(set(c.options) for c in ordered)))
    name = SEPARATOR.join(c.name for c in ordered)
    if not families:
        supports = "; ".join(f"{c.name} supports {', '.join(c.families())}" for c in ordered)
        raise UnknownMethodError(f"composition {name!r}: its members share no model family ({supports})")
    state = type(f"CompositeState[{name}]", (CompositeState,),
                 {"members": tuple((c.name, c.State) for c in ordered), "__module__": __name__})
    caveats = [f"{c.name}: {c.random_weights_caveat}" for c in ordered if c.random_weights_caveat]
    cls = type(f"Composite[{name}]", (Composite,), {
        "name": name,
        "summary": " + ".join(c.summary.split(":")[0] for c in ordered) + " (a cache outside, token reduction in "
                   "the blocks it recomputes)",
        "members": ordered,
        "options": {family: CompositeOptions for family in families},
        "presets": {},
        "State": state,
        "random_weights_caveat": "; ".join(caveats),
        "compile_support": combined_compile_support(ordered, families),
        "__module__": __name__,
    })
    cls.presets = declared_presets(cls)
    _BUILT[ordered] = cls
    return cls


def split_options(name: str, members: Sequence[type[Method]], family: str,
                  values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"tome": {"ratio": 0.5}, "deepcache.cache_interval": 3}`` -> ``{"deepcache": {...}, "tome": {...}}``."""
    out: dict[str, dict[str, Any]] = {m.name: {} for m in members}

    def put(member: str, option: str, value: Any) -> None:
        if option in out[member]:
            raise InvalidOptionError(f"{name}: option {member}.{option} is given twice; give it once")
        out[member][option] = value

    for key, value in values.items():
        if key in out:
            if not isinstance(value, Mapping):
                raise InvalidOptionError(f"{name}: {key}= takes a dict of {key}'s options, e.g. {key}={{...}}, "
                                         f"got {value!r}")
            for option, v in value.items():
                put(key, str(option), v)
            continue
        member, dot, option = key.partition(".")
        if dot and member in out and option:
            put(member, option, value)
            continue
        owners = [m.name for m in members
                  if family in m.options and key in {r["name"] for r in m.describe_options(family)}]
        hint = (f"write {owners[0]}.{key}=... or {owners[0]}={{{key!r}: ...}}" if owners else
                f"address a member's option as member.option or member={{...}}; members: {', '.join(out)}")
        raise InvalidOptionError(f"{name} ({family}): option {key!r} does not name a member of {name}; {hint}")
    return out


def declare_composition(**member_presets: str) -> None:
    """Declare a composition with one preset: ``declare_composition(deepcache="interval3", tome="ratio0.5")``.

    The composition is listed (``tokred.list_methods()``, ``tokred list``, ``tokred bench``) once every member is
    registered, with the preset ``interval3+ratio0.5`` (the members' presets, cache first) in each family where
    every member has its preset. Declaring the same members again adds another preset."""
    if len(member_presets) < 2:
        raise ValueError("declare_composition needs two members or more, each with one of its presets")
    _DECLARED.append(dict(member_presets))
    for key in [k for k, cls in _BUILT.items() if set(member_presets) == set(cls.member_names())]:
        del _BUILT[key]  # rebuilt with the new preset on next use


def declared_presets(cls: type[Composite]) -> dict[str, dict[str, dict[str, Any]]]:
    """The presets of ``cls`` from :func:`declare_composition`, per family."""
    members = {m.name: m for m in cls.members}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for declared in _DECLARED:
        if set(declared) != set(members):
            continue
        for family in cls.families():
            # a member's preset "default" is its default options, as in the benchmarks' selections
            tables = [(m, {"default": {}, **((m.presets or {}).get(family) or {})}) for m in cls.members]
            if not all(declared[m.name] in table for m, table in tables):
                continue
            preset = SEPARATOR.join(declared[m.name] for m in cls.members)
            out.setdefault(family, {})[preset] = {
                f"{m.name}.{k}": v for m, table in tables for k, v in table[declared[m.name]].items()
            }
    return out


def declared_names() -> list[str]:
    """The canonical names of the declared compositions whose members are all registered."""
    from .registry import methods

    registered, names = set(methods.names()), []
    for declared in _DECLARED:
        if not set(declared) <= registered:
            continue  # a member not registered (yet): not listed
        try:
            cls = composite_method(list(declared))
        except TokredError as err:  # a declaration its members refuse: said, not listed, nothing else breaks
            warnings.warn(f"declared composition {'+'.join(declared)} is not listed: {err}", TokredWarning,
                          stacklevel=2)
            continue
        if cls.name not in names:
            names.append(cls.name)
    return names
