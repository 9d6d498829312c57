"""CAT pruning: selection rule against a loop reference, cached vs fresh tokens, exactness, resets, batches."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_sd_pipeline, tiny_sd_unet
from tiny_sd3 import sd3_denoise, tiny_sd3_pipeline, tiny_sd3_transformer

import tokred
from tokred.errors import InvalidOptionError, UnsupportedModelError
from tokred.methods import cat_pruning_select as S

TIMESTEPS = (900, 800, 700, 600)


# --- fixtures and helpers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet():
    return tiny_sd_unet()


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_transformer()


def unet_calls(unet, batch=2, latent=8, steps=TIMESTEPS[:3], seed=0, hook=None):
    """One bare 'generation': the U-Net called at decreasing timesteps on fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, latent, latent, generator=g)
    text = torch.randn(batch, 77, 32, generator=g)
    outs = []
    with torch.no_grad():
        for i, t in enumerate(steps):
            if hook is not None:
                hook(i + 1)
            outs.append(unet(sample + 0.1 * i, t, encoder_hidden_states=text).sample)
    return outs


def sd3_calls(model, batch=2, latent=16, steps=TIMESTEPS, seed=0, hook=None):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 16, latent, latent, generator=g)
    text = torch.randn(batch, 8, 64, generator=g)
    pooled = torch.randn(batch, 64, generator=g)
    return sd3_denoise(model, sample, text, pooled, steps, before_step=hook)


def as_tokens_unet(out):
    return out.flatten(2).transpose(1, 2)  # [B, H*W, 4], the order CAT selects in


def as_tokens_sd3(out, p=2):
    B, C, H, W = out.shape
    return out.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), -1)


def reference_attention(q, k, v, heads):
    """Plain softmax attention [B, Nq, C] x [B, Nk, C] -> [B, Nq, C]."""
    B, Nq, C = q.shape
    d = C // heads
    q, k, v = (t.reshape(B, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    w = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return (w @ v).transpose(1, 2).reshape(B, Nq, C)


def replace_rows(full, sel, rows):
    """``full`` [B, N, C] with rows ``sel`` [B, M] replaced by ``rows`` [B, M, C] (out of place)."""
    return full.scatter(1, sel[..., None].expand(-1, -1, full.shape[-1]), rows)


CACHE_FIELDS = ("attn", "k", "v", "cross", "attn2", "k2", "v2", "mlp")


def cache_tensors(cache):
    """The filled caches of one block (CatState.blocks[name]) by field, cloned."""
    return {f: getattr(cache, f).value.clone() for f in CACHE_FIELDS if getattr(cache, f).value is not None}


def loop_select(change, labels, scores, counts, budget, first):
    """The official selection, cluster by cluster (one sample), plus our exact-budget top-up."""
    N, K = len(change), len(scores)
    members = {k: [n for n in range(N) if labels[n] == k] for k in range(K)}
    clusters = sorted(range(K), key=lambda k: (-scores[k], k))
    by_change = lambda idx: sorted(idx, key=lambda n: (-change[n], n))
    stalest = lambda idx: sorted(idx, key=lambda n: (counts[n], -change[n], n))
    picked = []
    if first:
        for k in clusters:
            picked += by_change(members[k])[: min(budget // 10, len(members[k]))]
            if len(picked) > budget:
                break
        part = picked[:budget]
    else:
        base = int(budget // 5 * 0.25)
        for i, k in enumerate(clusters):
            size = len(members[k])
            q = min(base, size)
            q = min(int(q * (3 - i)), size) if i < 3 else q
            chosen = by_change(members[k])[:q]
            if i != 0:
                chosen = sorted(set(chosen) | set(stalest(members[k])[: int(q * 0.5)]))
            picked += chosen
            if len(picked) > budget * 0.25:
                break
        part = picked[: int(budget * 0.25)]
    rest = [n for n in stalest(range(N)) if n not in set(part)]
    return sorted(part + rest[: budget - len(part)])


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("budget", [19, 77, 200])
def test_selection_matches_loop_reference(first, budget):
    g = torch.Generator().manual_seed(budget + first)
    B, N, K = 3, 256, 20
    labels = torch.randint(K, (B, N), generator=g)
    labels[0][labels[0] == 7] = 3  # an empty cluster in sample 0
    change = torch.rand(B, N, generator=g)
    counts = torch.randint(0, 3, (B, N), generator=g).float() * 0.5  # many ties
    if first:
        counts.zero_()
    pooled = S.cluster_max(change[..., None].expand(-1, -1, 3).contiguous(), labels, K)
    scores = S.cluster_scores(pooled)
    got = S.select_tokens(change, labels, scores, counts, budget, first)
    assert got.shape == (B, budget)
    for b in range(B):
        expected = loop_select(
            change[b].tolist(), labels[b].tolist(), scores[b].tolist(), counts[b].tolist(), budget, first
        )
        assert got[b].tolist() == expected
        assert len(set(got[b].tolist())) == budget


def test_cluster_adjacency_and_smoothing_match_loops():
    g = torch.Generator().manual_seed(0)
    h, w, K = 6, 5, 4
    labels = torch.randint(K, (2, h * w), generator=g)
    values = torch.randn(2, h * w, 3, generator=g)
    adj = S.cluster_adjacency(labels, h, w, K)
    pooled = S.cluster_max(values, labels, K)
    smoothed = S.cluster_scores(pooled, adj)
    for b in range(2):
        grid = labels[b].view(h, w)
        ref = torch.zeros(K, K, dtype=torch.bool)
        for i in range(h):
            for j in range(w):
                for di, dj in ((0, 1), (1, 0)):
                    if i + di < h and j + dj < w and grid[i, j] != grid[i + di, j + dj]:
                        ref[grid[i, j], grid[i + di, j + dj]] = ref[grid[i + di, j + dj], grid[i, j]] = True
        assert torch.equal(adj[b], ref)
        for k in range(K):
            assert torch.equal(pooled[b, k], values[b][labels[b] == k].amax(0))
            hood = [k] + [m for m in range(K) if ref[k, m]]
            expected = 2 * pooled[b, hood].mean(0) + pooled[b, hood].amax(0)
            torch.testing.assert_close(smoothed[b, k], expected.norm())


def test_update_counts_restarts_then_decays():
    computed = torch.tensor([[True, False, True, False]])
    zero = torch.zeros(1, 4)
    assert torch.equal(S.update_counts(zero, computed, torch.tensor([[5.0]])), computed.float())
    counts = torch.tensor([[1.0, 0.5, 0.0, 1.5]])
    assert torch.equal(S.update_counts(counts, computed, torch.tensor([[1.0]])), computed.float())  # no cluster x2
    assert torch.equal(S.update_counts(counts, computed, torch.tensor([[2.0]])), torch.tensor([[1.5, 0.25, 1, 0.75]]))


def test_kmeans_deterministic_and_as_good_as_sklearn():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 4, generator=g) * 10
    truth = torch.randint(5, (2, 300), generator=g)
    blobs = centers[truth] + 0.1 * torch.randn(2, 300, 4, generator=g)
    labels = S.kmeans(blobs, 5, seed=0)
    assert torch.equal(labels, S.kmeans(blobs, 5, seed=0))
    for b in range(2):  # well-separated blobs: the same partition as the ground truth
        assert adjusted_rand_score(truth[b].numpy(), labels[b].numpy()) == 1.0
    feats = S.clustering_features(torch.randn(2, 256, 4, generator=g), 16, 16)  # CAT's real input
    labels = S.kmeans(feats, 20, seed=0)
    for b in range(2):
        x = feats[b]
        mine = sum(((x[labels[b] == k] - x[labels[b] == k].mean(0)) ** 2).sum() for k in range(20))
        theirs = KMeans(20, random_state=0, n_init=1).fit(x.numpy()).inertia_
        assert mine <= 1.05 * theirs


def test_clustering_features_encode_row_and_column():
    feats = S.clustering_features(torch.zeros(1, 6, 4), 2, 3)  # 4 channels: 2 for the row, 2 for the column
    assert torch.allclose(feats[0, :, 0], torch.tensor([0, 0, 0, 0.5, 0.5, 0.5]))
    assert torch.allclose(feats[0, :, 3], torch.tensor([0, 1 / 3, 2 / 3, 0, 1 / 3, 2 / 3]))
    one = S.clustering_features(torch.ones(1, 6, 1), 2, 3)  # one noise channel (grey pixel models): padded to 2
    assert one.shape == (1, 6, 2)
    assert torch.allclose(one[0, :, 0], 0.05 + torch.tensor([0, 0, 0, 0.5, 0.5, 0.5]))
    assert torch.allclose(one[0, :, 1], torch.tensor([0, 1 / 3, 2 / 3, 0, 1 / 3, 2 / 3]))


def test_level_selection_prefers_windows_with_selected_tokens():
    selected = torch.zeros(1, 16, dtype=torch.bool)
    selected[0, [0, 1, 4, 5, 10]] = True  # the top-left 2x2 window is full, one token in the bottom-right one
    chosen = S.level_selection(selected, torch.rand(1, 16), 4, 4, 2, budget=2)
    assert chosen.tolist() == [[0, 3]]


# --- U-Net -------------------------------------------------------------------------------------------------------
def test_unet_alpha_one_is_bit_exact_and_remove_restores(unet):
    base = unet_calls(unet)
    with tokred.apply(unet, "cat_pruning", t0=2, alpha=1.0) as patch:
        out = unet_calls(unet)
        assert patch.method_state.sel.shape == (2, 64)  # the sparse path ran
    for a, b in zip(base, out, strict=True):
        assert torch.equal(a, b)
    after = unet_calls(unet)
    for a, b in zip(base, after, strict=True):
        assert torch.equal(a, b)


def test_unet_unselected_tokens_are_cached_and_selected_fresh(unet):
    name = "down_blocks.0.attentions.0.transformer_blocks.0"
    block = dict(unet.named_modules())[name]
    seen = {}

    with tokred.apply(unet, "cat_pruning", t0=2, alpha=0.3) as patch:
        g = lambda: patch.method_state

        def before_call(step):
            if step == 3:  # the first pruned call: snapshot this block's cache and the selection
                seen["before"] = cache_tensors(g().blocks[name])
                seen["sel"] = g().sel.clone()

        def attn1_io(module, args, kwargs, output):
            if patch.state.step == 3:
                seen["attn1_in"], seen["attn1_out"] = args[0], output

        handle = block.attn1.register_forward_hook(attn1_io, with_kwargs=True)
        try:
            outs = unet_calls(unet, hook=before_call)
        finally:
            handle.remove()
        after = cache_tensors(g().blocks[name])

    sel = seen["sel"]
    mask = torch.zeros(2, 64, dtype=torch.bool).scatter_(1, sel, True)
    assert sel.shape == (2, int(0.3 * 64))
    # noise output: unselected tokens repeat the previous call's value exactly, selected ones are new
    t2, t3 = as_tokens_unet(outs[1]), as_tokens_unet(outs[2])
    assert torch.equal(t3[~mask], t2[~mask])
    assert (t3[mask] != t2[mask]).any(-1).all()
    # block caches: unselected rows untouched, selected rows rewritten with this call's values
    for key in ("attn", "cross", "mlp"):
        assert torch.equal(after[key][~mask], seen["before"][key][~mask]), key
        assert (after[key][mask] != seen["before"][key][mask]).any(-1).all(), key
    # self-attention of the selected queries over all keys: fresh keys/values for selected tokens, cached others
    attn = block.attn1
    x = seen["attn1_in"]  # normed selected tokens [B, M, C]
    assert x.shape[1] == sel.shape[1]
    with torch.no_grad():
        keys = replace_rows(seen["before"]["k"], sel, attn.to_k(x))
        values = replace_rows(seen["before"]["v"], sel, attn.to_v(x))
        expected = attn.to_out[0](reference_attention(attn.to_q(x), keys, values, attn.heads))
    torch.testing.assert_close(seen["attn1_out"], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after["attn"].gather(1, sel[..., None].expand(-1, -1, x.shape[-1])), expected)


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_unet_any_batch_prunes_per_sample(unet, batch):
    with tokred.apply(unet, "cat_pruning", t0=2, alpha=0.3) as patch:
        outs = unet_calls(unet, batch=batch)
        g = patch.method_state
        assert g.sel.shape == (batch, int(0.3 * 64))
        assert g.labels.shape == (batch, 64)
    assert all(o.shape == (batch, 4, 8, 8) and torch.isfinite(o).all() for o in outs)
    if batch == 4:  # per-sample selection: the samples of one batch choose their own tokens
        assert not all(torch.equal(g.sel[0], g.sel[i]) for i in range(1, 4))


def test_unet_lower_levels_pruned_with_max_downsample(unet):
    block = "down_blocks.1.attentions.0.transformer_blocks.0"  # 2x downsampled
    seen, levels = {}, {}
    with tokred.apply(unet, "cat_pruning", t0=2, alpha=0.3, max_downsample=8) as patch:

        def before_call(step):
            if step == 3:
                seen["before"] = patch.method_state.blocks[block].mlp.value.clone()

        def after_call(module, args, out):
            levels.update(patch.method_state.levels)  # this call's pooled selections

        handle = unet.register_forward_hook(after_call)
        try:
            unet_calls(unet, hook=before_call)
        finally:
            handle.remove()
        after = patch.method_state.blocks[block].mlp.value
    assert set(levels) == {2, 4, 8}  # pooled maps for the 4x4, 2x2 and 1x1 (mid-block) levels
    assert levels[2].shape == (2, int(0.3 * 16))
    assert levels[4].shape == levels[8].shape == (2, 1)  # at least one token per level
    mask = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, levels[2], True)
    assert torch.equal(after[~mask], seen["before"][~mask])
    assert (after[mask] != seen["before"][mask]).any(-1).all()
    with tokred.apply(unet, "cat_pruning", t0=2, alpha=0.3) as patch:  # default: the lower levels stay dense
        unet_calls(unet)
        assert not patch.method_state.levels
        assert block not in patch.method_state.blocks


def test_pipeline_generations_reset_and_repeat():
    pipe = tiny_sd_pipeline()

    def generate():
        out = pipe(
            "a red cube",
            num_inference_steps=3,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
        return out.images

    with tokred.apply(pipe, "cat_pruning", t0=2, alpha=0.3) as patch:
        first = generate()
        assert patch.state.step == 3 and patch.method_state.sel_step == 4  # call 3 pruned
        second = generate()
        assert patch.state.generation >= 2
    assert torch.equal(first, second)
    assert not torch.equal(first, generate())  # pruning changed the result


# --- SD3 (MMDiT) ---------------------------------------------------------------------------------------------------
def test_sd3_alpha_one_is_bit_exact_and_remove_restores(sd3):
    base = sd3_calls(sd3)
    with tokred.apply(sd3, "cat_pruning", t0=2, alpha=1.0) as patch:
        out = sd3_calls(sd3)
        assert patch.method_state.sel.shape == (2, 64)
    after = sd3_calls(sd3)
    for a, b, c in zip(base, out, after, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_sd3_step_schedule_follows_t0(sd3):
    """t0=3: call 2 gives the reference n_t0, call 3 clusters (still full), call 4 is the first pruned call."""
    states = {}
    with tokred.apply(sd3, "cat_pruning", t0=3, alpha=0.5) as patch:
        g = lambda: patch.method_state

        def before_call(step):
            gen = patch.method_state
            states[step] = (gen.ref is not None, gen.labels is not None, gen.sel_step)

        outs = sd3_calls(sd3, hook=before_call)
        assert torch.equal(g().ref, as_tokens_sd3(outs[1]).float())
    assert states[1] == (False, False, -1) and states[2] == (False, False, -1)
    assert states[3] == (True, False, -1)  # call 3 is computed in full and clusters
    assert states[4] == (True, True, 4)  # call 4 prunes with the selection made at call 3


def test_sd3_unselected_tokens_are_cached_and_selected_fresh(sd3):
    block = sd3.transformer_blocks[0]
    seen = {}
    with tokred.apply(sd3, "cat_pruning", t0=2, alpha=0.3) as patch:
        g = lambda: patch.method_state

        def before_call(step):
            if step == 3:
                seen["before"] = cache_tensors(g().blocks["transformer_blocks.0"])
                seen["sel"] = g().sel.clone()

        def block_in(module, args, kwargs):
            if patch.state.step == 3:
                seen["inputs"] = kwargs

        handle = block.register_forward_pre_hook(block_in, with_kwargs=True)
        try:
            outs = sd3_calls(sd3, steps=TIMESTEPS[:3], hook=before_call)
        finally:
            handle.remove()
        after = cache_tensors(g().blocks["transformer_blocks.0"])

    sel = seen["sel"]
    M = int(0.3 * 64)
    assert sel.shape == (2, M)
    mask = torch.zeros(2, 64, dtype=torch.bool).scatter_(1, sel, True)
    t2, t3 = as_tokens_sd3(outs[1]), as_tokens_sd3(outs[2])
    assert torch.equal(t3[~mask], t2[~mask])
    assert (t3[mask] != t2[mask]).any(-1).all()
    for key in ("attn", "mlp"):
        assert torch.equal(after[key][~mask], seen["before"][key][~mask]), key
        assert (after[key][mask] != seen["before"][key][mask]).any(-1).all(), key
    # joint attention: queries of the selected image tokens and all text tokens; image keys/values from the cache
    # except the selected rows, which are fresh
    x, ctx, temb = seen["inputs"]["hidden_states"], seen["inputs"]["encoder_hidden_states"], seen["inputs"]["temb"]
    attn = block.attn
    with torch.no_grad():
        norm_x = block.norm1(x, emb=temb)[0].gather(1, sel[..., None].expand(-1, -1, x.shape[-1]))
        norm_ctx = block.norm1_context(ctx, emb=temb)[0]
        keys = replace_rows(seen["before"]["k"], sel, attn.to_k(norm_x))
        values = replace_rows(seen["before"]["v"], sel, attn.to_v(norm_x))
        q = torch.cat([attn.to_q(norm_x), attn.add_q_proj(norm_ctx)], 1)
        k = torch.cat([keys, attn.add_k_proj(norm_ctx)], 1)
        v = torch.cat([values, attn.add_v_proj(norm_ctx)], 1)
        expected = attn.to_out[0](reference_attention(q, k, v, attn.heads)[:, :M])
    got = after["attn"].gather(1, sel[..., None].expand(-1, -1, expected.shape[-1]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_sd3_dual_attention_blocks():
    model = tiny_sd3_transformer(dual_attention_layers=(0,))
    base = sd3_calls(model, steps=TIMESTEPS[:3])
    with tokred.apply(model, "cat_pruning", t0=2, alpha=1.0):
        assert all(torch.equal(a, b) for a, b in zip(base, sd3_calls(model, steps=TIMESTEPS[:3]), strict=True))
    with tokred.apply(model, "cat_pruning", t0=2, alpha=0.3) as patch:
        outs = sd3_calls(model, steps=TIMESTEPS[:3])
        assert patch.method_state.blocks["transformer_blocks.0"].k2.value is not None
    assert torch.isfinite(outs[-1]).all() and not torch.equal(outs[-1], base[-1])


def test_sd3_pipeline_end_to_end():
    pipe = tiny_sd3_pipeline()

    def generate(prompt=("a red cube", "a blue ball")):
        return pipe(
            list(prompt),
            num_inference_steps=4,
            guidance_scale=5.0,
            height=32,
            width=32,
            max_sequence_length=8,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    base = generate()
    patch = tokred.apply(pipe, "cat_pruning", t0=2, alpha=0.3)
    assert tokred.get_patch(pipe) is patch
    first = generate()
    assert patch.method_state.sel.shape == (4, int(0.3 * 64))  # 2 prompts x CFG pair
    second = generate()
    assert first.shape == base.shape == (2, 32, 32, 3)
    assert (first == second).all() and not (first == base).all()
    assert tokred.remove(pipe)
    assert (generate() == base).all()
    with tokred.apply(pipe, "cat_pruning", t0=2, alpha=1.0):
        assert (generate() == base).all()


# --- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {"alpha": 0.0},
        {"alpha": 1.5},
        {"alpha": True},
        {"t0": 1},
        {"t0": 2.5},
        {"num_clusters": 0},
        {"kmeans_seed": -1},
        {"max_downsample": 3},
        {"select_factor": 0.3},
    ],
)
def test_bad_options_raise_at_apply(unet, options):
    with pytest.raises(InvalidOptionError):
        tokred.apply(unet, "cat_pruning", **options)
    assert tokred.get_patch(unet) is None


def test_bad_options_and_models_raise_for_sd3(sd3):
    with pytest.raises(InvalidOptionError):
        tokred.apply(sd3, "cat_pruning", max_downsample=2)  # a U-Net-only option
    from diffusers.models.attention_processor import AttnProcessor

    sd3.transformer_blocks[1].attn.set_processor(AttnProcessor())
    try:
        with pytest.raises(UnsupportedModelError, match="JointAttnProcessor2_0"):
            tokred.apply(sd3, "cat_pruning")
    finally:
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        sd3.transformer_blocks[1].attn.set_processor(JointAttnProcessor2_0())
    assert tokred.get_patch(sd3) is None
