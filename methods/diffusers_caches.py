"""diffusers' own cache hooks as tokred methods: first-block cache and pyramid attention broadcast (SD3/SD3.5,
PixArt-α/Σ and DiT-XL/2, Flux.1).

``torch.compile`` (issue 20). The first-block cache's decision compares the first block's residual change with the
threshold on the host (a ``.item()``), and diffusers makes it a ``torch.compiler.disable`` function
(``FBCHeadBlockHook._should_compute_remaining_blocks``): ``fullgraph=True`` refuses it ("Skip inlining
torch.compiler.disable()d function"); without ``fullgraph`` that decision is an island and the rest compiles, a
number of graphs that does not grow with the steps (the tiny test models, 10, 20 and 40 steps alike: 8 compiled
frames on PixArt, 7 on SD3, 10 on Flux, 5 graph breaks). Pyramid attention broadcast compiles with
``fullgraph=True``, one graph per outcome (compute or reuse; with PixArt's cross-attention broadcast one per pair of
outcomes, at most 4): diffusers' hook decides inside the attention's forward from a Python iteration count and the
timestep, which a compiled forward guards on (a recompilation at every step until dynamo's limit); ``tokred:`` the
same rule is applied in a denoiser pre-hook outside the graph and the hook reads only its outcome
(:func:`_decided_broadcast_hook`), with the same outputs as diffusers' hook.

Both are thin wrappers: the caching decisions and the reuse are diffusers' hooks (``diffusers.hooks``, 0.42.1),
registered by diffusers' own ``apply_first_block_cache`` / ``apply_pyramid_attention_broadcast`` (pyramid
attention broadcast's hooks then swapped for a subclass that reads a decision made before the call, above). tokred
adds what SD3's ``SD3Transformer2DModel`` does not provide and what a tokred patch promises:

* **The cache context.** The hooks keep their state per *cache context*, which diffusers sets through
  ``CacheMixin.cache_context`` in the pipelines of models that have it (``FluxPipeline``: ``"cond"`` and, with
  true CFG, ``"uncond"``); SD3's, PixArt's and DiT's transformers have none (without a context the first call
  raises ``ValueError: No cache context is set``). Where the pipeline set a context for the call, tokred keeps
  it; otherwise it sets one before every denoiser call, named after the latent's shape (``"tokred
  2x16x32x32"``): the pipeline's CFG-batched call (unconditional and conditional rows in one batch) is one
  context, as in diffusers' pipelines that batch guidance, and a call of another shape never mixes its residuals
  with this one's. (A loop that runs guidance as two calls of one shape per step without naming contexts would
  share the context between them; the SD3, PixArt and DiT pipelines batch guidance, Flux's names its calls.)
  Pyramid attention broadcast keeps one state per attention in diffusers; ``tokred:`` it keeps one per cache
  context the pipeline names, so Flux's true-CFG ``"uncond"`` call never reuses the ``"cond"`` call's
  attention (with no named context, one state per attention, as diffusers).
* **The reset.** The hooks' state is reset (diffusers' ``reset_state``) at the start of every generation (the
  run state's rule: new scheduler timesteps, or a rising timestep), so the same seed gives the same image.
* **Exact removal.** Every forward and ``_diffusers_hook`` registry that diffusers' registration sets is
  recorded in the patch, so ``remove()`` restores the unpatched model bit-exactly (a registry that was already
  there, e.g. layerwise casting's, keeps its own hooks and loses only ours).
* **Pause and auxiliary calls.** Paused calls (``patch.pause()``) and SD3.5's skip-layer-guidance passes
  (auxiliary calls, not counted as steps) bypass the hooks: they compute the unpatched blocks and leave the
  hooks' state alone.
* **Token counts.** A block that a cache skipped records its tokens entering and 0 computed tokens in every
  sublayer on that call; an attention that pyramid attention broadcast reused records 0 attention and key/value
  tokens (the MLP ran). Computed calls record their full counts, or a token method's counts where one runs
  inside (a composition).

Families. The methods apply to ``SD3Transformer2DModel`` (``diffusers_mmdit``: SD3, SD3.5),
``PixArtTransformer2DModel`` / ``DiTTransformer2DModel`` (``diffusers_dit``: their ``BasicTransformerBlock`` is
registered in diffusers' block metadata, output index 0, no text stream) and ``FluxTransformer2DModel``
(``diffusers_flux``: the 19 dual-stream ``FluxTransformerBlock`` then the 38 single-stream
``FluxSingleTransformerBlock``, both registered with ``(text, image)`` outputs; first-block caching runs the first
dual block, and the tail residuals are those of the last single block). Refused, each with its reason in
``Method.refusals``: the U-Net (first-block cache: its transformer blocks sit inside down/mid/up blocks between
resnets, not in a top-level block list the hooks select; pyramid attention broadcast: offered for diffusion
transformers only, as the paper and diffusers apply it; tokred's cache for the U-Net is ``deepcache``) and the timm
ViTs (one forward, no denoising steps to reuse across).

Composition (a token method in the same patch). The cache must be installed *after* the token method (the
cache outside, the token reduction inside the blocks it recomputes): ``install`` wraps whatever forward each
block or attention has at that moment (e.g. the MMDiT adapter's planned forward that ToDo installs) beneath
diffusers' hooks, so a recomputed block runs the token method and a skipped one runs nothing. Installed before,
the token method's forward would replace the cache's outer layer and the cache would never act. ``install(patch,
state)`` takes the state to use (default ``patch.method_state``), so a composite state can hand each member its
own; ``state.reset()`` must be called at every generation (the run state does so for ``patch.method_state``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokred import Method, register_method
from tokred.errors import TokredError, UnsupportedModelError
from tokred.method import MethodState
from tokred.options import int_at_least, is_number, option, optional

_MISSING = object()


class DiffusersHooksState(MethodState):
    """The diffusers hooks a method registered, as ``(hook, module)`` pairs, each reset with diffusers'
    ``hook.reset_state(module)`` at the start of every generation; ``ran``: the attention modules (by name) that
    computed during the current block call (pyramid attention broadcast's token counts); ``managers``: diffusers
    ``StateManager``s whose per-context states are dropped at every generation, keeping the context the pipeline
    set for the call under way (the reset happens inside that call); ``states``: other hook states to reset."""

    def __init__(self) -> None:
        self.hooks: list[tuple[Any, torch.nn.Module]] = []
        self.ran: set[str] = set()
        self.managers: list[Any] = []
        self.states: list[Any] = []  # hooks' own states set aside while a per-context one is in use

    def reset(self) -> None:
        contexts = [manager._context for manager in self.managers]
        for hook, module in self.hooks:
            hook.reset_state(module)
        for own in self.states:
            own.reset()
        for manager, context in zip(self.managers, contexts, strict=True):
            manager.reset()
            manager.set_context(context)  # tokred: a pipeline's cache_context for this call survives the reset
        self.ran.clear()


def _hidden_tokens(args: tuple, kwargs: dict) -> int:
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return int(hidden_states.shape[1])


def _bound_forward(module: torch.nn.Module) -> Callable[..., Any]:
    """The forward a call of ``module`` runs now: an instance forward (another method's, a user's) or the class's."""
    return vars(module).get("forward") or type(module).forward.__get__(module)


def _full_counts(block: torch.nn.Module, n: int, family: str) -> tuple[int, int, int, int, int | None]:
    """A block call that computed everything on ``n`` image tokens: (tokens, attn, kv, mlp, cross); ``cross`` is
    None where the block has no cross-attention (PixArt's ``attn2`` is one; SD3.5's ``attn2`` is a second
    self-attention)."""
    return n, n, n, n, (n if family == "diffusers_dit" and getattr(block, "attn2", None) is not None else None)


def _invalidate_context_fanout(root: torch.nn.Module) -> None:
    """diffusers' ``cache_context`` reaches the hooks through a cached list of the child registries on the root's
    registry; adding or removing ours stales it (``CacheMixin.enable_cache`` invalidates it the same way)."""
    registry = vars(root).get("_diffusers_hook")
    if registry is not None:
        registry.invalidate_child_registries_cache()


def _refuse_controlnet(method: str, kwargs: dict) -> None:
    """The transformers add ControlNet residuals after the blocks: on a call the first-block cache skips, the
    cached tail residual (which already holds them) and the residuals added again after each skipped block would
    count them twice."""
    names = ("block_controlnet_hidden_states", "controlnet_block_samples", "controlnet_single_block_samples")
    given = [n for n in names if kwargs.get(n) is not None]
    if given:
        raise UnsupportedModelError(
            f"{method}: the call passes ControlNet residuals ({', '.join(given)}), which the transformer adds after "
            "each block; on a skipped call diffusers' first-block cache would add them twice (once in the cached "
            "tail residual, once after each skipped block). Remove the cache or the ControlNet"
        )


def install_diffusers_hooks(
    patch: Any,
    targets: list[tuple[str, torch.nn.Module]],
    hook_names: tuple[str, ...],
    register: Callable[[], None],
    inner: Callable[[str, torch.nn.Module, Callable[..., Any]], Callable[..., Any]],
    outer: Callable[[str, torch.nn.Module, Callable[..., Any], Callable[..., Any]], Callable[..., Any]],
    state: DiffusersHooksState,
) -> None:
    """Register diffusers hooks (``register()``, which must hook only ``targets``) inside ``patch``.

    Each target gets three layers, innermost first: ``inner(name, module, below)``, a tokred forward around the
    forward the module had (``below``); diffusers' hook chain, which calls it when it computes; and ``outer(name,
    module, chain, inner_forward)``, a tokred forward that calls the chain (or ``inner_forward`` to bypass it).
    All three are recorded in the patch; paused calls pass straight through to ``below``. The registered hooks
    are kept in ``state.hooks`` for the per-generation reset.
    """
    from diffusers.hooks import HookRegistry

    root = patch.adapter.root
    target_ids = {id(m) for _, m in targets}
    before = {id(m): (vars(m).get("forward", _MISSING), "_diffusers_hook" in vars(m)) for m in root.modules()}
    existing: list[torch.nn.Module] = []
    for name, module in targets:
        if "_diffusers_hook" in vars(module):
            existing.append(module)
        else:
            patch.set_attr(module, "_diffusers_hook", HookRegistry(module))
        patch.replace_forward(module, inner(name, module, _bound_forward(module)))
    inners = {id(m): vars(m)["forward"] for _, m in targets}

    def drop_our_hooks(modules: list[torch.nn.Module]) -> None:
        """A registry that was there before keeps its own hooks and loses ours (the forwards are the patch's)."""
        for module in modules:
            registry = module._diffusers_hook
            saved = vars(module).get("forward", _MISSING)
            for hook_name in hook_names:
                if hook_name in registry.hooks:
                    registry.remove_hook(hook_name, recurse=False)
            if saved is _MISSING:
                vars(module).pop("forward", None)
            else:
                module.forward = saved

    patch.on_remove(
        lambda: drop_our_hooks(existing),
        on_copy=lambda memo: drop_our_hooks([memo[id(m)] for m in existing if memo.get(id(m), m) is not m]),
    )
    patch.on_remove(  # the fan-out is rebuilt at the next cache_context, without our registries
        lambda: _invalidate_context_fanout(root),
        on_copy=lambda memo: _invalidate_context_fanout(memo.get(id(root), root)),
    )
    try:
        register()
    finally:
        strays = [
            m for m in root.modules()
            if id(m) not in target_ids and before.get(id(m)) != (vars(m).get("forward", _MISSING),
                                                              "_diffusers_hook" in vars(m))
        ]  # fmt: skip
    if strays:
        raise TokredError(
            f"diffusers' registration changed {len(strays)} module(s) tokred did not expect "
            f"({', '.join(type(m).__name__ for m in strays[:3])}); the patch cannot undo them"
        )
    for name, module in targets:
        registry = module._diffusers_hook
        state.hooks.extend((registry.hooks[n], module) for n in hook_names if n in registry.hooks)
        chain = vars(module)["forward"]
        if chain is inners[id(module)]:
            continue  # diffusers left this one alone
        module.forward = inners[id(module)]  # recorded below: the patch sets the outer layer over the inner one
        patch.replace_forward(module, outer(name, module, chain, inners[id(module)]))
    _invalidate_context_fanout(root)  # a pipeline's cache_context reaches our hooks from now on


# --- first-block cache ---------------------------------------------------------------------------------------------
@dataclass
class FirstBlockCacheOptions:
    threshold: float = option(
        0.05,
        valid="number >= 0",
        check=lambda v: is_number(v) and v >= 0,
        doc="skip the remaining blocks when the first block's residual changed by less than this (relative "
        "abs-mean) since the last computed call; diffusers' default 0.05. Higher skips more: 0.05 to 0.2 "
        "recommended (0.05 diffusers' default, 0.2 its example on CogView4); 0 skips only an unchanged residual",
    )


class FirstBlockCacheState(DiffusersHooksState):
    """The hooks (:class:`DiffusersHooksState`) and the state manager they share, whose cache context tokred sets."""

    def __init__(self) -> None:
        super().__init__()
        self.state_manager: Any = None


@register_method("first_block_cache")
class FirstBlockCache(Method):
    """First-block cache (ParaAttention's dynamic caching, after TeaCache), diffusers' ``apply_first_block_cache``.

    Every call runs the first transformer block; when its residual (output minus input) changed by less than
    ``threshold`` (relative abs-mean) since the last call that computed everything, the other blocks are skipped
    and the image stream takes the first block's output plus the residual the other blocks added on that call.

    Options (diffusers' ``FirstBlockCacheConfig``, official name and default): ``threshold`` (0.05).

    Where we differ from calling ``apply_first_block_cache`` on the transformer: tokred sets the cache context
    where the pipeline does not (SD3, PixArt, DiT have no ``cache_context``; Flux's pipeline sets ``"cond"`` /
    ``"uncond"``, which tokred keeps) and resets the state every generation (module docstring). SD3's last joint
    block (``context_pre_only=True``) returns ``None`` for the text stream, from which diffusers' tail hook
    subtracts (``TypeError``); ``tokred:`` beneath the hooks that block returns its text stream unchanged, so the
    tail hook's text residual is zero-cost bookkeeping, and above the hooks ``None`` again, as the block does.
    SD3's transformer never reads that stream, so the image is diffusers' algorithm's. PixArt's and DiT's blocks
    return the image stream alone (diffusers' metadata: no text stream), Flux's ``(text, image)`` from both block
    types, which diffusers' hooks handle as they are. ``tokred:`` a call with ControlNet residuals (SD3's
    ``block_controlnet_hidden_states``, Flux's ``controlnet_block_samples``) is refused: the transformers add them
    after each block, so a skipped call would add them twice.
    """

    summary = "first-block cache: skip the other blocks while the first block's residual barely changes (diffusers)"
    kind = "cache"
    # diffusers decides whether to reuse in FBCHeadBlockHook._should_compute_remaining_blocks, a
    # torch.compiler.disable'd host comparison of the first block's residual change with the threshold: fullgraph
    # refuses it; without fullgraph the rest compiles, a bounded number of graphs (one per outcome after the island,
    # not one per step; tests/test_compile_diffusion.py checks 10 and 20 steps compile the same number of frames).
    # A compiled torch.cond per branch would need the skip and the per-block token counts as tensors, not diffusers'
    # per-block hooks and Python state: the island stays.
    compile_support = (
        "island: diffusers' cache decision (FBCHeadBlockHook._should_compute_remaining_blocks, a host read of the "
        "first block's residual change, torch.compiler.disable in diffusers); the rest compiles, a number of graphs "
        "that does not grow with the steps"
    )
    options = {family: FirstBlockCacheOptions for family in ("diffusers_mmdit", "diffusers_dit", "diffusers_flux")}
    presets = {
        family: {"threshold0.05": {"threshold": 0.05}, "threshold0.2": {"threshold": 0.2}}
        for family in ("diffusers_mmdit", "diffusers_dit", "diffusers_flux")
    }
    refusals = {
        "diffusers_unet": "diffusers' first-block cache hooks the blocks of a transformer's top-level block lists "
        "(transformer_blocks, single_transformer_blocks, ...), and a U-Net has none: its transformer blocks sit "
        "inside down/mid/up blocks between resnets, so no first block's residual stands for the rest (tokred's "
        "U-Net cache: deepcache)",
        "timm_vit": "a cache across denoising steps, and a ViT's forward is one call with no earlier step to reuse",
    }
    State = FirstBlockCacheState
    random_weights_caveat = (
        "how many calls first-block caching skips depends on how little the first block's residual changes "
        "between steps, which random weights do not show as trained ones do"
    )

    def cycle_calls(self) -> int | None:
        # the threshold decides at run time which calls skip: no period (per-call benchmarks refuse it)
        return None

    def check(self, adapter) -> None:
        from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
        from diffusers.hooks._helpers import TransformerBlockRegistry
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        root = adapter.root
        self.targets = [
            (f"{name}.{i}", block)
            for name, child in root.named_children()
            if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList)
            for i, block in enumerate(child)
        ]  # diffusers' selection in apply_first_block_cache
        if len(self.targets) < 2:
            raise UnsupportedModelError(
                f"first_block_cache: the transformer has {len(self.targets)} block(s) in its block lists; "
                "first-block caching needs a first block and at least one more to skip"
            )
        for name, block in self.targets:
            try:
                TransformerBlockRegistry.get(type(block))
            except ValueError:
                raise UnsupportedModelError(
                    f"first_block_cache: {name} is a {type(block).__name__}, which diffusers' first-block cache has "
                    "no block metadata for; supported: diffusers' own block classes (JointTransformerBlock, "
                    "BasicTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock)"
                ) from None
            registry = vars(block).get("_diffusers_hook")
            if registry is not None and {_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK} & set(registry.hooks):
                raise UnsupportedModelError(
                    f"first_block_cache: {name} already carries diffusers' first-block cache hooks; remove them "
                    "(HookRegistry.remove_hook) before applying it through tokred"
                )

    def install(self, patch, state: FirstBlockCacheState | None = None) -> None:
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
        from diffusers.hooks.hooks import CacheContext

        state = state if state is not None else patch.method_state
        run, counter, root, family = patch.state, patch.tokens, patch.adapter.root, patch.adapter.family

        def inner(name: str, block: torch.nn.Module, below: Callable[..., Any]) -> Callable[..., Any]:
            def forward(mod: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
                calls = counter.calls(name)
                out = below(*args, **kwargs)
                if counter.calls(name) == calls:  # no token method inside recorded it: the full counts
                    counter.record(name, *_full_counts(block, _hidden_tokens(args, kwargs), family))
                if isinstance(out, tuple) and out[0] is None:  # tokred: context_pre_only's text stream passes
                    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
                    out = (text, *out[1:])
                return out

            return forward

        def outer(name: str, block: torch.nn.Module, chain: Callable[..., Any], unhooked: Callable[..., Any]):
            pre_only = bool(getattr(block, "context_pre_only", False))

            def forward(mod: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
                if run.auxiliary:  # SD3.5's skip-layer pass: the blocks as they are, the cache untouched
                    out = unhooked(*args, **kwargs)
                else:
                    calls = counter.calls(name)
                    out = chain(*args, **kwargs)
                    if counter.calls(name) == calls:  # the cache skipped this block on this call
                        n, *_, cross = _full_counts(block, _hidden_tokens(args, kwargs), family)
                        counter.record(name, n, 0, 0, 0, None if cross is None else 0)
                if pre_only and isinstance(out, tuple):
                    out = (None, *out[1:])  # tokred: the block's own None text stream again
                return out

            return forward

        install_diffusers_hooks(
            patch,
            self.targets,
            (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK),
            lambda: apply_first_block_cache(root, FirstBlockCacheConfig(threshold=float(self.options.threshold))),
            inner,
            outer,
            state,
        )
        state.state_manager = manager = state.hooks[0][0].state_manager  # the head's, shared by every block hook
        state.managers.append(manager)
        ours: list[Any] = [None]  # the context tokred set last (any other one is the pipeline's)

        def set_context(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if run.auxiliary:
                return
            _refuse_controlnet("first_block_cache", kwargs)
            if manager._context is not None and manager._context is not ours[0]:
                return  # tokred: the pipeline named this call (FluxPipeline's cache_context "cond" / "uncond")
            sample = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            name = "tokred " + "x".join(str(s) for s in sample.shape)
            ours[0] = CacheContext(name=name, step_index=run.step - 1)
            manager.set_context(ours[0])

        patch.register_forward_pre_hook(root, set_context, with_kwargs=True, outside_compile=True)


# --- pyramid attention broadcast -----------------------------------------------------------------------------------
def _timestep_range(v: Any) -> bool:
    return (
        isinstance(v, tuple | list) and len(v) == 2 and all(is_number(x) for x in v) and v[0] < v[1]
    )


@dataclass
class PABOptions:
    spatial_attention_block_skip_range: int = option(
        2,
        valid="int >= 1",
        check=int_at_least(1),
        doc="compute each self-attention once every this many calls inside the timestep window and reuse its "
        "output in between; 1: the unpatched model. 2 is diffusers' fallback when unset and its example's value; "
        "2 to 4 recommended (larger is faster and drifts more)",
    )
    spatial_attention_timestep_skip_range: tuple[float, float] = option(
        (100, 800),
        valid="(low, high) numbers, low < high",
        check=_timestep_range,
        doc="reuse only at timesteps strictly between low and high (0-1000 scale, diffusers' default (100, "
        "800)): the first and last steps always compute",
    )


@dataclass
class PABCrossOptions(PABOptions):
    """PixArt's blocks also have a cross-attention (``attn2``, to the T5 caption tokens)."""

    cross_attention_block_skip_range: int | None = option(
        None,
        valid="None or int >= 1",
        check=optional(int_at_least(1)),
        doc="compute each cross-attention once every this many calls inside its window and reuse its output in "
        "between; None (diffusers' default): cross-attention always computes. The paper broadcasts cross-attention "
        "the longest (its outputs change least between steps); PixArt only (DiT has no cross-attention)",
    )
    cross_attention_timestep_skip_range: tuple[float, float] = option(
        (100, 800),
        valid="(low, high) numbers, low < high",
        check=_timestep_range,
        doc="the cross-attention's window (0-1000 scale, diffusers' default (100, 800))",
    )


# the attentions diffusers' hook treats as spatial self-attention in each family's blocks, and the cross-attention
SELF_ATTENTIONS = {"diffusers_mmdit": ("attn", "attn2"), "diffusers_dit": ("attn1",), "diffusers_flux": ("attn",)}
CROSS_ATTENTION = {"diffusers_dit": "attn2"}


@functools.cache
def _decided_broadcast_hook() -> type:
    """diffusers' ``PyramidAttentionBroadcastHook`` whose compute-or-reuse choice is made before the denoiser call.

    diffusers' hook (0.42.1) decides in its ``new_forward``, from its Python iteration count and the current
    timestep: compiled, that forward guards on both, so the denoiser recompiles at every step. Here
    :func:`_decide_broadcast` applies the same rule in a denoiser pre-hook outside the compiled graph and leaves the
    outcome in ``hook.compute`` (a bool); the forward only reads it, so a compiled denoiser has one graph per
    outcome. The call that ran is counted (``hook.called``) and added to the iteration count by the next decision,
    so the count advances exactly when diffusers' does: on every call that reached the hook.
    """
    from diffusers.hooks.pyramid_attention_broadcast import PyramidAttentionBroadcastHook

    class DecidedBroadcastHook(PyramidAttentionBroadcastHook):
        compute = True  # the decision for the call under way (set by _decide_broadcast)
        called = False  # the hook ran since the last decision

        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            output = self.fn_ref.original_forward(*args, **kwargs) if self.compute else self.state.cache
            self.state.cache = output
            self.called = True
            return output

        def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
            self.called = False
            return super().reset_state(module)

    return DecidedBroadcastHook


def _decide_broadcast(hook: Any, state: Any) -> None:
    """Make ``state`` the hook's for the coming call and decide whether the call computes: diffusers'
    ``PyramidAttentionBroadcastHook.new_forward`` rule (0.42.1): compute when nothing is cached, on the first
    iteration, outside the timestep window, or every ``block_skip_range``-th iteration; reuse otherwise."""
    if hook.called:  # the previous call ran the hook: diffusers counts it after the call
        hook.state.iteration += 1
        hook.called = False
    hook.state = state
    low, high = hook.timestep_skip_range
    hook.compute = (
        state.cache is None
        or state.iteration == 0
        or not low < hook.current_timestep_callback() < high
        or state.iteration % hook.block_skip_range == 0
    )


def _pab_presets() -> dict[str, dict[str, Any]]:
    return {
        f"skip{k}": {"spatial_attention_block_skip_range": k, "spatial_attention_timestep_skip_range": (100, 800)}
        for k in (2, 4)
    }


@register_method("pab")
class PyramidAttentionBroadcast(Method):
    """Pyramid attention broadcast (Zhao et al., arXiv 2408.12588), diffusers' ``apply_pyramid_attention_broadcast``.

    Inside the timestep window, every self-attention (SD3's joint attention, SD3.5's second one too; PixArt's and
    DiT's ``attn1``; Flux's joint attention in both block types) is computed once every
    ``spatial_attention_block_skip_range`` calls and its output reused in between; the MLPs and the rest always
    run. On PixArt, the cross-attention to the caption can be broadcast too (``cross_attention_block_skip_range``,
    off by default as in diffusers). The blocks have no temporal attention, so diffusers' temporal options have
    nothing to act on and are not offered.

    Options (diffusers' ``PyramidAttentionBroadcastConfig``, official names): ``spatial_attention_block_skip_range``
    (2: diffusers' fallback when unset), ``spatial_attention_timestep_skip_range`` ((100, 800)); on
    ``diffusers_dit`` also ``cross_attention_block_skip_range`` (None) and ``cross_attention_timestep_skip_range``
    ((100, 800)).

    Where we differ from calling ``apply_pyramid_attention_broadcast``: diffusers needs a
    ``current_timestep_callback``; tokred gives the run state's timestep of the current call (the largest in
    the batch; Flux's ``t / 1000`` brought back to 0-1000, as ``FluxPipeline.current_timestep``). The state is
    reset every generation (module docstring); paused and auxiliary calls compute every attention and do not
    advance the hooks' call counts. ``tokred:`` one broadcast state per cache context the pipeline names (Flux's
    true CFG calls ``"cond"`` then ``"uncond"`` every step; diffusers' one state per attention would hand the
    conditional call's attention to the unconditional one). Beside a token method (a composition): refused on
    Flux (tokred's reduced Flux attention is computed from the attention's projections, not through the module
    diffusers hooks, so the broadcast would see only unreduced calls), and on the other families refused at the
    first call whose attention queries a token method reduced (a reused output would belong to another call's
    reduced tokens); a key/value method (ToDo) works.

    ``torch.compile``: fullgraph. ``tokred:`` diffusers' hook decides inside the attention's forward, from its
    Python iteration count and the current timestep, which a compiled forward guards on (a recompilation at every
    step until dynamo's limit); tokred registers diffusers' hooks through ``apply_pyramid_attention_broadcast``,
    swaps each for a subclass that reads ``hook.compute``, and sets that flag with diffusers' rule in a denoiser
    pre-hook outside the compiled graph. Same outputs as diffusers' hook; compiled, one graph per outcome (compute or
    reuse; with ``cross_attention_block_skip_range``, one per pair of outcomes: at most 4), never one per step.
    """

    summary = "pyramid attention broadcast: reuse each self-attention's output for a few steps (diffusers, 2408.12588)"
    kind = "cache"
    # the compute-or-reuse decision is made before the call (a pre-hook outside the compiled graph): one graph per
    # outcome, compute or reuse (diffusers' own hook decides inside the forward: a recompilation per step)
    compile_support = "fullgraph"
    options = {"diffusers_mmdit": PABOptions, "diffusers_dit": PABCrossOptions, "diffusers_flux": PABOptions}
    presets = {family: _pab_presets() for family in ("diffusers_mmdit", "diffusers_dit", "diffusers_flux")}
    refusals = {
        "diffusers_unet": "offered for diffusion transformers only, as the paper and diffusers' documentation apply "
        "it: diffusers' hook would also match a U-Net's attentions by name, a use no reference implementation or "
        "published result covers (tokred's U-Net cache: deepcache)",
        "timm_vit": "a cache across denoising steps, and a ViT's forward is one call with no earlier step to reuse",
    }
    State = DiffusersHooksState

    def cycle_calls(self) -> int | None:
        # computed and reused attentions repeat with a period only inside the timestep window: no period over a
        # generation, so per-call benchmarks refuse it (time whole generations)
        return None

    def check(self, adapter) -> None:
        from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

        family = adapter.family
        cross = CROSS_ATTENTION.get(family) if getattr(self.options, "cross_attention_block_skip_range", None) else None
        self.blocks = list(adapter.blocks)
        self.self_names = SELF_ATTENTIONS[family]
        self.cross_name = cross
        self.attentions = [
            (f"{name}.{sub}", getattr(block, sub))
            for name, block in self.blocks
            for sub in (*self.self_names, *((cross,) if cross else ()))
            if getattr(block, sub, None) is not None
        ]
        if cross and not any(getattr(block, cross, None) is not None for _, block in self.blocks):
            raise UnsupportedModelError(
                f"pab: cross_attention_block_skip_range={self.options.cross_attention_block_skip_range} but this "
                f"{type(adapter.root).__name__} has no cross-attention; valid: None (DiT is class-conditional)"
            )
        for name, attn in self.attentions:
            registry = vars(attn).get("_diffusers_hook")
            if registry is not None and _PYRAMID_ATTENTION_BROADCAST_HOOK in registry.hooks:
                raise UnsupportedModelError(
                    f"pab: {name} already carries diffusers' pyramid attention broadcast hook; remove it "
                    "(HookRegistry.remove_hook) before applying it through tokred"
                )

    def install(self, patch, state: DiffusersHooksState | None = None) -> None:
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
        from diffusers.hooks.hooks import StateManager
        from diffusers.hooks.pyramid_attention_broadcast import (
            _PYRAMID_ATTENTION_BROADCAST_HOOK,
            PyramidAttentionBroadcastState,
        )

        state = state if state is not None else patch.method_state
        run, counter, root, family = patch.state, patch.tokens, patch.adapter.root, patch.adapter.family
        # a token method installed before us into this patch: its forwards are on the blocks (composition)
        inside = any("forward" in vars(block) for _, block in self.blocks)
        if inside and family == "diffusers_flux":
            raise UnsupportedModelError(
                "pab: beside a token method on Flux, tokred's reduced attention is computed from the attention's "
                "projections (flux_attention), not through the attention module diffusers' hook wraps, so the "
                "broadcast would see only the unreduced calls; use pab alone on Flux"
            )
        low, high = self.options.spatial_attention_timestep_skip_range
        extra = {}
        if self.cross_name:
            extra = dict(
                cross_attention_block_skip_range=self.options.cross_attention_block_skip_range,
                cross_attention_timestep_skip_range=tuple(self.options.cross_attention_timestep_skip_range),
            )
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.options.spatial_attention_block_skip_range,
            spatial_attention_timestep_skip_range=(low, high),
            current_timestep_callback=lambda: run.last_timestep if run.last_timestep is not None else -1.0,
            **extra,
        )
        contexts: dict[str, tuple[Any, Any, Any]] = {}  # attention name -> (hook, its own state, per-context states)
        entering: dict[str, int] = {}  # block name -> image tokens entering its current call

        def inner(name: str, attn: torch.nn.Module, below: Callable[..., Any]) -> Callable[..., Any]:
            def forward(mod: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
                state.ran.add(name)
                return below(*args, **kwargs)

            return forward

        def outer(name: str, attn: torch.nn.Module, chain: Callable[..., Any], unhooked: Callable[..., Any]):
            block_name = name.rsplit(".", 1)[0]

            def forward(mod: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
                if run.auxiliary:
                    return unhooked(*args, **kwargs)
                if inside:
                    queries = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                    if queries.shape[1] != entering.get(block_name, queries.shape[1]):
                        raise UnsupportedModelError(
                            f"pab: a token method reduces the queries of {name} ({entering[block_name]} -> "
                            f"{queries.shape[1]} tokens); the broadcast would reuse an earlier call's outputs for "
                            "other reduced tokens. Combine pab with a key/value method (todo) or use it alone"
                        )
                return chain(*args, **kwargs)

            return forward

        def register() -> None:
            """diffusers' registration (its choice of attentions and ranges), then each of its hooks swapped for
            one that reads a decision made before the call (``tokred:``, for torch.compile; same outputs)."""
            apply_pyramid_attention_broadcast(root, config)
            decided = _decided_broadcast_hook()
            for _, attn in self.attentions:
                registry = vars(attn).get("_diffusers_hook")
                hook = registry.hooks.get(_PYRAMID_ATTENTION_BROADCAST_HOOK) if registry is not None else None
                if hook is None:
                    continue
                registry.remove_hook(_PYRAMID_ATTENTION_BROADCAST_HOOK, recurse=False)
                registry.register_hook(
                    decided(hook.timestep_skip_range, hook.block_skip_range, hook.current_timestep_callback),
                    _PYRAMID_ATTENTION_BROADCAST_HOOK,
                )

        # the blocks: count tokens (the attention counts 0 when the broadcast reused it), whatever runs inside
        for name, block in self.blocks:
            patch.replace_forward(
                block, self._counting_forward(
                    name, block, _bound_forward(block), state, counter, family, entering if inside else None
                )
            )
        install_diffusers_hooks(
            patch,
            self.attentions,
            (_PYRAMID_ATTENTION_BROADCAST_HOOK,),
            register,
            inner,
            outer,
            state,
        )
        if not state.hooks:
            raise UnsupportedModelError(
                "pab: diffusers' pyramid attention broadcast hooked no attention module of this transformer"
            )
        for name, attn in self.attentions:
            hook = attn._diffusers_hook.hooks.get(_PYRAMID_ATTENTION_BROADCAST_HOOK)
            if hook is None:
                continue  # diffusers left it alone (a cross-attention with no cross range)
            # a StateManager attribute of a stateful hook receives the pipeline's cache_context (diffusers'
            # _set_cache_context sets every one it finds on the hook)
            manager = StateManager(PyramidAttentionBroadcastState)
            hook.tokred_contexts = manager
            contexts[name] = (hook, hook.state, manager)
            state.managers.append(manager)
            state.states.append(hook.state)
        _invalidate_context_fanout(root)

        def decide(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if run.auxiliary:
                return  # the hooks are bypassed on this call (outer)
            for hook, own, manager in contexts.values():
                # tokred: the broadcast state of the pipeline's named cache context, else the hook's own
                _decide_broadcast(hook, manager.get_state() if manager._context is not None else own)

        # after the run state's pre-hook (the timestep, a new generation's reset): compiled, the denoiser reads only
        # each hook's decision, a bool, so one graph per outcome and none per step
        patch.register_forward_pre_hook(root, decide, with_kwargs=True, outside_compile=True)

    def _counting_forward(self, name: str, block: torch.nn.Module, below: Callable[..., Any], state, counter,
                          family: str, entering: dict[str, int] | None):
        self_name = f"{name}.{self.self_names[0]}"
        cross_name = f"{name}.{self.cross_name}" if self.cross_name and getattr(block, self.cross_name, None) else None

        # every hooked attention of the block: ``state.ran`` holds none of them between calls (compiled, its contents
        # on entry are a guard: one left from the previous call's outcome would double the graphs)
        own = [f"{name}.{sub}" for sub in (*self.self_names, self.cross_name) if sub and getattr(block, sub, None)]

        def forward(mod: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            state.ran.difference_update(own)
            n = _hidden_tokens(args, kwargs)
            if entering is not None:  # beside a token method only (compiled alone: no dict whose keys change)
                entering[name] = n
            calls = counter.calls(name)
            out = below(*args, **kwargs)
            computed = self_name in state.ran
            cross_computed = cross_name is None or cross_name in state.ran
            state.ran.difference_update(own)
            if counter.calls(name) == calls:
                n, _, _, _, cross = _full_counts(block, n, family)
                a = n if computed else 0
                counter.record(name, n, a, a, n, None if cross is None else (cross if cross_computed else 0))
            elif not (computed and cross_computed):  # a token method inside counted what the broadcast reused
                counter.reused(name, attn=not computed, kv=not computed, cross=not cross_computed)
            return out

        return forward
