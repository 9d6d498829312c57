"""Run state shared by the blocks of one patched model.

For diffusion models a *generation* is one sampling run (one ``pipe(...)`` call); its *steps* are the
denoiser's own calls, counted from 1 as the official CA-ToMe pipeline does. The state is reset at the start
of every generation, so nothing (random destinations, cached pairs, cached activations) leaks from one
image to the next, and the same seed gives the same image twice.
"""

from __future__ import annotations

from typing import Any

import torch


class RunState:
    """Step counter, per-generation scratch space and the patch's private random generator."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.step = 0  # 1-based index of the current denoiser call; 0 before the first call
        self.generation = 0  # how many generations have started
        self.latent_size: tuple[int, int] | None = None  # (h, w) of the denoiser's input sample
        self.last_timestep: float | None = None
        self.scratch: dict[str, Any] = {}  # per-generation method state (caches); cleared by reset()
        self.call: dict[str, Any] = {}  # per-call state (ViT token sizes); cleared by begin_call()
        self._generators: dict[torch.device, torch.Generator] = {}

    def reset(self) -> None:
        """Start a new generation: forget steps, caches and random streams."""
        self.step = 0
        self.generation += 1
        self.last_timestep = None
        self.scratch.clear()
        self._generators.clear()

    def begin_call(self, timestep: Any = None) -> None:
        """Called before each denoiser call. A timestep above the previous one means a new generation.

        Samplers walk the timesteps downwards, so a jump up can only be the start of another generation.
        This keeps a bare U-Net (no pipeline to hook) correct without copying any pipeline code.
        """
        t = _as_float(timestep)
        if t is not None and self.last_timestep is not None and t > self.last_timestep:
            self.reset()
        self.last_timestep = t if t is not None else self.last_timestep
        self.step += 1
        self.call.clear()

    def generator(self, device: torch.device) -> torch.Generator:
        """The random generator for ``device`` in this generation.

        Without a seed it is forked from the global RNG of that device at first use in each generation,
        as tomesd forks it (so results match tomesd under the same ``torch.manual_seed``), but it starts
        afresh each generation instead of advancing forever. With a seed it is seeded with it.
        """
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


def _as_float(timestep: Any) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.detach().max().item())
    try:
        return float(timestep)
    except (TypeError, ValueError):
        return None
