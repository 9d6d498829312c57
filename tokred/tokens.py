"""Per-block token counts: what every patched block really computed, recorded by the adapters.

``patch.token_counts()`` gives, for each block the adapter drives, the mean over the calls since
``patch.reset_token_counts()`` (or since ``apply``) of

* ``tokens``: tokens entering the block (the unreduced count for methods that restore tokens inside the block),
* ``attn``: query tokens of self-attention, ``kv``: its key/value tokens,
* ``cross``: query tokens of cross-attention (None where the block has none),
* ``mlp``: tokens through the MLP,

and ``calls``, how many calls the means cover. The counts are plain Python integers read from tensor shapes,
so recording them costs no device synchronisation.

Calls run by a ``torch.compile``'d model are not counted: the sums are Python integers, and reading them inside
the compiled graph would make a guard on their values, so the model would recompile at every call (issue 20).
Count tokens with an eager call (the counts are the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockTokens:
    """Mean token counts of one block over ``calls`` calls (see the module docstring)."""

    tokens: float
    attn: float
    kv: float
    mlp: float
    cross: float | None
    calls: int


class TokenCounter:
    """Sums of token counts per block name; :meth:`means` turns them into :class:`BlockTokens`."""

    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = {}  # name -> [calls, tokens, attn, kv, mlp, cross, cross_calls]
        # name -> the last call's (tokens, attn, kv, mlp, cross)
        self._last: dict[str, tuple[int, int, int, int, int | None]] = {}

    def record(self, name: str, tokens: int, attn: int, kv: int, mlp: int, cross: int | None = None) -> None:
        if torch.compiler.is_compiling():
            # Counting inside a compiled forward would read (and guard on) the running sums, recompiling at every
            # call; the counts are diagnostics, taken from eager calls (benchmarks count tokens uncompiled).
            return
        row = self._sums.get(name)
        if row is None:
            row = self._sums[name] = [0, 0, 0, 0, 0, 0, 0]
        row[0] += 1
        row[1] += tokens
        row[2] += attn
        row[3] += kv
        row[4] += mlp
        self._last[name] = (tokens, attn, kv, mlp, cross)
        if cross is not None:
            row[5] += cross
            row[6] += 1

    def calls(self, name: str) -> int:
        """How many calls of block ``name`` are recorded (a wrapper compares it before and after a call to learn
        whether a forward inside it recorded that call)."""
        if torch.compiler.is_compiling():
            return 0  # nothing is recorded while compiling (see record)
        row = self._sums.get(name)
        return int(row[0]) if row is not None else 0

    def reused(self, name: str, attn: bool = False, kv: bool = False, mlp: bool = False, cross: bool = False) -> None:
        """The last recorded call of block ``name`` did not compute the sublayers named true: it reused their
        outputs (a cache inside the block, e.g. pyramid attention broadcast), so they count 0 tokens on it."""
        if torch.compiler.is_compiling():
            return
        last = self._last.get(name)
        row = self._sums.get(name)
        if last is None or row is None:
            return
        tokens, a, k, m, c = last
        for flag, index, value in ((attn, 2, a), (kv, 3, k), (mlp, 4, m), (cross and c is not None, 5, c)):
            if flag:
                row[index] -= value
        self._last[name] = (
            tokens, 0 if attn else a, 0 if kv else k, 0 if mlp else m, 0 if cross and c is not None else c
        )

    def reset(self) -> None:
        self._sums.clear()
        self._last.clear()

    def means(self) -> dict[str, BlockTokens]:
        out = {}
        for name, (calls, tokens, attn, kv, mlp, cross, cross_calls) in self._sums.items():
            out[name] = BlockTokens(
                tokens=tokens / calls,
                attn=attn / calls,
                kv=kv / calls,
                mlp=mlp / calls,
                cross=cross / cross_calls if cross_calls else None,
                calls=int(calls),
            )
        return out
