"""Run state shared by the blocks of one patched model.

For diffusion models a *generation* is one sampling run (one ``pipe(...)`` call); its *steps* are the
denoiser's own calls, counted from 1 as the official CA-ToMe pipeline does. The state is reset at the start
of every generation, so nothing (random destinations, cached pairs, cached activations) leaks from one
image to the next, and the same seed gives the same image twice. A generation starts when the pipeline's
*current* scheduler holds new timesteps (every pipeline calls ``scheduler.set_timesteps`` once per call) or
when the timestep goes up (a bare denoiser driven by hand).

Each method keeps what it remembers in its own typed state class (:class:`~tokred.method.MethodState`),
held here as :attr:`RunState.method` and reset with every generation.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .method import MethodState


class RunState:
    """Step counter, generation counter, the method's state and the patch's private random generator.

    Public, read-only for methods: ``step`` (1-based denoiser call of this generation; 0 before the first),
    ``generation`` (generations started), ``latent_size`` ((h, w) of the denoiser's input), ``expected_calls``
    (denoiser calls this generation will make, when the pipeline's scheduler says so; else None),
    ``auxiliary`` (the current call is an extra pass of the same step, e.g. SD3.5 skip-layer guidance, which
    runs unreduced and does not count as a step), ``method`` (the method's state).
    """

    def __init__(self, seed: int | None = None, method: MethodState | None = None) -> None:
        from .method import MethodState

        self.seed = seed
        self.method: MethodState = method if method is not None else MethodState()
        self.step = 0
        self.generation = 0
        self.latent_size: tuple[int, int] | None = None
        self.expected_calls: int | None = None
        self.auxiliary = False
        self.last_timestep: float | None = None
        self._timesteps: Any = None  # the scheduler timesteps object of the current generation
        self._generators: dict[torch.device, torch.Generator] = {}
        # compiled draws (CompiledDraws): the op finds this state by its key, and mutates _draw_order so that a
        # compiled graph keeps its draws in program order (an op with a side effect is never reordered or merged)
        self._draw_key = next(_keys)
        self._draw_order = torch.zeros(1)
        _LIVE[self._draw_key] = weakref.ref(self)
        # tokred 0.2's ``state.call`` dict, now a deprecated view the adapter provides (timm ViTs: merged tokens)
        self.legacy_call: Callable[[], dict[str, Any]] | None = None

    @property
    def call(self) -> dict[str, Any]:
        """Deprecated (tokred 0.2; removed in 0.4): a dict with the ViT's ``"size"`` (and ``"source"``). Use
        ``patch.adapter.merged_tokens.size`` / ``.source``."""
        warnings.warn(
            "patch.state.call is deprecated and will be removed in tokred 0.4; use patch.adapter.merged_tokens "
            "(.size, .source) on timm ViTs",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.legacy_call() if self.legacy_call is not None else {}

    def reset(self) -> None:
        """Start a new generation: forget steps, the method's state and random streams."""
        self.step = 0
        self.generation += 1
        self.last_timestep = None
        self.expected_calls = None
        self._generators.clear()
        self.method.reset()

    def follow_scheduler(self, timesteps: Any, expected_calls: int | None) -> None:
        """The pipeline's current scheduler holds ``timesteps``; a new object there starts a new generation."""
        if timesteps is not None and timesteps is not self._timesteps:
            self._timesteps = timesteps
            self.reset()
            self.expected_calls = expected_calls

    def begin_call(self, timestep: Any = None, auxiliary: bool = False) -> None:
        """Called before each denoiser call. A timestep above the previous one means a new generation.

        Samplers walk the timesteps downwards, so a jump up can only be the start of another generation.
        This keeps a bare denoiser (no pipeline to read a scheduler from) correct without any pipeline code.
        An ``auxiliary`` call is a second pass of the current step and does not count.
        """
        self.auxiliary = auxiliary
        if auxiliary:
            return
        t = _as_float(timestep)
        if t is not None and self.last_timestep is not None and t > self.last_timestep:
            self.reset()
        self.last_timestep = t if t is not None else self.last_timestep
        self.step += 1
        self.method.begin_call()

    def generator(self, device: torch.device) -> torch.Generator | CompiledDraws:
        """The random generator for ``device`` in this generation.

        While ``torch.compile`` traces a forward (a generator cannot be created or passed to an op inside a
        compiled graph) it returns a :class:`CompiledDraws` instead, whose draws the compiled graph makes through
        an opaque op that calls this very method at run time: the same generator, the same draws, in the same order.

        Without a seed it is forked from the global RNG of that device at first use in each generation,
        as tomesd forks it (so results match tomesd under the same ``torch.manual_seed``), but it starts
        afresh each generation instead of advancing forever. With a seed it is seeded with it.
        """
        if torch.compiler.is_compiling():
            return CompiledDraws(self)
        device = torch.device(device)
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self.seed is not None:
                gen.manual_seed(self.seed)
            elif device.type == "cpu":
                gen.set_state(torch.get_rng_state())
            elif device.type == "cuda":
                gen.set_state(torch.cuda.get_rng_state(device))
            else:  # devices without a forkable default generator: derive one from the CPU stream
                gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
            self._generators[device] = gen
        return gen


_keys = itertools.count()
_LIVE: dict[int, weakref.ref[RunState]] = {}


class CompiledDraws:
    """What :meth:`RunState.generator` gives inside a compiled forward: ``randint(high, size, like)`` draws as
    ``torch.randint(high, size, generator=state.generator(like.device))`` does, at run time, through the opaque
    op ``tokred::randint`` (so a compiled graph neither creates a generator nor guards on its state)."""

    def __init__(self, state: RunState) -> None:
        self.state = state

    def randint(self, high: int, size: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.ops.tokred.randint(self.state._draw_order, like, self.state._draw_key, high, list(size))


@torch.library.custom_op("tokred::randint", mutates_args=("order",))
def _randint(order: torch.Tensor, like: torch.Tensor, key: int, high: int, size: list[int]) -> torch.Tensor:
    state = _LIVE[key]()
    if state is None:
        raise RuntimeError("tokred::randint: the run state of this compiled draw no longer exists")
    generator = state.generator(like.device)
    order.add_(1)
    return torch.randint(high, size=size, device=generator.device, generator=generator).to(like.device)


@_randint.register_fake
def _(order: torch.Tensor, like: torch.Tensor, key: int, high: int, size: list[int]) -> torch.Tensor:
    return like.new_empty(size, dtype=torch.int64)


def _as_float(timestep: Any) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0 or timestep.device.type == "meta":  # meta: shapes only, no value to read
            return None
        return float(timestep.detach().max().item())
    try:
        return float(timestep)
    except (TypeError, ValueError):
        return None
