"""The interface every token-reduction method implements, and the base of its typed state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .adapters.base import Adapter
    from .patch import Patch


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
    options: ClassVar[dict[str, type]] = {}
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}
    State: ClassVar[type[MethodState]] = MethodState
    # A caveat benchmarks print for this method's rows on random weights, where what it reduces depends on
    # trained features (e.g. a similarity threshold); "" when random weights reduce as trained ones do.
    random_weights_caveat: ClassVar[str] = ""
    # Why the method refuses a model family it has no options for (family -> reason), said in apply's error.
    refusals: ClassVar[dict[str, str]] = {}

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

    def check(self, adapter: Adapter) -> None:
        """Raise :class:`~tokred.errors.TokredError` if this model cannot take these options."""

    def install(self, patch: Patch) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement install()")
