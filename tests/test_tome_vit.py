"""ToMe on timm ViTs: schedules, protected tokens, sizes, exactness at r=0, fused vs eager attention."""

import pytest
import timm
import torch

import tokred
from tokred.methods.tome import parse_r as installed_parse_r


def small(name: str, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=64, depth=4, **kw).eval()


def test_methods_folder_is_installed_as_tokred_methods():
    import tokred.methods.tome as m

    assert m.__name__ == "tokred.methods.tome"
    assert tokred.get_method("tome").__module__ == "tokred.methods.tome"


@pytest.mark.parametrize(
    "r, layers, expected",
    [
        (3, 4, [3, 3, 3, 3]),
        ([5, 1], 4, [5, 1, 0, 0]),
        ((4, -1), 5, [8, 6, 4, 2, 0]),
        ((4, 0), 3, [4, 4, 4]),
        ((4, 1), 3, [0, 4, 8]),
        ((16, -1), 12, [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]),
    ],
)
def test_parse_r_matches_official_schedule(r, layers, expected):
    assert installed_parse_r(r, layers) == expected


@pytest.mark.parametrize("r", [2, 5, (6, -1), [20, 0, 3, 1]])
@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_small_distilled_patch16_224"])
def test_token_count_follows_schedule_and_protected_tokens_stay(name, r):
    model = small(name)
    x = torch.randn(2, 3, 64, 64)
    schedule = installed_parse_r(r, len(model.blocks))
    protected = model.num_prefix_tokens
    counts = []
    model.blocks[-1].register_forward_hook(lambda m, i, o: counts.append(o.shape[1]))
    for blk in model.blocks[:-1]:
        blk.register_forward_hook(lambda m, i, o: counts.append(o.shape[1]))
    with tokred.apply(model, "tome", r=r, trace_source=True) as patch, torch.no_grad():
        model(x)
        size, source = patch.adapter.merged_tokens.size, patch.adapter.merged_tokens.source
    n = 16 + protected
    expected = []
    for r_i in schedule:
        n -= min(r_i, (n - protected) // 2)
        expected.append(n)
    assert counts[-1:] + counts[:-1] == expected or counts == expected
    # sizes count the input tokens each merged token stands for
    assert torch.equal(size.sum(dim=1).flatten(), torch.full((2,), float(16 + protected)))
    assert torch.equal(source.sum(dim=-1, keepdim=True), size)
    # cls (and the distillation token) are never merged and stay in front, in order
    for k in range(protected):
        one_hot = torch.nn.functional.one_hot(torch.tensor(k), 16 + protected).float()
        assert torch.equal(source[:, k], one_hot.expand(2, -1))


@pytest.mark.parametrize(
    "name, kw",
    [
        ("deit_small_patch16_224", {}),
        ("deit3_small_patch16_224", {}),  # LayerScale
        ("deit_small_distilled_patch16_224", {}),
        ("vit_small_patch16_224", {"qk_norm": True}),
    ],
)
def test_r_zero_is_bit_identical(name, kw):
    model = small(name, **kw)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        baseline = model(x)
        with tokred.apply(model, "tome", r=0):
            patched = model(x)
        restored = model(x)
    assert torch.equal(baseline, patched)
    assert torch.equal(baseline, restored)


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"init_values": 0.1}])
def test_fused_attention_with_size_mask_matches_eager(kw):
    """Proportional attention as an additive SDPA mask equals the explicit log(size) on the logits."""
    model = small("vit_small_patch16_224", **kw)
    x = torch.randn(2, 3, 64, 64)
    with tokred.apply(model, "tome", r=3), torch.no_grad():
        assert all(b.attn.fused_attn for b in model.blocks)
        fused = model(x)
        for b in model.blocks:
            b.attn.fused_attn = False
        eager = model(x)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_proportional_attention_changes_output_and_can_be_disabled():
    model = small("deit_small_patch16_224")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with tokred.apply(model, "tome", r=4):
            prop = model(x)
        with tokred.apply(model, "tome", r=4, prop_attn=False):
            plain = model(x)
    assert not torch.allclose(prop, plain)


def test_layerscale_is_applied_when_merging():
    """Official ToMe drops ls1/ls2. With LayerScale gammas at 0 every block is the identity, so the cls token,
    never merged, reaches the head unchanged: merging must then give exactly the baseline logits."""
    model = small("deit3_small_patch16_224")
    for b in model.blocks:
        b.ls1.gamma.data.zero_()
        b.ls2.gamma.data.zero_()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base = model(x)
        with tokred.apply(model, "tome", r=3) as patch:
            merged = model(x)
            assert patch.adapter.merged_tokens.size.shape[1] < 17
    assert torch.equal(merged, base)


@pytest.mark.parametrize("num_protected", [0, 1, 2, 5])
@pytest.mark.parametrize("with_size", [False, True])
def test_weighted_mean_equals_the_plain_formula(num_protected, with_size):
    """The one-buffer merge (inference) and the training path both equal ``merge(x * size) / merge(size)``:
    sizes summed, tokens averaged by size, protected tokens in front, whatever the join order."""
    from tokred.merge import alternate_matching

    g = torch.Generator().manual_seed(num_protected)
    x = torch.randn(3, 2 * 13 + num_protected, 8, generator=g)
    size = torch.randint(1, 4, (3, x.shape[1], 1), generator=g).float() if with_size else None
    merge = alternate_matching(torch.randn(x.shape, generator=g), r=7, num_protected=num_protected)
    ones = torch.ones_like(x[..., :1]) if size is None else size
    expected_size = merge(ones, mode="sum")
    expected = merge(x * ones, mode="sum") / expected_size
    with torch.no_grad():
        merged, sizes = merge.weighted_mean(x, size)
    torch.testing.assert_close(merged, expected)
    assert torch.equal(sizes, expected_size) and merged.shape == (3, x.shape[1] - 7, 8)
    trained = x.clone().requires_grad_(True)
    merged_grad, _ = merge.weighted_mean(trained, size)
    torch.testing.assert_close(merged_grad, expected)
    merged_grad.sum().backward()
    assert trained.grad is not None and torch.isfinite(trained.grad).all()


def test_weighted_mean_of_known_tokens():
    """Token 0 (size 3, value 2) merges into token 1 (size 1, value 6): (3 * 2 + 1 * 6) / 4 = 3, size 4; the others
    pass unchanged. A plain mean would give 4."""
    from tokred.merge import alternate_matching, merge_wavg

    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]]])  # token 0 is token 1's twin
    merge = alternate_matching(metric, r=1)
    x = torch.tensor([[[2.0], [6.0], [5.0], [7.0]]])
    size = torch.tensor([[[3.0], [1.0], [2.0], [1.0]]])
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            merged, sizes = merge_wavg(merge, x.clone().requires_grad_(grad), size)
        assert merged.flatten().tolist() == [5.0, 3.0, 7.0] and sizes.flatten().tolist() == [2.0, 4.0, 1.0]
