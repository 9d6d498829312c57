"""ToMe and CA-ToMe on SD3/SD3.5 MMDiTs: image tokens merged on the 2-D patch grid before joint attention and
unmerged after, text tokens never; SD3.5's second self-attention shares the block's merge; qk-norm; per-row
plans; skip-layer guidance's extra pass; the options an MMDiT has and those it refuses."""

from __future__ import annotations

import pytest
import torch
from tiny_sd3 import sd3_denoise, tiny_sd3_pipeline, tiny_sd3_transformer, tiny_sd35_transformer

import tokred
from tokred.errors import InvalidOptionError, UnsupportedModelError
from tokred.merge import grid_destinations, grid_matching

TIMESTEPS = (900, 800, 700)
TEXT_TOKENS = 8
# The token-reduction methods (the caches, kind "cache", skip whole blocks: tests/test_diffusers_caches.py)
SD3_METHODS = [
    m
    for m in tokred.list_methods()
    if "diffusers_mmdit" in tokred.get_method(m).options and getattr(tokred.get_method(m), "kind", "") != "cache"
]


def sd3_calls(model, latent=(16, 16), batch=2, steps=TIMESTEPS, seed=0, rows=None):
    """One bare generation: fixed random inputs at decreasing timesteps; the outputs stacked. ``rows`` keeps only
    those rows of the batch's inputs."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 16, *latent, generator=g)
    text = torch.randn(batch, TEXT_TOKENS, 64, generator=g)
    pooled = torch.randn(batch, 64, generator=g)
    if rows is not None:
        sample, text, pooled = sample[rows], text[rows], pooled[rows]
    return torch.stack(sd3_denoise(model, sample, text, pooled, steps))


class Recorder:
    """Forward (pre-)hooks on one block: its input, its norm's outputs, and the inputs of its attentions."""

    def __init__(self, block):
        self.block_in, self.norm, self.attn, self.attn2, self.text_out = [], [], [], [], []
        self.handles = [
            block.register_forward_pre_hook(lambda m, a, k: self.block_in.append(k["hidden_states"]), with_kwargs=True),
            block.norm1.register_forward_hook(lambda m, a, o: self.norm.append(o)),
            block.attn.register_forward_pre_hook(lambda m, a, k: self.attn.append(k), with_kwargs=True),
            block.register_forward_hook(lambda m, a, o: self.text_out.append(o[0])),
        ]
        if block.use_dual_attention:
            self.handles.append(
                block.attn2.register_forward_pre_hook(lambda m, a, k: self.attn2.append(k), with_kwargs=True)
            )

    def remove(self):
        for h in self.handles:
            h.remove()


# --- where the merge acts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,options", [("tome", {"ratio": 0.5}), ("ca_tome", {"threshold": 0.5})])
def test_image_tokens_merge_on_the_patch_grid_and_text_tokens_never(method, options):
    """A non-square latent (16 x 24 -> an 8 x 12 patch grid): joint attention gets exactly the merge of the normed
    image tokens that the grid split of the block input gives (one top-left destination per 2x2 window, rows
    first), and all text tokens; the block returns every image and text token."""
    model = tiny_sd3_transformer()
    block = model.transformer_blocks[0]
    rec = Recorder(block)
    try:
        with tokred.apply(model, method, use_rand=False, **options):
            out = sd3_calls(model, latent=(16, 24), steps=TIMESTEPS[:1])
    finally:
        rec.remove()
    x, norm, attn = rec.block_in[0], rec.norm[0][0], rec.attn[0]
    n = 8 * 12
    a_idx, b_idx = grid_destinations(8, 12, 2, 2, None, x.device)
    kw = {"r": int(n * 0.5)} if method == "tome" else {"threshold": 0.5}
    merge = grid_matching(x, a_idx, b_idx, **kw)
    assert merge is not None and merge.r > 0
    assert torch.equal(attn["hidden_states"], merge(norm))
    assert attn["hidden_states"].shape[1] == n - merge.r
    assert attn["encoder_hidden_states"].shape[1] == TEXT_TOKENS  # the text stream is never merged
    assert rec.text_out[0].shape[1] == TEXT_TOKENS and out.shape[-2:] == (16, 24)


def test_dual_attention_blocks_share_the_merge_and_qk_norm_works():
    """SD3.5 (dual attention, qk rms-norm): attn2 gets the same merge, applied to its own modulated input."""
    model = tiny_sd35_transformer()
    block = model.transformer_blocks[0]
    assert block.use_dual_attention and block.attn.norm_q is not None
    base = sd3_calls(model)
    rec = Recorder(block)
    try:
        with tokred.apply(model, "tome", use_rand=False) as patch:
            out = sd3_calls(model, steps=TIMESTEPS[:1])
            counts = patch.token_counts()
    finally:
        rec.remove()
    x, norm_out = rec.block_in[0], rec.norm[0]
    merge = grid_matching(x, *grid_destinations(8, 8, 2, 2, None, x.device), r=32)
    assert torch.equal(rec.attn[0]["hidden_states"], merge(norm_out[0]))
    assert torch.equal(rec.attn2[0]["hidden_states"], merge(norm_out[5]))  # norm_hidden_states2
    assert all(c.attn == 32 and c.mlp == 64 for c in counts.values())
    assert torch.isfinite(out).all() and not torch.equal(out[0], base[0])
    assert torch.equal(sd3_calls(model), base)


def test_merge_mlp_merges_the_image_feed_forward_too():
    model = tiny_sd3_transformer()
    with tokred.apply(model, "tome", merge_mlp=True) as patch:
        sd3_calls(model, steps=TIMESTEPS[:1])
        assert all(c.attn == 32 and c.mlp == 32 for c in patch.token_counts().values())
    with tokred.apply(model, "tome", merge_attn=False, merge_mlp=True) as patch:
        sd3_calls(model, steps=TIMESTEPS[:1])
        assert all(c.attn == 64 and c.mlp == 32 for c in patch.token_counts().values())


def test_zero_strength_is_exact_and_grids_without_a_window_stay_unmerged():
    model = tiny_sd3_transformer()
    base = sd3_calls(model)
    with tokred.apply(model, "tome", ratio=0.0):
        assert torch.equal(sd3_calls(model), base)
    with tokred.apply(model, "ca_tome", threshold=1.0):
        assert torch.equal(sd3_calls(model), base)
    small = sd3_calls(model, latent=(4, 4))  # a 2 x 2 patch grid: no 4 x 4 window, so nothing to merge
    with tokred.apply(model, "tome", sx=4, sy=4, ratio=0.5):
        assert torch.equal(sd3_calls(model, latent=(4, 4)), small)


# --- CA-ToMe's cache and rows --------------------------------------------------------------------------------------
def test_ca_tome_reuses_pairs_between_compute_steps():
    model = tiny_sd3_transformer()
    with tokred.apply(model, "ca_tome", compute_on=[3]) as patch:
        seen = []
        hook = model.register_forward_hook(lambda m, a, o: seen.append(dict(patch.method_state.block_stats)))
        try:
            sd3_calls(model)
        finally:
            hook.remove()
    computed = [[s.computed for s in stats.values()] for stats in seen]
    assert computed == [[True, True], [False, False], [True, True]]  # call 1 (empty cache), call 3 (listed)
    assert all(s.r[0] > 0 for stats in seen for s in stats.values())


def test_ca_tome_batch_independent_rows_on_an_mmdit():
    """Each row gets its own count and pairs; a sample alone gives what it gives inside the batch."""
    model = tiny_sd3_transformer()
    with tokred.apply(model, "ca_tome", batch_independent=True, use_rand=False) as patch:
        both = sd3_calls(model, batch=2)
        stats = dict(patch.method_state.block_stats)
    assert all(len(s.r) == 2 for s in stats.values())
    assert any(s.r[0] != s.r[1] for s in stats.values())  # the rows merge different counts
    with tokred.apply(model, "ca_tome", batch_independent=True, use_rand=False):
        alone = sd3_calls(model, batch=2, rows=slice(0, 1))  # row 0 of the same inputs, alone
    torch.testing.assert_close(alone[:, 0], both[:, 0], atol=1e-5, rtol=1e-4)


# --- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["tome", "ca_tome"])
@pytest.mark.parametrize(
    "options,match",
    [
        ({"max_downsample": 1}, r"unknown option 'max_downsample'.*Valid options: .*sx"),
        ({"merge_crossattn": True}, "unknown option 'merge_crossattn'"),
        ({"merge_attn": False}, "merge_attn and merge_mlp are False"),
        ({"sx": 0}, "option 'sx'=0 is invalid"),
    ],
)
def test_options_an_mmdit_does_not_have_are_refused(method, options, match):
    model = tiny_sd3_transformer()
    base = sd3_calls(model, steps=TIMESTEPS[:1])
    with pytest.raises(InvalidOptionError, match=match):
        tokred.apply(model, method, **options)
    assert tokred.get_patch(model) is None and torch.equal(sd3_calls(model, steps=TIMESTEPS[:1]), base)


def test_tome_ratio_above_the_window_limit_is_refused():
    with pytest.raises(InvalidOptionError, match="exceeds the maximum 1 - 1/.sx.sy. = 0.75"):
        tokred.apply(tiny_sd3_transformer(), "tome", ratio=0.8)


@pytest.mark.parametrize("method", SD3_METHODS)
def test_block_with_its_own_forward_is_refused(method):
    from diffusers.models.attention import JointTransformerBlock

    class CustomBlock(JointTransformerBlock):
        def forward(self, *args, **kwargs):  # a block type the adapter does not reproduce
            return super().forward(*args, **kwargs)

    model = tiny_sd3_transformer()
    model.transformer_blocks[1].__class__ = CustomBlock
    with pytest.raises(UnsupportedModelError, match="transformer_blocks.1 is CustomBlock.*its own forward"):
        tokred.apply(model, method)
    assert tokred.get_patch(model) is None


# --- pipelines: SD3.5 with skip-layer guidance ---------------------------------------------------------------------
OPTIONS = {"cat_pruning": {"t0": 2}}
STEPS = 5


@pytest.fixture(scope="module")
def sd35_pipe():
    return tiny_sd3_pipeline(num_layers=3, dual_attention_layers=(0,), qk_norm="rms_norm")


def generate(pipe, skip_layers=True):
    slg = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    return pipe(
        ["a red cube"],
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        height=32,
        width=32,
        max_sequence_length=TEXT_TOKENS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **(slg if skip_layers else {}),
    ).images


def image_tokens_per_call(pipe, patch, fn):
    """Run ``fn``; return (auxiliary, image keys out of block 0's key projection) for every transformer call.
    The keys, not the attention's input, because ToDo shortens the keys and values only (an output hook: it runs
    after the pre-hooks the patch adds within the call)."""
    calls = []
    to_k = pipe.transformer.transformer_blocks[0].attn.to_k
    hook = to_k.register_forward_hook(lambda m, a, out: calls.append((patch.state.auxiliary, out.shape[1])))
    try:
        out = fn()
    finally:
        hook.remove()
    return out, calls


@pytest.mark.parametrize("method", SD3_METHODS)
def test_sd35_pipeline_with_skip_layer_guidance(sd35_pipe, method):
    """Same seed, same image; not the baseline's; remove() exact; one counted call per step, the skip-layer
    passes unreduced and uncounted; CAT's schedule (which calls prune) is that of a run without the passes."""
    pipe = sd35_pipe
    base = generate(pipe)
    patch = tokred.apply(pipe, method, **OPTIONS.get(method, {}))
    try:
        first, calls = image_tokens_per_call(pipe, patch, lambda: generate(pipe))
        steps = patch.state.step
        second = generate(pipe)
        _, plain_calls = image_tokens_per_call(pipe, patch, lambda: generate(pipe, skip_layers=False))
    finally:
        patch.remove()
    assert (first == second).all() and not (first == base).all()
    assert (generate(pipe) == base).all()
    assert steps == STEPS
    counted = [n for aux, n in calls if not aux]
    auxiliary = [n for aux, n in calls if aux]
    assert len(counted) == STEPS and len(auxiliary) == STEPS - 1  # SLG from the second step (i > 0)
    assert all(n == 64 for n in auxiliary) and min(counted) < 64
    assert counted == [n for _, n in plain_calls]  # the same reduction per step with and without the extra passes
    if method == "cat_pruning":
        assert counted == [64, 64] + [int(0.3 * 64)] * (STEPS - 2)
