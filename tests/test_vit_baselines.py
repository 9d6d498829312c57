"""The ViT baselines (EViT, ToFu, PiToMe) against references written differently: one image at a time, plain
Python loops over tokens and an explicit attention matrix; plus each method's defining property, zero strength
bit-exact, token accounting and the DeiT-S GMACs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokred
from tokred.reduction import AttentionScores, BlockCall

# --- the reference ViT: explicit attention, a Python reduction per block, one image at a time -------------------


def reference_forward(model, image, reduce_block, prop_attn=False):
    """``model``'s forward on ``image`` [1, 3, H, W] with explicit attention; after attention in block ``i``
    ``reduce_block(i, tokens [N, C] as a list of rows, keys [N, Ch], probs [H, N, N], sizes list)`` returns the
    new rows and sizes."""
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image))))
    sizes = [1.0] * t.shape[1]
    for i, blk in enumerate(model.blocks):
        attn, n = blk.attn, t.shape[1]
        h = blk.norm1(t)
        q, k, v = attn.qkv(h).reshape(1, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if prop_attn:
            logits = logits + torch.tensor(sizes).log()
        probs = logits.softmax(dim=-1)
        out = attn.proj(attn.norm((probs @ v).transpose(1, 2).reshape(1, n, -1)))
        t = t + blk.ls1(out)
        rows, sizes = reduce_block(i, list(t[0]), k[0].mean(dim=0), probs[0], sizes)
        t = torch.stack(rows)[None]
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.forward_head(model.norm(t))


def reference(model, x, reduce_block, prop_attn=False):
    with torch.no_grad():
        return torch.cat([reference_forward(model, x[i : i + 1], reduce_block, prop_attn) for i in range(len(x))])


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def evit_reference(locations, keep_rate, p=1, fuse=True):
    def reduce_block(i, rows, keys, probs, sizes):
        if i not in locations:
            return rows, sizes
        att = probs[:, 0].mean(dim=0)  # the class token's row, averaged over heads
        candidates = list(range(p, len(rows)))
        left = math.ceil(keep_rate * len(candidates))
        ranked = sorted(candidates, key=lambda j: -float(att[j]))
        kept, dropped = ranked[:left], ranked[left:]
        new = rows[:p] + [rows[j] for j in kept]
        if fuse and dropped:
            new.append(sum(att[j] * rows[j] for j in dropped))
        return new, [1.0] * len(new)

    return reduce_block


def tome_pairs(keys, r, p):
    """ToMe's alternating matching, in loops: (sources, their destinations) as token positions, and the
    unmerged even positions in order."""
    evens, odds = list(range(0, len(keys), 2)), list(range(1, len(keys), 2))
    best = {}
    for a in evens:
        if a < p:
            continue
        options = [(cos(keys[a], keys[b]), b) for b in odds if b >= p]
        best[a] = max(options)
    r = min(r, (len(keys) - p) // 2)
    sources = sorted(best, key=lambda a: -best[a][0])[:r]
    return {a: best[a][1] for a in sources}, [a for a in evens if a not in sources], odds


def tofu_reference(schedule, merge_from, p=1):
    def reduce_block(i, rows, keys, probs, sizes):
        r = schedule[i]
        if r == 0:
            return rows, sizes
        pairs, unmerged, odds = tome_pairs(keys, r, p)
        new = [rows[a] for a in unmerged]
        for b in odds:
            members = [b] + [a for a, d in pairs.items() if d == b]
            if i < merge_from or len(members) == 1:  # pruned sources vanish; lone destinations stay
                new.append(rows[b])
                continue
            mean = sum(rows[m] for m in members) / len(members)
            new.append(mean / mean.norm() * max(rows[m].norm() for m in members))
        return new, [1.0] * len(new)

    return reduce_block


def pitome_reference(schedule, margins, bsm_blocks, p=1):
    def reduce_block(i, rows, keys, probs, sizes):
        r = schedule[i]
        if r == 0:
            return rows, sizes
        tokens = list(range(p, len(rows)))
        r = min(r, len(tokens) // 2)
        sim = {(a, b): cos(keys[a], keys[b]) for a in tokens for b in tokens}
        energy = {a: sum(F.elu(torch.tensor(sim[a, b] - margins[i])) for b in tokens) / len(tokens) for a in tokens}
        order = sorted(tokens, key=lambda a: -float(energy[a]))
        merging = order[: 2 * r] if i >= bsm_blocks else order
        srcs, dsts = merging[0::2], merging[1::2]
        best = {a: max((sim[a, d], d) for d in dsts) for a in srcs}
        if i >= bsm_blocks:
            merged, kept = srcs, order[2 * r :]
        else:
            merged = sorted(srcs, key=lambda a: -best[a][0])[:r]
            kept = [a for a in srcs if a not in merged]
        new, new_sizes = rows[:p] + [rows[a] for a in kept], sizes[:p] + [sizes[a] for a in kept]
        for d in dsts:
            members = [d] + [a for a in merged if best[a][1] == d]
            total = sum(sizes[m] for m in members)
            new.append(sum(sizes[m] * rows[m] for m in members) / total)
            new_sizes.append(total)
        return new, new_sizes

    return reduce_block


def mctf_reference(model, image, schedule, start, tau=(1.0, 20.0, 40.0), bidirection=True, p=1):
    """MCTF on one image, in loops: fusion before attention, the block's attention probabilities reduced and reused
    (one-step-ahead), pooling weights = attention received * size / max size."""
    tau_sim, tau_info, tau_size = tau
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image))))
    sizes = None
    for i, blk in enumerate(model.blocks):
        attn, n = blk.attn, t.shape[1]
        q, k, v = attn.qkv(blk.norm1(t)).reshape(1, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if sizes is not None:
            logits = logits + torch.tensor(sizes).log()
        probs = logits.softmax(dim=-1)[0]  # [H, n, n]
        r = schedule[i] if i >= start else 0
        r = min(n - 10 if n - r < 10 else r, (n - p) // 2)
        if r > 0:
            rows = list(t[0])
            received = [float(probs[:, :, j].mean()) for j in range(n)]
            info = [(1 / x) / max(1 / y for y in received) for x in received]
            size = sizes or [1.0] * n
            small = [(1 / x) / max(1 / y for y in size) for x in size]

            def w(a, b, rows=rows, info=info, small=small, sized=sizes is not None):
                score = ((cos(rows[a], rows[b]) + 1) / 2) ** (1 / tau_sim) * (info[a] * info[b]) ** (1 / tau_info)
                return score * ((small[a] * small[b]) ** (1 / tau_size) if sized else 1.0)

            evens, odds = list(range(0, n, 2)), list(range(1, n, 2))
            r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
            best = {a: max((w(a, b), b) for b in odds if b >= p) for a in evens if a >= p}
            stage1 = sorted(best, key=lambda a: -best[a][0])[:r1]
            groups = {b: [b] + [a for a in stage1 if best[a][1] == b] for b in odds}
            left = [a for a in evens if a not in stage1]
            best2 = {b: max((w(a, b), a) for a in left if a >= p) for b in odds if b >= p}
            order2 = sorted(odds, key=lambda b: -best2[b][0] if b in best2 else math.inf)
            stage2 = order2[:r2]
            out_groups = [[a] + [m for b in stage2 if best2[b][1] == a for m in groups[b]] for a in left]
            out_groups += [groups[b] for b in order2[r2:]]
            pool = [received[m] * size[m] / max(size) for m in range(n)]
            t = torch.stack([sum(pool[m] * rows[m] for m in g) / sum(pool[m] for m in g) for g in out_groups])[None]
            sizes = [sum(size[m] for m in g) for g in out_groups]
            cols = torch.stack([probs[:, :, g].sum(dim=-1) for g in out_groups], dim=-1)  # [H, n, n']
            probs = torch.stack([sum(pool[m] * cols[:, m] for m in g) / sum(pool[m] for m in g) for g in out_groups], 1)
            nn = t.shape[1]
            v = attn.qkv(blk.norm1(t)).reshape(1, nn, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
        out = attn.proj((probs[None] @ v).transpose(1, 2).reshape(1, t.shape[1], -1))
        t = t + blk.ls1(out)
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.forward_head(model.norm(t))


@pytest.fixture
def vit():
    """A small timm ViT with a class token: 32x32 images in 4x4 patches (64 patches + cls), 4 blocks."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10).eval()


def images(seed):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def applied(model, x, method, **options):
    with tokred.apply(model, method, **options), torch.no_grad():
        return model(x)


# --- equal to the references -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, keep_rate, drop_loc, fuse", [(0, 0.7, (1, 2), True), (1, 0.5, (0, 2, 3), True),
                                                             (2, 0.6, (1,), False), (3, 0.9, None, True)])  # fmt: skip
def test_evit_equals_reference(vit, seed, keep_rate, drop_loc, fuse):
    x = images(seed)
    got = applied(vit, x, "evit", keep_rate=keep_rate, drop_loc=drop_loc, fuse_token=fuse)
    locations = {1, 2, 3} if drop_loc is None else set(drop_loc)  # 4 blocks: depth * k // 4
    expected = reference(vit, x, evit_reference(locations, keep_rate, fuse=fuse))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed, r, merge_from", [(0, 5, None), (1, 8, 1), (2, [3, 9, 2, 6], 0), (3, 4, 4)])
def test_tofu_equals_reference(vit, seed, r, merge_from):
    from tokred.methods.tome import parse_r

    x = images(seed)
    got = applied(vit, x, "tofu", r=r, merge_from=merge_from)
    expected = reference(vit, x, tofu_reference(parse_r(r, 4), 3 if merge_from is None else merge_from))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "seed, r, margin, bsm_blocks", [(0, 6, None, None), (1, 10, 0.3, 0), (2, [4, 8, 12, 3], None, 4), (3, 5, -0.2, 1)]
)
def test_pitome_equals_reference(vit, seed, r, margin, bsm_blocks):
    from tokred.methods.tome import parse_r

    x = images(seed)
    got = applied(vit, x, "pitome", r=r, margin=margin, bsm_blocks=bsm_blocks)
    margins = [0.75 - 0.75 * i / 4 if margin is None else margin for i in range(4)]
    expected = reference(vit, x, pitome_reference(parse_r(r, 4), margins, 2 if bsm_blocks is None else bsm_blocks))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "seed, r, start, bidirection", [(0, 6, 1, True), (1, 9, 0, True), (2, [0, 4, 12, 7], 1, False), (3, 11, 2, True)]
)
def test_mctf_equals_reference(vit, seed, r, start, bidirection):
    from tokred.methods.tome import parse_r

    with torch.no_grad():  # peaked attention, so that the attention-derived weights differ between tokens
        for blk in vit.blocks:
            blk.attn.qkv.weight[: 2 * 48].mul_(6.0)

    x = images(seed)
    got = applied(vit, x, "mctf", r=r, start_block=start, bidirection=bidirection)
    with torch.no_grad():
        expected = torch.cat([mctf_reference(vit, x[i : i + 1], parse_r(r, 4), start, bidirection=bidirection)
                              for i in range(len(x))])  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# --- defining properties -----------------------------------------------------------------------------------------
def synthetic_scores(b=3, n=21, c=8, p=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens, keys = torch.randn(b, n, c, generator=g), torch.randn(b, n, 6, generator=g)
    cls_attention = torch.rand(b, n, generator=g).softmax(dim=-1)
    call = BlockCall("blocks.0", 0, torch.nn.Identity(), 1, None, 0)
    return AttentionScores(tokens, keys, None, p, call, cls_attention)


@pytest.mark.parametrize("fuse_mean", [False, True])
def test_evit_fused_token_is_the_attention_weighted_combination_of_the_dropped(fuse_mean):
    from tokred.methods.evit import evit_selection

    s = synthetic_scores(p=2)
    out, size = evit_selection(s, 0.6, True, fuse_mean).reduce(s.tokens, None)
    left = math.ceil(0.6 * 19)
    for row in range(3):
        att = s.cls_attention[row, 2:]
        ranked = att.argsort(descending=True) + 2
        kept, dropped = ranked[:left], ranked[left:]
        assert torch.equal(out[row, :2], s.tokens[row, :2])  # prefix tokens first, untouched
        assert torch.equal(out[row, 2:-1], s.tokens[row, kept])  # the most attended, most attended first
        weights = s.cls_attention[row, dropped]
        if fuse_mean:
            weights = weights / weights.sum()
        torch.testing.assert_close(out[row, -1], (weights[:, None] * s.tokens[row, dropped]).sum(dim=0))
        assert float(size[row, -1]) == len(dropped) and out.shape[1] == 2 + left + 1


def test_pitome_protected_tokens_are_never_merged():
    from tokred.methods.pitome import energy, pitome_merge

    s = synthetic_scores(n=33, p=1)
    merge = pitome_merge(s, 6, 0.2, 1.0, protect=True)
    out, size = merge.reduce(s.tokens, None)
    source = merge.reduce_source(torch.eye(33).expand(3, 33, 33))
    e, _ = energy(s.keys[:, 1:], 0.2, 1.0)
    for row in range(3):
        protected = e[row].argsort(descending=True)[12:] + 1  # all but the 2r highest-energy tokens
        # each protected token is alone in an output token that equals it exactly, size 1
        for tok in protected.tolist():
            (hit,) = (source[row, :, tok] == 1).nonzero()[:, 0].tolist()
            assert torch.equal(out[row, hit], s.tokens[row, tok]) and source[row, hit].sum() == 1
        assert torch.equal(out[row, 0], s.tokens[row, 0]) and out.shape[1] == 33 - 6
        assert size[row].sum() == 33


def test_tofu_pruned_tokens_are_gone_and_merged_tokens_keep_the_largest_norm():
    from tokred.merge import NormMerge, PruneSources, alternate_matching

    s = synthetic_scores(n=25, p=1)
    x = s.tokens * torch.rand(3, 25, 1, generator=torch.Generator().manual_seed(1)) * 3  # norms differ
    merge = alternate_matching(s.keys, 7, 1)
    eye = torch.eye(25).expand(3, 25, 25)
    pruned, _ = PruneSources(merge).reduce(x, None)
    kept_source = PruneSources(merge).reduce_source(eye)
    merged, size = NormMerge(merge).reduce(x, None)
    merged_source = NormMerge(merge).reduce_source(eye)
    for row in range(3):
        sources = (2 * merge.src_idx[row, :, 0]).tolist()  # positions of the pruned/merged sources
        assert pruned.shape[1] == 25 - 7 and kept_source[row, :, sources].sum() == 0  # gone
        for t in range(pruned.shape[1]):  # every kept token is an input token, unchanged
            (orig,) = kept_source[row, t].nonzero()[:, 0].tolist()
            assert torch.equal(pruned[row, t], x[row, orig])
        for t in range(merged.shape[1]):
            members = merged_source[row, t].nonzero()[:, 0]
            largest = x[row, members].norm(dim=-1).max()
            torch.testing.assert_close(merged[row, t].norm(), largest)
            assert float(size[row, t]) == len(members)
            if len(members) > 1:  # the direction is the members' mean
                mean = x[row, members].mean(dim=0)
                torch.testing.assert_close(merged[row, t], mean / mean.norm() * largest)


# --- zero strength, accounting, refusals, FLOPs ------------------------------------------------------------------
ZERO = {"evit": {"keep_rate": 1.0}, "tofu": {"r": 0}, "pitome": {"r": 0}, "mctf": {"r": 0}}


@pytest.mark.parametrize("method", sorted(ZERO))
@pytest.mark.parametrize(
    "arch", ["vit_small_patch16_224", "deit3_small_patch16_224", "deit_small_distilled_patch16_224"]
)
def test_zero_strength_is_bit_exact(method, arch):
    from tiny_models import tiny_timm_vit

    model, x = tiny_timm_vit(arch, depth=4), images(5)
    with torch.no_grad():
        base = model(x)
        with tokred.apply(model, method, **ZERO[method]) as patch:
            assert torch.equal(model(x), base)
            assert all(c.mlp == c.tokens for c in patch.token_counts().values())


def test_planner_names_select_blocks_and_sizes_pass_through_the_others(vit):
    """``install_blocks(..., names)`` asks the planner for those blocks only; the others still carry the token sizes
    (proportional attention downstream), so planning block 0 alone equals ToMe with r=[3] everywhere else 0."""
    from tokred.merge import alternate_matching
    from tokred.method import Method
    from tokred.reduction import BlockPlan, TokenReduce

    asked = []

    class FirstBlock(Method):
        options = {"timm_vit": object}

        def install(self, patch):
            def plan(call, x):
                asked.append(call.name)
                return BlockPlan(tokens=TokenReduce(lambda s: alternate_matching(s.keys, 3, s.num_protected)))

            patch.adapter.install_blocks(patch, plan, {"blocks.0"}, prop_attn=True)

    x = images(11)
    with torch.no_grad():
        with tokred.apply(vit, "tome", r=[3]):
            expected = vit(x)
        from tokred.adapters import resolve_adapter
        from tokred.patch import Patch
        from tokred.state import RunState

        adapter = resolve_adapter(vit)
        patch = Patch(adapter, FirstBlock(None), RunState())
        patch.method.install(patch)
        try:
            got = vit(x)
        finally:
            patch.remove()
    assert asked == ["blocks.0"] and torch.equal(got, expected)


def test_evit_refuses_models_without_a_class_token_and_out_of_range_locations():
    from tiny_models import tiny_timm_vit

    with pytest.raises(tokred.UnsupportedModelError, match="no class token"):
        tokred.apply(tiny_timm_vit("vit_base_patch16_siglip_224"), "evit")
    with pytest.raises(tokred.InvalidOptionError, match=r"drop_loc \[5\] beyond the model's 2 blocks"):
        tokred.apply(tiny_timm_vit("vit_small_patch16_224"), "evit", drop_loc=[0, 5])


def deit_s_gmacs() -> tuple[dict[str, float], dict[str, list[float]]]:
    """GMACs per image (FLOPs / 2) of DeiT-S at 224x224, unreduced and with each ViT method at its defaults, and
    each method's token counts through the MLPs. Random weights: the counts depend on the token counts only."""
    import timm

    from tokred.flops import count_flops

    torch.manual_seed(0)
    model, x = timm.create_model("deit_small_patch16_224", pretrained=False).eval(), torch.randn(1, 3, 224, 224)
    gmacs, counts = {"baseline": count_flops(lambda: model(x)) / 2e9}, {}
    for method in ("evit", "tome", "tofu", "pitome", "mctf"):
        with tokred.apply(model, method) as patch:
            gmacs[method] = count_flops(lambda: model(x)) / 2e9
            counts[method] = [c.mlp for c in patch.token_counts().values()]
    return gmacs, counts


@pytest.mark.parametrize("method, options", [("evit", {"keep_rate": 0.6}), ("tofu", {"r": 6}), ("pitome", {"r": 6})])
def test_fused_attention_stays_and_matches_eager(vit, method, options):
    """The scores are computed next to timm's fused attention (its SDPA kernel still runs, once per block, and the
    class-token row is an extra matmul in the FLOP count); the eager path gives the same output."""
    from tokred.flops import flop_counter

    x = images(7)
    with tokred.apply(vit, method, **options), torch.no_grad():
        counter = flop_counter()
        with counter:
            fused = vit(x)
        sdpa = [op for op in counter.get_flop_counts()["Global"] if "scaled_dot_product" in str(op)]
        assert sdpa, "fused attention was given up"
        for blk in vit.blocks:
            blk.attn.fused_attn = False
        eager = vit(x)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method, options", [("evit", {"keep_rate": 0.6}), ("tofu", {"r": 6, "size_weighted": True}),
                                             ("pitome", {"r": 6, "prop_attn": True}), ("mctf", {"r": 6})])  # fmt: skip
def test_gradients_flow_through_the_reductions(vit, method, options):
    x = images(8).requires_grad_(True)
    with tokred.apply(vit, method, **options) as patch:
        vit(x).sum().backward()
        assert any(c.mlp < c.tokens for c in patch.token_counts().values())
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_evit_class_attention_row_costs_one_query(vit):
    """EViT's extra work is the class token's attention row in each drop block: 2 * N * C FLOPs per image there."""
    from tokred.flops import count_flops

    x = images(9)
    with tokred.apply(vit, "evit", keep_rate=1.0):
        full = count_flops(lambda: vit(x))
    with tokred.apply(vit, "evit", keep_rate=0.999):  # drops nothing (ceil keeps all 64), scores computed
        scored = count_flops(lambda: vit(x))
    assert scored - full == 3 * 2 * (2 * 65 * 48)  # 3 drop blocks, batch 2, one query row over 65 keys


def test_deit_s_gmacs_match_the_published_counts():
    """EViT keep 0.7 at blocks 4/7/10 is 3.0 GMACs in its README (4.6 unreduced); ToMe r=13 is 2.7."""
    gmacs, counts = deit_s_gmacs()
    assert counts["evit"] == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3
    assert abs(gmacs["baseline"] - 4.6) < 0.05 and abs(gmacs["evit"] - 3.0) < 0.05
    assert abs(gmacs["tome"] - 2.7) < 0.05 and gmacs["tofu"] == gmacs["tome"]
    assert gmacs["tome"] < gmacs["pitome"] < gmacs["tome"] + 0.05  # + the energy's N x N similarity
    assert counts["mctf"] == [197 - 16 * i for i in range(12)]  # r=16 from the second block, before attention
    assert 2.5 < gmacs["mctf"] < gmacs["tome"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, value in deit_s_gmacs()[0].items():
        print(f"DeiT-S 224x224 {name:9s} {value:.3f} GMACs per image (defaults)")
