"""The interface every token-reduction method implements, and the base of its typed state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .adapters.base import Adapter
    from .patch import Patch

# The kinds a method declares (Method.kind); "other" for a method that declares none.
KINDS = ("merge", "prune", "downsample", "cache", "composite", "other")


class MethodState:
    """What a method remembers while it runs (caches, counters, per-call diagnostics).

    Subclass it with typed attributes and set it as the method's ``State``. The run state creates one per
    patch, calls :meth:`reset` at the start of every generation (diffusion) and :meth:`begin_call` before
    every counted denoiser call, like the state classes of diffusers' hooks. The instance is
    ``patch.method_state``.
    """

    def reset(self) -> None:
        """Forget everything of the previous generation."""

    def begin_call(self) -> None:
        """A new denoiser call starts (per-call scratch is cleared here)."""


class Method:
    """A token-reduction method: a policy of which tokens to reduce, and when.

    Subclasses set ``name`` (through :func:`tokred.register_method`), ``options`` (one options dataclass per
    supported model family; see :mod:`tokred.options`), optionally ``presets`` (named option sets per family,
    used by the benchmarks: a ladder ordered from the mildest to the strongest, which the leaderboard joins in
    that order and whose two ends the main job runs) and ``State`` (a :class:`MethodState` subclass), and
    implement :meth:`install`.

    ``install`` receives a fresh :class:`~tokred.patch.Patch` whose adapter drives the model's blocks: the
    method hands the adapter a planner (``patch.adapter.install_blocks(patch, planner)``) that returns a
    :class:`~tokred.reduction.BlockPlan` for each block call. Any other change to the model must go through
    the patch's recording methods so that ``remove()`` can undo it.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # What the method does to the computation, one of KINDS (shown by `tokred list` and in the leaderboard's kind
    # column): "merge" (tokens merged and unmerged: ToMe, CA-ToMe), "prune" (tokens dropped or their outputs
    # reused: CAT pruning), "downsample" (attention's keys/values from fewer tokens: ToDo), "cache" (whole block
    # outputs reused across denoiser calls: DeepCache), "composite" (several methods as one patch, see
    # tokred.compose). A method that does not say is "other"; only "cache" changes how methods compose (a cache
    # is the outer member of a composition).
    kind: ClassVar[str] = "other"
    options: ClassVar[dict[str, type]] = {}
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}
    State: ClassVar[type[MethodState]] = MethodState
    # A caveat benchmarks print for this method's rows on random weights, where what it reduces depends on
    # trained features (e.g. a similarity threshold); "" when random weights reduce as trained ones do.
    random_weights_caveat: ClassVar[str] = ""
    # Why the method refuses a model family it has no options for (family -> reason), said in apply's error.
    refusals: ClassVar[dict[str, str]] = {}
    # How the patched model composes with torch.compile (issue 20), for every family (a str) or per family (a dict
    # family -> str): "fullgraph" (compiles with fullgraph=True, matches eager, recompiles a bounded number of
    # times; tested), "island: <what>" (<what> runs in a torch.compiler.disable island, so fullgraph=True is not
    # possible but the rest compiles), "no: <why>". None: untested. Read it with compile_support_for(family).
    compile_support: ClassVar[str | dict[str, str] | None] = None

    def __init__(self, options: Any) -> None:
        self.options = options

    @classmethod
    def families(cls) -> list[str]:
        return sorted(cls.options)

    def warmup_calls(self) -> int:
        """How many denoiser calls a generation makes before this method does the work of its later calls
        (0: every call alike). Benchmarks that time single denoiser calls run these first, untimed, so that the
        timed calls are the ones that make up most of a generation. CAT pruning: its ``t0`` full calls."""
        return 0

    def cycle_calls(self) -> int | None:
        """How many consecutive denoiser calls (after :meth:`warmup_calls`) make one period of this method's work.

        1 (the default): every call does the same work, so one call is a fair timed unit. A cache whose calls
        differ (DeepCache: one full call, then ``cache_interval - 1`` reusing ones) returns its period, and the
        benchmarks time and count a whole cycle of that many calls, the baseline's alike. None: the calls are not
        periodic (a non-uniform schedule, a threshold decided at run time); then only a whole generation is a
        fair unit, and the per-call benchmarks refuse the method with that reason."""
        return 1

    @classmethod
    def compile_support_for(cls, family: str) -> str | None:
        """:attr:`compile_support` for ``family`` models (None: untested)."""
        support = cls.compile_support
        return support.get(family) if isinstance(support, dict) else support

    @classmethod
    def parse_options(cls, family: str, values: dict[str, Any]) -> Any:
        """The options of ``family`` from ``tokred.apply``'s keyword arguments (the family's options dataclass;
        composites override this to take their members' options)."""
        from .options import parse_options

        return parse_options(cls.options[family], values, context=f"{cls.name} ({family})")

    @classmethod
    def describe_options(cls, family: str) -> list[dict[str, Any]]:
        """Name, default, valid range and doc of each option of ``family`` (``tokred list``)."""
        from .options import describe

        return describe(cls.options[family])

    @classmethod
    def unsupported_reason(cls, family: str) -> str:
        """Why this method does not apply to ``family`` models (a family without options; ``refusals`` may say
        why)."""
        reason = cls.refusals.get(family)
        return (f"method {cls.name!r} does not support {family} models" + (f" ({reason})" if reason else "")
                + f"; it supports: {', '.join(cls.families())}")

    def option_values(self) -> dict[str, Any]:
        """The parsed options as keyword arguments for :func:`tokred.apply` (they give the same options again)."""
        import dataclasses

        return {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)}

    def check(self, adapter: Adapter) -> None:
        """Raise :class:`~tokred.errors.TokredError` if this model cannot take these options."""

    def install(self, patch: Patch) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement install()")
