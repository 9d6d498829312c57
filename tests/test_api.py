"""The public interface: registry, apply/remove, scoping, replacement, errors at apply time, plugins."""

import textwrap

import pytest
import torch

import tokred
from tokred.errors import InvalidOptionError, UnknownMethodError, UnsupportedModelError


def test_list_and_get_methods():
    names = tokred.list_methods()
    assert "tome" in names
    assert tokred.list_methods("to*") == ["todo", "tofu", "tome"]
    assert tokred.get_method("tome").name == "tome"


def test_unknown_method_lists_valid_names(tiny_vit):
    with pytest.raises(UnknownMethodError) as err:
        tokred.apply(tiny_vit, "tomee")
    assert "tomee" in str(err.value) and "tome" in str(err.value).split("valid")[1]


def test_unknown_option_names_it_and_the_valid_ones(tiny_vit):
    with pytest.raises(InvalidOptionError, match=r"unknown option 'ratio'.*Valid options: r \("):
        tokred.apply(tiny_vit, "tome", ratio=0.5)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", [1, -2], (4, 2.0), (4,)])
def test_invalid_r_names_option_and_range(tiny_vit, bad):
    with pytest.raises(InvalidOptionError, match=r"option 'r'=.*valid: int >= 0"):
        tokred.apply(tiny_vit, "tome", r=bad)


def test_r_list_longer_than_depth_is_rejected(tiny_vit):
    with pytest.raises(InvalidOptionError, match="4 blocks"):
        tokred.apply(tiny_vit, "tome", r=[1] * 5)


def test_unsupported_model_names_supported_families():
    with pytest.raises(UnsupportedModelError) as err:
        tokred.apply(torch.nn.Linear(2, 2), "tome")
    assert "timm_vit" in str(err.value) and "diffusers_unet" in str(err.value)


def test_unsupported_vit_block_is_rejected_at_apply():
    import timm

    model = timm.create_model("vit_small_patch16_rope_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    with pytest.raises(UnsupportedModelError, match="tokred supports"):
        tokred.apply(model, "tome", r=2)


def test_failed_apply_leaves_previous_patch_in_place(tiny_vit):
    patch = tokred.apply(tiny_vit, "tome", r=2)
    with pytest.raises(InvalidOptionError):
        tokred.apply(tiny_vit, "tome", r=-1)
    assert tokred.get_patch(tiny_vit) is patch and patch.active
    patch.remove()


def test_context_manager_and_remove_are_exact(tiny_vit):
    x = torch.randn(2, 1 * 3, 32, 32)
    with torch.no_grad():
        before = tiny_vit(x)
        state = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
        with tokred.apply(tiny_vit, "tome", r=8):
            reduced = tiny_vit(x)
        after = tiny_vit(x)
    assert not torch.equal(before, reduced)
    assert torch.equal(before, after)
    assert all(torch.equal(state[k], v) for k, v in tiny_vit.state_dict().items())
    assert "forward" not in vars(tiny_vit.blocks[0]) and tokred.get_patch(tiny_vit) is None
    assert not tokred.remove(tiny_vit)


def test_second_apply_replaces_first(tiny_vit):
    x = torch.randn(1, 3, 32, 32)
    first = tokred.apply(tiny_vit, "tome", r=8)
    second = tokred.apply(tiny_vit, "tome", r=2)
    assert not first.active and second.active
    with torch.no_grad():
        y = tiny_vit(x)
        tokens = second.adapter.merged_tokens.size.shape[1]
    assert tokens == 65 - 4 * 2  # r=2 in each of 4 blocks, not stacked with r=8
    assert tokred.remove(tiny_vit)
    with torch.no_grad():
        assert not torch.equal(y, tiny_vit(x))


def test_out_of_tree_method_found_through_entry_point(tmp_path, monkeypatch, tiny_vit):
    """A third-party package declares an entry point in group tokred.methods and is applied by name."""
    pkg = tmp_path / "tokred_dropper"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            from tokred import Method
            from tokred.merge import alternate_matching
            from tokred.options import option, int_at_least

            @dataclass
            class Options:
                k: int = option(1, valid="int >= 1", check=int_at_least(1))

            class MergeFirstBlock(Method):
                '''Merges k tokens in the first block only.'''
                options = {"timm_vit": Options}

                def install(self, patch):
                    k = self.options.k
                    p = patch.adapter.num_protected
                    choose = lambda call, metric: alternate_matching(metric, k, p) if call.index == 0 else None
                    patch.adapter.install_merging(patch, choose)
            """
        )
    )
    dist = tmp_path / "tokred_dropper-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tokred-dropper\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[tokred.methods]\nmerge_first = tokred_dropper:MergeFirstBlock\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = tokred.registry.methods
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_items", dict(registry._items))

    assert "merge_first" in tokred.list_methods()
    with pytest.raises(InvalidOptionError, match="option 'k'=0"):
        tokred.apply(tiny_vit, "merge_first", k=0)
    with tokred.apply(tiny_vit, "merge_first", k=3) as patch, torch.no_grad():
        tiny_vit(torch.randn(1, 3, 32, 32))
        assert patch.adapter.merged_tokens.size.shape[1] == 65 - 3
