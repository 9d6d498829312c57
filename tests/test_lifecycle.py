"""The patch lifecycle and the errors that must come at apply: each test here failed before its fix.

Semantics (tokred/patch.py): remove() restores only what the patch changed and leaves later user changes alone;
patched forwards and hooks act only on their own module while the patch is active; a deep copy of a patched model
carries an independent patch; a patch in a with block cannot be entered again, a removed one not at all; the
generation reset follows the pipeline's current scheduler, and nothing on the scheduler is patched.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REFERENCES_HINT, SKIP_PARITY_VAR, require_reference
from tiny_models import tiny_sd_pipeline, tiny_sd_unet

import tokred
from tokred.errors import InvalidOptionError, TokredError, UnsupportedModelError

HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def snapshot(obj):
    """Every module's (or object's) own attributes by identity, and its hook keys."""
    modules = dict(obj.named_modules()) if isinstance(obj, torch.nn.Module) else {"": obj}
    out = {}
    for name, m in modules.items():
        attrs = {k: id(v) for k, v in vars(m).items() if k not in HOOK_DICTS}
        hooks = {k: tuple(getattr(m, k, {}).keys()) for k in HOOK_DICTS}
        out[name] = (attrs, hooks)
    return out


def unet_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.tensor(500), torch.randn(batch, 7, 32, generator=g)


def call(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


@pytest.fixture
def unet():
    return tiny_sd_unet()


# --- remove() restores exactly what it changed ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["tome", "ca_tome", "cat_pruning"])
def test_remove_restores_every_attribute_and_hook_of_the_pipeline(method):
    pipe = tiny_sd_pipeline()
    before_unet, before_sched = snapshot(pipe.unet), snapshot(pipe.scheduler)
    patch = tokred.apply(pipe, method, **({"t0": 2} if method == "cat_pruning" else {}))
    assert "set_timesteps" not in vars(pipe.scheduler)  # the scheduler is read, never patched
    pipe("a cube", num_inference_steps=3, height=32, width=32, output_type="pt")
    patch.remove()
    assert snapshot(pipe.unet) == before_unet
    after_sched = snapshot(pipe.scheduler)
    assert after_sched[""][0].keys() == before_sched[""][0].keys()  # a generation replaced timesteps, nothing else
    assert all(not callable(v) for k, v in vars(pipe.scheduler).items() if k not in ("config",))


def test_remove_leaves_a_user_wrapper_added_after_apply(unet):
    inputs = unet_inputs()
    baseline = call(unet, inputs)
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    patch = tokred.apply(unet, "tome", ratio=0.5)
    seen = []
    inner = block.forward

    def wrapper(*args, **kwargs):
        seen.append(1)
        return inner(*args, **kwargs)

    block.forward = wrapper
    assert not torch.equal(call(unet, inputs), baseline)
    patch.remove()
    assert block.forward is wrapper  # the user's change stays
    seen.clear()
    assert torch.equal(call(unet, inputs), baseline)  # and it now reaches the original forward
    assert seen


def test_block_copied_in_while_patched_is_not_patched_after_remove(unet):
    inputs = unet_inputs()
    baseline = call(unet, inputs)
    patch = tokred.apply(unet, "tome", ratio=0.5)
    holder = unet.down_blocks[0].attentions[0].transformer_blocks
    holder[0] = copy.deepcopy(holder[0])  # a patched block's copy swapped in
    patch.remove()
    assert "forward" not in vars(holder[0])
    assert all("forward" not in vars(m) for m in unet.modules())
    assert torch.equal(call(unet, inputs), baseline)


def test_deepcopy_of_a_patched_model_carries_an_independent_patch(unet):
    inputs = unet_inputs()

    def fresh(model):  # one call as the first of a generation (the seeded stream restarts)
        patch = tokred.get_patch(model)
        if patch is not None:
            patch.reset()
        return call(model, inputs)

    baseline = fresh(unet)
    patch = tokred.apply(unet, "tome", ratio=0.5, seed=3)
    patched = fresh(unet)
    clone = copy.deepcopy(unet)
    clone_patch = tokred.get_patch(clone)
    assert clone_patch is not None and clone_patch is not patch and clone_patch.option_values()["ratio"] == 0.5
    assert torch.equal(fresh(clone), patched)
    assert tokred.remove(clone)
    assert torch.equal(fresh(clone), baseline)
    assert patch.active and torch.equal(fresh(unet), patched)  # the original is still patched
    patch.remove()
    assert torch.equal(fresh(unet), baseline)
    # a copy of the unpatched model is just a copy
    assert tokred.get_patch(copy.deepcopy(unet)) is None


def test_with_blocks_cannot_reenter_or_use_a_removed_patch(tiny_vit):
    patch = tokred.apply(tiny_vit, "tome", r=2)
    with patch:
        with pytest.raises(TokredError, match="already in a with block"), patch:
            pass
        assert patch.active  # the failed inner entry did not end the outer scope
    assert not patch.active
    with pytest.raises(TokredError, match="was removed"), patch:
        pass


def test_scheduler_swap_after_apply_still_resets_each_generation():
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_sd_pipeline()

    def generate():
        return pipe(
            "a cube", num_inference_steps=3, height=32, width=32, output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip

    patch = tokred.apply(pipe, "ca_tome", threshold=0.5)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    first, second = generate(), generate()
    assert patch.state.generation == 2 and patch.state.step == 3
    assert torch.equal(first, second)
    patch.remove()


# --- errors at apply -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["abc", 2**80, -1, 1.5, True])
def test_bad_seed_raises_at_apply(tiny_vit, seed):
    with pytest.raises(InvalidOptionError, match=r"seed=.* is invalid; valid: None or an int in \[0, 2\*\*64\)"):
        tokred.apply(tiny_vit, "tome", seed=seed)
    assert tokred.get_patch(tiny_vit) is None


@pytest.mark.parametrize("method", ["ca_tome", "cat_pruning"])
def test_value_dependent_methods_refuse_meta_models_at_apply(method):
    with torch.device("meta"):
        unet = tiny_sd_unet()
    with pytest.raises(UnsupportedModelError, match="meta device"):
        tokred.apply(unet, method)


def test_huge_compute_on_range_is_checked_without_enumerating(unet):
    start = time.perf_counter()
    patch = tokred.apply(unet, "ca_tome", compute_on=range(10**12))
    assert time.perf_counter() - start < 1.0
    patch.remove()
    with pytest.raises(InvalidOptionError, match="option 'compute_on'"):
        tokred.apply(unet, "ca_tome", compute_on=range(5, 0, -1))
    with pytest.raises(InvalidOptionError, match="at most 100000 step"):
        tokred.apply(unet, "ca_tome", compute_on=list(range(100_001)))


def test_list_methods_patterns():
    assert tokred.list_methods(None) == tokred.list_methods()
    assert tokred.list_methods("tom*") == ["tome"]
    with pytest.raises(TypeError, match="pattern must be a glob string"):
        tokred.list_methods(5)
    with pytest.raises(tokred.UnknownMethodError, match="names are strings"):
        tokred.get_method(5)
    assert tokred.get_method(["tome"]) is tokred.get_method("tome")  # a list names a composition (of one here)


def test_registry_loads_once_for_concurrent_first_use():
    """Four threads applying a method as the process's first use of the registry all find it."""
    code = textwrap.dedent(
        """
        import threading, tokred
        errors, barrier = [], threading.Barrier(4)
        def worker():
            barrier.wait()
            try:
                tokred.get_method("tome")
                tokred.list_methods()
            except Exception as err:
                errors.append(repr(err))
        threads = [threading.Thread(target=worker) for _ in range(4)]
        [t.start() for t in threads]; [t.join() for t in threads]
        print(errors)
        assert not errors, errors
        """
    )
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_missing_parity_reference_fails_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tomesd", None)
    monkeypatch.delenv(SKIP_PARITY_VAR, raising=False)
    with pytest.raises(pytest.fail.Exception, match="pip install --no-deps tomesd"):
        require_reference("tomesd")
    monkeypatch.setenv(SKIP_PARITY_VAR, "1")
    with pytest.raises(pytest.skip.Exception):
        require_reference("tomesd")
    assert "tomesd==0.1.3" in REFERENCES_HINT
