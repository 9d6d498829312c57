"""Zero-TPrune against a reference written differently: one image at a time, explicit attention matrices, index
lists and Python loops (power iteration as ``A^T s`` per head, the head filter and the pairs by hand); plus the
method's defining properties, option errors, zero strength bit-exact and the DeiT-S GMACs."""

from __future__ import annotations

import math

import pytest
import torch

import tokred
from tokred.reduction import AttentionScores, BlockCall

# --- the reference -------------------------------------------------------------------------------------------------


def ref_wpr(matrix: torch.Tensor, iters: int, boost_cls: bool) -> list[float]:
    """One head's Weighted PageRank on ``matrix`` [n, n] (rows: queries), as a column vector: s <- A^T s."""
    n = matrix.shape[0]
    init = [math.sqrt(n) if (boost_cls and i == 0) else 1.0 for i in range(n)]
    s = torch.tensor([v / sum(init) for v in init], dtype=torch.float64)[:, None]
    a = matrix.double()
    for _ in range(iters):
        s = a.T @ s
    return [float(v) for v in s[:, 0]]


def ref_importance(probs: torch.Tensor, iters: int, p: int, boost_cls: bool, var_range) -> list[float]:
    """EIR over the heads VHF keeps (all when it keeps none): per token the root mean square of the heads' scores."""
    heads = [ref_wpr(probs[h], iters, boost_cls) for h in range(probs.shape[0])]
    kept = []
    for s in heads:
        cand = s[p:]
        mean = sum(cand) / len(cand)
        var = sum((v / mean - 1.0) ** 2 for v in cand) / len(cand)
        if var_range is None or var_range[0] <= var <= var_range[1]:
            kept.append(s)
    kept = kept or heads
    return [math.sqrt(sum(s[j] ** 2 for s in kept) / len(kept)) for j in range(len(heads[0]))]


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def zero_tprune_reference(schedule, iterations, p=1, s_ratio=0.5, partition="sequential", boost_cls=True,
                          var_range=(0.01, 0.7)):  # fmt: skip
    def reduce_block(i, rows, keys, probs, sizes):
        n = len(rows)
        r = min(schedule[i], (n - p) // 2)
        if r <= 0:
            return rows, sizes
        r_s = int(s_ratio * r)
        alive = list(range(n))
        if r_s:
            pre = ref_importance(probs, 1, p, boost_cls, var_range)
            ranked = sorted(range(p, n), key=lambda j: pre[j])  # least important first (stable on ties)
            if partition == "sequential":
                group_a, group_b = ranked[: len(ranked) // 2], ranked[len(ranked) // 2 :]
            else:
                group_a, group_b = ranked[0::2], ranked[1::2]
            best = {a: max(cos(keys[a], keys[b]) for b in group_b) for a in group_a}
            pruned = sorted(group_a, key=lambda a: -best[a])[:r_s]
            alive = [j for j in alive if j not in pruned]
        r_i = r - r_s
        if r_i:
            sub = probs[:, alive][:, :, alive]
            sub = sub / sub.sum(dim=-1, keepdim=True)
            imp = ref_importance(sub, iterations[i], p, boost_cls, var_range)
            ranked = sorted(range(p, len(alive)), key=lambda j: imp[j])
            drop = {alive[j] for j in ranked[:r_i]}
            alive = [j for j in alive if j not in drop]
        return [rows[j] for j in alive], [1.0] * len(alive)

    return reduce_block


def reference(model, x, reduce_block):
    """``model`` on each image of ``x`` with explicit attention; after attention in block ``i``, ``reduce_block(i,
    rows, keys [N, Ch], probs [H, N, N], sizes)`` gives the rows kept."""
    outs = []
    with torch.no_grad():
        for image in x:
            t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))
            sizes = [1.0] * t.shape[1]
            for i, blk in enumerate(model.blocks):
                attn, n = blk.attn, t.shape[1]
                qkv = attn.qkv(blk.norm1(t)).reshape(1, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
                q, k, v = qkv.unbind(0)
                q, k = attn.q_norm(q), attn.k_norm(k)
                probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
                t = t + blk.ls1(attn.proj(attn.norm((probs @ v).transpose(1, 2).reshape(1, n, -1))))
                rows, sizes = reduce_block(i, list(t[0]), k[0].mean(dim=0), probs[0], sizes)
                t = torch.stack(rows)[None]
                t = t + blk.ls2(blk.mlp(blk.norm2(t)))
            outs.append(model.forward_head(model.norm(t)))
    return torch.cat(outs)


@pytest.fixture
def vit():
    """A small timm ViT with a class token (64 patches + cls, 4 blocks), its attention made peaked so that the
    importance scores differ clearly between tokens and between heads."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * 48].mul_(4.0)
    return model


def images(seed, n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def applied(model, x, **options):
    with tokred.apply(model, "zero_tprune", **options) as patch, torch.no_grad():
        return model(x), patch.token_counts()


# --- equal to the reference ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "seed, options",
    [
        (0, {"r": 6}),  # the defaults: iterations 30, 30, 30, 1 on 4 blocks
        (1, {"r": [9, 4, 12, 5], "s_ratio": 0.3, "partition": "alternate"}),
        (2, {"r": 7, "cls_init": "uniform", "var_range": None, "wpr_iters": 4}),
        (3, {"r": 10, "s_ratio": 1.0, "var_range": (0.005, 0.05)}),  # S-stage only; a filter between the heads
        (4, {"r": 8, "s_ratio": 0.0, "wpr_iters": [2, 50, 1, 7], "var_range": (0.005, 0.7)}),  # I-stage only
    ],
)
def test_equals_reference(vit, seed, options):
    from tokred.methods.tome import parse_r
    from tokred.methods.zero_tprune import default_iterations

    x = images(seed)
    got, _ = applied(vit, x, **options)
    iters = options.get("wpr_iters")
    iterations = default_iterations(4) if iters is None else [iters] * 4 if isinstance(iters, int) else iters
    ref = zero_tprune_reference(
        parse_r(options["r"], 4), iterations, s_ratio=options.get("s_ratio", 0.5),
        partition=options.get("partition", "sequential"), boost_cls=options.get("cls_init", "sqrt_n") == "sqrt_n",
        var_range=options.get("var_range", (0.01, 0.7)),
    )  # fmt: skip
    torch.testing.assert_close(got, reference(vit, x, ref), rtol=0, atol=1e-5)


def test_equals_reference_with_register_tokens():
    """Four registers and a class token in front (DINOv2-reg, LayerScale): five prefix tokens never pruned, only the
    class token boosted."""
    from tiny_models import tiny_timm_vit

    model = tiny_timm_vit("vit_small_patch14_reg4_dinov2", depth=3)
    x = images(5)
    got, counts = applied(model, x, r=9)
    expected = reference(model, x, zero_tprune_reference([9, 9, 9], [30, 30, 1], p=5))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert [c.mlp for c in counts.values()] == [69 - 9, 69 - 18, 69 - 27]


# --- defining properties -------------------------------------------------------------------------------------------
def synthetic_scores(b=2, n=17, h=3, c=6, p=1, seed=0, keys=None):
    g = torch.Generator().manual_seed(seed)
    probs = (3 * torch.randn(b, h, n, n, generator=g)).softmax(dim=-1)
    keys = torch.randn(b, n, c, generator=g) if keys is None else keys
    tokens = torch.randn(b, n, 8, generator=g)
    call = BlockCall("blocks.0", 0, torch.nn.Identity(), 1, None, 0)
    return AttentionScores(tokens, keys, None, p, call, None, probs)


def options(**kw):
    from tokred.methods.zero_tprune import ZeroTPruneOptions

    return ZeroTPruneOptions(**kw)


def test_wpr_is_power_iteration_and_converges_to_the_fixed_point():
    from tokred.methods.zero_tprune import weighted_pagerank

    probs = synthetic_scores().attention
    for boost in (False, True):
        got = weighted_pagerank(probs, 7, boost)
        for b in range(2):
            for h in range(3):
                expected = torch.tensor(ref_wpr(probs[b, h], 7, boost), dtype=torch.float64)
                torch.testing.assert_close(got[b, h].double(), expected)
    stationary = weighted_pagerank(probs, 300, True)
    # the fixed point: every token's score is the importance-weighted attention it receives, s = A^T s, sum 1
    torch.testing.assert_close(stationary, (probs.transpose(-1, -2) @ stationary[..., None])[..., 0])
    torch.testing.assert_close(stationary.sum(dim=-1), torch.ones(2, 3))


def test_head_filter_keeps_the_heads_in_range_and_falls_back_to_all():
    from tokred.methods.zero_tprune import head_aggregate

    flat = torch.full((9,), 0.1)  # scores / mean all 1: variance 0, filtered out (uninformative)
    moderate = torch.tensor([0.1, 0.05, 0.15, 0.1, 0.05, 0.15, 0.1, 0.2, 0.1])  # variance 0.25 over the 8 candidates
    spike = torch.tensor([0.1] + [0.0] * 7 + [0.9])  # variance 7 over the candidates: one token, filtered out
    scores = torch.stack([flat, moderate, spike])[None]
    torch.testing.assert_close(head_aggregate(scores, 1, (0.01, 0.7)), moderate[None])  # RMS of one head: itself
    rms = scores.square().mean(dim=1).sqrt()
    torch.testing.assert_close(head_aggregate(scores, 1, (10.0, 20.0)), rms)  # none passes: all heads
    torch.testing.assert_close(head_aggregate(scores, 1, None), rms)


def test_i_stage_prunes_the_least_important_by_hand_computed_wpr():
    from tokred.methods.zero_tprune import zero_tprune_selection

    s = synthetic_scores(p=2)
    select = zero_tprune_selection(s, 5, 9, options(s_ratio=0.0))
    for b in range(2):
        imp = ref_importance(s.attention[b], 9, 2, True, (0.01, 0.7))
        dropped = sorted(range(2, 17), key=lambda j: imp[j])[:5]
        assert select.keep[b].tolist() == [j for j in range(17) if j not in dropped]


def test_s_stage_prunes_the_a_token_of_the_most_similar_pair():
    """Token 3 is made a copy (up to scale) of token 9; with token 3 among the less important half and token 9 in
    the more important half, the S-stage prunes token 3 (cosine 1, the most similar pair) and keeps token 9."""
    from tokred.methods.zero_tprune import importance, zero_tprune_selection

    s = synthetic_scores()
    pre = importance(s.attention.float(), 1, 1, options())[:, 1:]
    rank = pre.argsort(dim=1) + 1  # least important first
    keys = s.keys.clone()
    for b in range(2):
        low, high = int(rank[b, 0]), int(rank[b, -1])
        keys[b, low] = 2.5 * keys[b, high]
        scores = AttentionScores(s.tokens, keys, None, 1, s.call, None, s.attention)
        kept = zero_tprune_selection(scores, 1, 1, options(s_ratio=1.0)).keep[b].tolist()
        assert low not in kept and high in kept and len(kept) == 16 and kept == sorted(kept)


def test_pruned_tokens_are_gone_and_prefix_tokens_stay_in_front():
    from tokred.methods.zero_tprune import zero_tprune_selection

    s = synthetic_scores(n=21, p=3, seed=4)
    select = zero_tprune_selection(s, 7, 5, options())
    out, size = select.reduce(s.tokens, None)
    source = select.reduce_source(torch.eye(21).expand(2, 21, 21))
    assert out.shape == (2, 14, 8) and size is None
    for b in range(2):
        assert torch.equal(out[b, :3], s.tokens[b, :3])
        kept = select.keep[b].tolist()
        assert kept[:3] == [0, 1, 2] and kept == sorted(set(kept))
        assert torch.equal(out[b], s.tokens[b, kept])
        gone = [j for j in range(21) if j not in kept]
        assert len(gone) == 7 and source[b][:, gone].sum() == 0
    assert zero_tprune_selection(s, 0, 5, options()) is None


# --- zero strength, options, refusals, FLOPs -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch", ["vit_small_patch16_224", "deit3_small_patch16_224", "deit_small_distilled_patch16_224"]
)
def test_zero_strength_is_bit_exact(arch):
    from tiny_models import tiny_timm_vit

    model, x = tiny_timm_vit(arch, depth=3), images(6)
    with torch.no_grad():
        base = model(x)
        for r in (0, [0, 0, 0]):
            with tokred.apply(model, "zero_tprune", r=r) as patch:
                assert torch.equal(model(x), base)
                assert all(c.mlp == c.tokens for c in patch.token_counts().values())


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"partition": "random"}, r"'partition'='random' is invalid; valid: 'sequential' or 'alternate'"),
        ({"cls_init": "ones"}, r"'cls_init'='ones' is invalid; valid: 'sqrt_n' or 'uniform'"),
        ({"var_range": (0.7, 0.01)}, r"'var_range'=\(0.7, 0.01\) is invalid; valid: None, or \(var_min, var_max\)"),
        ({"s_ratio": 1.5}, r"'s_ratio'=1.5 is invalid; valid: 0 <= s_ratio <= 1"),
        ({"wpr_iters": 0}, r"'wpr_iters'=0 is invalid; valid: None, an int >= 1"),
        ({"wpr_iters": [3, 3, 3]}, r"wpr_iters has 3 entries but the model has 2 blocks"),
        ({"r": -1}, r"'r'=-1 is invalid"),
        ({"r": [0, 0.5]}, r"'r'=\[0, 0.5\] is invalid"),
    ],
)
def test_bad_options_raise_clear_errors(bad, message):
    from tiny_models import tiny_timm_vit

    model = tiny_timm_vit("vit_small_patch16_224")
    with pytest.raises(tokred.InvalidOptionError, match=message):
        tokred.apply(model, "zero_tprune", **bad)
    assert tokred.get_patch(model) is None


def test_no_class_token_needs_uniform_init():
    from tiny_models import tiny_timm_vit

    model, x = tiny_timm_vit("vit_base_patch16_siglip_224"), images(7)
    with pytest.raises(tokred.UnsupportedModelError, match=r"no class token .* cls_init='uniform'"):
        tokred.apply(model, "zero_tprune")
    _, counts = applied(model, x, cls_init="uniform", r=8)
    assert [c.mlp for c in counts.values()] == [56, 48]


def test_fused_attention_matches_eager_and_gradients_flow(vit):
    x = images(8)
    fused, _ = applied(vit, x, r=6)
    for blk in vit.blocks:
        blk.attn.fused_attn = False
    eager, _ = applied(vit, x, r=6)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)
    x.requires_grad_(True)
    with tokred.apply(vit, "zero_tprune", r=6):
        vit(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_deit_s_gmacs_at_the_defaults_near_the_papers_3_0():
    """DeiT-S at 224x224: 4.60 GMACs unreduced; the paper's Zero-TPrune setting is 34.7% fewer, 3.0. The default r=12
    prunes 12 tokens per block (197, 185, ..., 53 through the MLPs) and counts 2.96, its own work included: the
    explicit attention matrix, the WPR iterations and the S-stage similarity cost exactly their matmuls over ToMe at
    the same token counts. Random weights: the counts depend on the token counts only."""
    import timm

    from tokred.flops import count_flops
    from tokred.methods.zero_tprune import default_iterations

    torch.manual_seed(0)
    model, x = timm.create_model("deit_small_patch16_224", pretrained=False).eval(), torch.randn(1, 3, 224, 224)
    with tokred.apply(model, "zero_tprune") as patch:
        flops = count_flops(lambda: model(x))
        counts = [c.mlp for c in patch.token_counts().values()]
    with tokred.apply(model, "tome", r=12):
        tome = count_flops(lambda: model(x))
    assert counts == [197 - 12 * (i + 1) for i in range(12)]
    h, d, own = 6, 64, 0
    for n, iters in zip([197 - 12 * i for i in range(12)], default_iterations(12), strict=True):
        a = (n - 1) // 2
        own += 2 * h * n * n * d + 2 * h * n * n  # attention matrix; I'-stage, one iteration
        own += 2 * a * (n - 1 - a) * d + iters * 2 * h * (n - 6) ** 2  # S-stage similarity; I-stage WPR
        own -= 2 * ((n + 1) // 2) * (n // 2) * d  # ToMe's own similarity
    assert flops == tome + own
    gmacs = flops / 2e9
    # within 0.05 GMACs (1.7%) of the paper's 3.0: the FLOPs the paper removes, up to its per-layer schedule
    assert abs(gmacs - 3.0) < 0.05 and gmacs > tome / 2e9


if __name__ == "__main__":
    torch.set_num_threads(1)
    import timm

    from tokred.flops import count_flops

    torch.manual_seed(0)
    model, x = timm.create_model("deit_small_patch16_224", pretrained=False).eval(), torch.randn(1, 3, 224, 224)
    print(f"DeiT-S 224x224 baseline    {count_flops(lambda: model(x)) / 2e9:.3f} GMACs per image")
    for method in ("zero_tprune", "tome"):
        with tokred.apply(model, method):
            print(f"DeiT-S 224x224 {method:11s} {count_flops(lambda: model(x)) / 2e9:.3f} GMACs per image (defaults)")
