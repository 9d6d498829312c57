"""The reduction points an adapter offers a method, and the plan a method returns for one block call.

Every adapter reproduces its model family's block forward once (``tokred/adapters/``) and asks the method's
*planner* what to do at each call of each block. The answer is a :class:`BlockPlan`, built from three kinds of
points:

=====================  ========================================================  =======================
point                  what the method supplies                                  used by
=====================  ========================================================  =======================
:class:`Sublayer`      ``reduce(x) -> x_small`` before a sublayer (self-         ToMe, CA-ToMe, CAT
                       attention, cross-attention, MLP) and ``restore(y_small)
                       -> y`` on its output
:class:`KeyValue`      the tokens self-attention's keys and values are           ToDo, CAT
                       projected from (queries keep the sublayer's own input),
                       and/or a hook on the projected keys and values
cached output          a :class:`Sublayer` whose ``restore`` writes the fresh    CAT
                       rows into a :class:`RowCache` (:func:`recompute_rows`)
:class:`TokenReduce`   (timm ViTs) after attention, ``choose(scores) ->          ToMe, CA-ToMe, EViT,
                       TokenReduction``: tokens merged, pruned or fused for the  ToFu, PiToMe; MCTF
                       rest of the network, chosen from :class:`AttentionScores`  (before attention)
                       (keys, the class token's attention row, the attention
                       matrix: only what the method asks for is computed); or
                       before attention, reusing the block's attention matrix
=====================  ========================================================  =======================

A plan holds no state of its own: anything a method remembers between calls lives in its typed state class
(:class:`tokred.method.MethodState`), and the plan's callables close over it. ``FULL_BLOCK`` (every point the
identity) makes the adapter's forward compute exactly what the library computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .merge import TokenReduction

Tokens = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class Sublayer:
    """How one sublayer sees the tokens: ``reduce`` on its input [B, N, C] -> [B, n, C], ``restore`` on its
    output [B, n, C] -> [B, N, C]."""

    reduce: Tokens = identity
    restore: Tokens = identity
    # Per-token positional data (Flux's rotary tables [B, N, D]) -> that of reduce's output tokens [B, n, D]: for
    # each reduced token, the position it stands at. Adapters of models with rotary embeddings need it whenever
    # ``reduce`` is not the identity; others ignore it.
    positions: Tokens | None = None

    @property
    def is_identity(self) -> bool:
        return self.reduce is identity and self.restore is identity


KEEP = Sublayer()


@dataclass(frozen=True)
class KeyValue:
    """Where self-attention's keys and values come from.

    ``tokens`` receives the sublayer's full (normalised, unreduced) input [B, N, C] and returns the tokens the
    keys and values are projected from (ToDo: the token grid downsampled); None: the same tokens as the queries.
    ``keys`` / ``values`` receive the projected keys / values [B, n, C] (before the split into heads) and return
    the ones attention uses (CAT: the fresh rows written into a cache of all tokens); None: unchanged.
    """

    tokens: Tokens | None = None
    keys: Tokens | None = None
    values: Tokens | None = None
    # Rotary models (Flux): the per-token positional data [B, N, D] -> that of the keys attention uses. None: the
    # queries' positions when keys come from the same tokens, every token's when ``keys`` returns all N of them.
    positions: Tokens | None = None

    @property
    def is_identity(self) -> bool:
        return self.tokens is None and self.keys is None and self.values is None


SAME_TOKENS = KeyValue()


@dataclass(frozen=True)
class AttentionScores:
    """What a ViT block's attention computed besides its output, for :class:`TokenReduce`'s ``choose``.

    ``tokens`` [B, N, C]: the tokens after attention's residual (what is reduced; the MLP runs on the result);
    ``keys`` [B, N, Ch]: the attention keys averaged over heads (ToMe's metric), always there;
    ``size`` [B, N, 1]: how many input tokens each token stands for (None while nothing was merged or fused);
    ``cls_attention`` [B, N]: the class token's (query 0) attention over all keys, averaged over heads, when
    the plan asked for it (``TokenReduce(cls_attention=True)``), else None;
    ``attention`` [B, H, N, N]: the attention probabilities, when asked for (``attention=True``), else None;
    ``num_protected``: the prefix tokens (cls, distillation, registers) a method must keep in front;
    ``call``: the block call.

    Both attention scores include proportional attention's ``log(size)`` bias when the block uses it. With
    fused attention they are computed next to it (one extra query row, or the explicit matrix) and their
    matmuls show up in FLOP counts; with ``fused_attn=False`` the explicit matrix is reused.
    """

    tokens: torch.Tensor
    keys: torch.Tensor
    size: torch.Tensor | None
    num_protected: int
    call: BlockCall
    cls_attention: torch.Tensor | None = None
    attention: torch.Tensor | None = None


@dataclass(frozen=True)
class TokenReduce:
    """The ViT reduction point: between attention and the MLP, ``choose(scores: AttentionScores)`` returns a
    :class:`~tokred.merge.TokenReduction` (a merge, a pruning, a fused token; tokens removed for the rest of
    the network) or None (keep every token). ``cls_attention`` / ``attention`` ask attention to compute the
    class token's attention row / the full attention matrix for ``choose``.

    ``before_attention=True`` (MCTF's one-step-ahead attention) moves the point before attention: the block's
    attention probabilities are computed explicitly from its input (``scores.tokens`` is then the block input and
    ``scores.attention`` is always given), the reduction is applied to the input, and attention runs on the reduced
    tokens with the reduction's :meth:`~tokred.merge.TokenReduction.reduce_attention` of those probabilities (the
    values are projected from the reduced tokens; queries and keys are not recomputed)."""

    choose: Callable[[AttentionScores], TokenReduction | None]
    cls_attention: bool = False
    attention: bool = False
    before_attention: bool = False


@dataclass(frozen=True)
class BlockPlan:
    """What one call of one transformer block does. Fields an adapter's block lacks are ignored (a U-Net block
    has no ``attn2``-style second self-attention; an MMDiT block has no cross-attention)."""

    # The defaults are factories, not the shared instances themselves: torch.compile (dynamo) cannot build a
    # dataclass whose __init__ defaults are user-class instances ("Unexpected type in sourceless builder"), and
    # methods build plans inside the compiled forward.
    attn: Sublayer = field(default_factory=lambda: KEEP)  # self-attention (joint attention's image stream on MMDiT)
    kv: KeyValue = field(default_factory=lambda: SAME_TOKENS)  # keys/values of that self-attention
    cross: Sublayer = field(default_factory=lambda: KEEP)  # cross-attention (U-Net)
    attn2: Sublayer = field(default_factory=lambda: KEEP)  # second image self-attention (SD3.5 dual attention)
    kv2: KeyValue = field(default_factory=lambda: SAME_TOKENS)
    mlp: Sublayer = field(default_factory=lambda: KEEP)
    tokens: TokenReduce | None = None  # after attention, for the rest of the network (timm ViTs)

    @property
    def is_full(self) -> bool:
        points = (self.attn, self.kv, self.cross, self.attn2, self.kv2, self.mlp)
        return self.tokens is None and all(p.is_identity for p in points)


FULL_BLOCK = BlockPlan()


@dataclass(frozen=True)
class RowPlans:
    """One plan per batch row: the adapter runs the block once per row (each row may end with another token
    count inside the block). CA-ToMe's ``batch_independent`` mode uses it."""

    rows: tuple[BlockPlan, ...]


@dataclass(frozen=True)
class Grid:
    """The 2-D layout of a block's tokens: ``h x w`` in row-major order, at ``downsample`` times coarser than the
    denoiser's input (1 for the full-resolution blocks of a U-Net and for every MMDiT block)."""

    h: int
    w: int
    downsample: int = 1

    @property
    def tokens(self) -> int:
        return self.h * self.w


@dataclass(frozen=True)
class BlockCall:
    """What a planner is told about the block call it plans.

    ``name``: the block's module name in the model; ``index``: its position among the adapter's blocks;
    ``level``: the downsampling level the block belongs to (U-Net: 1, 2, 4, 8 from the architecture; 1 elsewhere);
    ``grid``: its token grid in this call (None when the tokens do not form the expected grid, e.g. odd sizes);
    ``step``: the 1-based denoiser call of the current generation (0 for models without steps).

    The adapters give the run state as the sixth argument instead of its step (``BlockCall(..., state)``): the
    step is then read from it only when a planner asks for ``call.step``. Under ``torch.compile`` a read Python int
    becomes a guard on its value, so a planner that never reads the step (ToMe, ToDo) must not have it read for
    it, or the compiled denoiser would recompile at every step.
    """

    name: str
    index: int
    module: torch.nn.Module = field(repr=False, compare=False)
    level: int
    grid: Grid | None
    step_source: Any = field(repr=False, compare=False)  # an int, or the run state (its .step at read time)

    @property
    def step(self) -> int:
        source = self.step_source
        return source if isinstance(source, int) else source.step


_block_call_init = BlockCall.__init__


def _block_call_init_with_step(self, *args, step: int | None = None, **kwargs) -> None:
    # ``step=`` (the field's name before 0.3) keeps working as the keyword for ``step_source``.
    if step is not None:
        kwargs["step_source"] = step
    _block_call_init(self, *args, **kwargs)


BlockCall.__init__ = _block_call_init_with_step  # type: ignore[method-assign]


# planner(call, hidden_states [B, N, C]) -> the plan for this call of this block
Planner = Callable[[BlockCall, torch.Tensor], "BlockPlan | RowPlans"]


# --- cached sublayer outputs ----------------------------------------------------------------------------------


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` [B, M] of ``x`` [B, N, C] -> [B, M, C]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class RowCache:
    """The last full [B, N, C] value of one sublayer output (or of keys/values), updated row-wise.

    ``record(full)`` keeps a full value; ``update(index, rows)`` overwrites rows ``index`` [B, M] with ``rows``
    [B, M, C] and returns the whole cached tensor. Without gradients the update is in place. Under autograd
    (``rows`` requiring grad) the cache holds values only (a detached copy, so no graph outlives its call) and
    the returned tensor is a new one whose fresh rows carry the gradient; the cached rows are constants.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def record(self, full: torch.Tensor) -> torch.Tensor:
        self.value = full.detach().clone() if full.requires_grad else full
        return full

    def update(self, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("RowCache.update before record: nothing cached for this sublayer")
        index = index[..., None].expand(-1, -1, self.value.shape[-1])
        rows = rows.to(self.value.dtype)
        if rows.requires_grad:
            full = self.value.scatter(1, index, rows)  # out of place: the gradient reaches the fresh rows
            self.value = full.detach().clone()
            return full
        return self.value.scatter_(1, index, rows)


def record_output(cache: RowCache) -> Sublayer:
    """A full sublayer whose output is kept in ``cache`` (the call before a pruned one)."""
    return Sublayer(identity, cache.record)


def recompute_rows(index: torch.Tensor, cache: RowCache) -> Sublayer:
    """The sublayer runs on rows ``index`` only; the other rows take their cached output."""
    def rows(x: torch.Tensor) -> torch.Tensor:
        return gather_rows(x, index)

    return Sublayer(rows, lambda y: cache.update(index, y), positions=rows)


# --- applying a KeyValue to a diffusers Attention ---------------------------------------------------------------


class KVSlot:
    """The tokens :func:`kv_source` routes into one attention's ``to_k`` / ``to_v`` during a call, read by the
    pre-hooks :func:`install_kv_routing` registers once. Hooks registered inside a forward cannot be compiled
    (``torch.compile`` refuses to build a ``RemovableHandle``); setting this slot's field can."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None


KV_SLOT_ATTR = "_tokred_kv_slot"


def install_kv_routing(patch: Any, attn: torch.nn.Module) -> None:
    """Give ``attn`` (diffusers' ``Attention``) a :class:`KVSlot` and the pre-hooks on ``to_k`` / ``to_v`` that read
    it, until the patch is removed; :func:`kv_source` then sets the slot instead of registering hooks of its own at
    every call (so a compiled forward can use it). (:func:`projected_kv`'s output hooks have their own slot,
    :func:`install_projected_kv_routing`.)"""
    if getattr(attn, KV_SLOT_ATTR, None) is not None:
        return
    slot = KVSlot()
    patch.set_attr(attn, KV_SLOT_ATTR, slot)

    def replace(module: Any, args: tuple) -> tuple | None:
        return None if slot.tokens is None else (slot.tokens, *args[1:])

    for linear in (attn.to_k, attn.to_v):
        patch.register_forward_pre_hook(linear, replace)


@contextlib.contextmanager
def kv_source(attn: torch.nn.Module, tokens: torch.Tensor | None) -> Iterator[None]:
    """While active, ``attn.to_k`` / ``attn.to_v`` (diffusers' ``Attention``) project ``tokens`` instead of their
    input: ``KeyValue.tokens`` for processors that project keys and values from the queries' own tensor (SD3's
    ``JointAttnProcessor2_0``, whose text stream uses ``add_k_proj`` / ``add_v_proj`` and is left alone). The
    tokens are computed once per call by the caller; the hooks live for one call only."""
    if tokens is None:
        yield
        return
    slot = getattr(attn, KV_SLOT_ATTR, None)
    if slot is not None:
        slot.tokens = tokens
        try:
            yield
        finally:
            slot.tokens = None
        return

    def replace(module: Any, args: tuple) -> tuple:
        return (tokens, *args[1:])

    handles = [attn.to_k.register_forward_pre_hook(replace), attn.to_v.register_forward_pre_hook(replace)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ProjectedKVSlot:
    """The rewrites :func:`projected_kv` applies to one attention's projected keys and values during a call, read
    by the output hooks :func:`install_projected_kv_routing` registers once (so a compiled forward can use them)."""

    def __init__(self) -> None:
        self.keys: Tokens | None = None
        self.values: Tokens | None = None
        self.seen: list[int] | None = None


PROJECTED_KV_SLOT_ATTR = "_tokred_projected_kv_slot"


def _rewritten(fn: Tokens, out: torch.Tensor, seen: list[int] | None) -> torch.Tensor:
    """A projection's output rewritten by ``fn``, its key count appended to ``seen`` (when collecting)."""
    new = fn(out)
    if seen is not None:
        seen.append(int(new.shape[1]))
    return new


def install_projected_kv_routing(patch: Any, attn: torch.nn.Module) -> None:
    """Give ``attn`` (diffusers' ``Attention``) a :class:`ProjectedKVSlot` and output hooks on ``to_k`` / ``to_v``
    that apply it, until the patch is removed; :func:`projected_kv` then fills the slot instead of registering
    hooks at every call, which ``torch.compile`` cannot trace (CAT pruning's key/value cache under
    ``fullgraph=True``). Only compiled calls use them: they are registered when the method is applied, so a hook
    a user registers on the projections later runs after them there (and sees the rewritten keys/values); eager
    calls keep :func:`projected_kv`'s per-call hooks, which run last."""
    if getattr(attn, PROJECTED_KV_SLOT_ATTR, None) is not None:
        return
    slot = ProjectedKVSlot()
    patch.set_attr(attn, PROJECTED_KV_SLOT_ATTR, slot)

    def rewrite(keys: bool) -> Callable[[Any, Any, torch.Tensor], torch.Tensor | None]:
        def hook(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor | None:
            fn = slot.keys if keys else slot.values
            return None if fn is None else _rewritten(fn, out, slot.seen)

        return hook

    patch.register_forward_hook(attn.to_k, rewrite(True))
    patch.register_forward_hook(attn.to_v, rewrite(False))


@contextlib.contextmanager
def projected_kv(attn: torch.nn.Module, kv: KeyValue, seen: list[int] | None = None) -> Iterator[None]:
    """While active, ``kv.keys`` / ``kv.values`` rewrite the outputs of ``attn.to_k`` / ``attn.to_v`` (diffusers'
    ``Attention``), so the library's own attention processor computes attention with them; ``seen`` collects
    the key count attention used. Eager: with hooks that live for one call only, so they run after every hook
    on the projections (what a user's hook reads is the projection's own output). While ``torch.compile`` traces
    it, which cannot register hooks: through the attention's :class:`ProjectedKVSlot` when it has one."""
    if kv.keys is None and kv.values is None:
        yield
        return
    slot = getattr(attn, PROJECTED_KV_SLOT_ATTR, None)
    if slot is not None and torch.compiler.is_compiling():
        slot.keys, slot.values, slot.seen = kv.keys, kv.values, seen
        try:
            yield
        finally:
            slot.keys = slot.values = slot.seen = None
        return
    handles = []

    def hook(fn: Tokens) -> Callable[[Any, Any, torch.Tensor], torch.Tensor]:
        def rewrite(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
            return _rewritten(fn, out, seen)

        return rewrite

    try:
        if kv.keys is not None:
            handles.append(attn.to_k.register_forward_hook(hook(kv.keys)))
        if kv.values is not None:
            handles.append(attn.to_v.register_forward_hook(hook(kv.values)))
        yield
    finally:
        for handle in handles:
            handle.remove()
