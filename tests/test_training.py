"""Training and model features with token reduction: gradient checkpointing, forward_intermediates, diffusers'
feed-forward chunking, and CAT's warning for schedules too short to prune."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from tiny_models import tiny_sd_pipeline, tiny_sd_unet

import tokred
from tokred.errors import UnsupportedModelError
from tokred.methods.cat_pruning import CatNoPruningWarning


def small_vit(**kwargs):
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 48, "num_heads": 3, "num_classes": 5} | kwargs
    return timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs)


def grads(model, x, target):
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method, options", [("tome", {"r": 6}), ("tome", {"r": (8, -1), "trace_source": True}),
                                             ("ca_tome", {"threshold": 0.2})])
def test_backward_with_gradient_checkpointing_equals_without(method, options):
    model = small_vit().train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 3])
    with tokred.apply(model, method, **options) as patch:
        loss, plain = grads(model, x, target)
        assert patch.adapter.merged_tokens.size.shape[1] < 65  # tokens were merged
        model.set_grad_checkpointing(True)
        loss_ckpt, ckpt = grads(model, x, target)
        model.set_grad_checkpointing(False)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-5, msg=name)


def test_forward_intermediates_token_features_or_a_clear_error():
    model = small_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), tokred.apply(model, "tome", r=4) as patch:
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        assert [t.shape[1] for t in inter] == [60, 56, 52, 48]  # 64 patch tokens, 4 merged per block
        assert torch.equal(model.forward_head(final), model(x))
        with pytest.raises(UnsupportedModelError, match="output_fmt='NLC'"):
            model.forward_intermediates(x)
        assert patch.active
    with torch.no_grad(), tokred.apply(model, "tome", r=0):  # nothing merges: the grid format stays available
        assert model.forward_intermediates(x)[1][0].shape == (2, 48, 8, 8)


def test_cat_pruning_with_feed_forward_chunking_on_tokens():
    unet = tiny_sd_unet()
    for name, block in unet.named_modules():  # the top level's 64 tokens in chunks of 2; the 19 pruned ones cannot
        if type(block).__name__ == "BasicTransformerBlock" and name.startswith(("down_blocks.0.", "up_blocks.3.")):
            block.set_chunk_feed_forward(2, dim=1)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 7, 32, generator=g)
    calls = [(torch.randn(2, 4, 8, 8, generator=g), torch.tensor(900 - 100 * i)) for i in range(4)]
    with torch.no_grad(), tokred.apply(unet, "cat_pruning", t0=2, alpha=0.3) as patch:
        outs = [unet(s, t, ctx).sample for s, t in calls]
        counts = patch.token_counts()
    assert all(torch.isfinite(o).all() for o in outs)
    top = counts["down_blocks.0.attentions.0.transformer_blocks.0"]
    assert top.mlp < top.tokens  # pruned calls ran the (unchunked) feed-forward on 19 of 64 tokens


def test_cat_warns_when_the_schedule_is_too_short_to_prune():
    pipe = tiny_sd_pipeline()
    with tokred.apply(pipe, "cat_pruning", t0=4):
        with pytest.warns(CatNoPruningWarning, match="makes 4 denoiser calls, at most t0=4"):
            pipe("a cube", num_inference_steps=4, height=32, width=32, output_type="pt")
        with warnings.catch_warnings():
            warnings.simplefilter("error", CatNoPruningWarning)
            pipe("a cube", num_inference_steps=6, height=32, width=32, output_type="pt")  # 6 > t0: no warning
