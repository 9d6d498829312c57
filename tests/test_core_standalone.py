"""The core stands alone: with the suite's dependencies blocked from import, ``import tokred``,
``tokred.list_methods()`` and apply/remove work on a timm ViT (timm is the model's own library) and on a diffusers
U-Net (with timm blocked too); the pytest plugin imports nothing heavy at pytest start; the CLI names the missing
extra."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SUITE_DEPS = ["matplotlib", "torchmetrics", "sklearn", "accelerate", "tabulate", "pytest_benchmark"]
TESTS = os.path.dirname(__file__)

# Blocking: None in sys.modules makes `import x` raise ModuleNotFoundError and importlib.util.find_spec(x) report
# the package absent, as on a machine without it (libraries probing optional packages then skip them).
PRELUDE = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
import torch
torch.set_num_threads(1)
"""


def run_blocked(blocked: list[str], body: str) -> subprocess.CompletedProcess:
    code = PRELUDE.format(blocked=blocked) + textwrap.dedent(body) + textwrap.dedent(
        f"""
        leaked = [n for n, m in sys.modules.items() if n.split(".")[0] in {blocked!r} and m is not None]
        assert not leaked, leaked
        print("OK")
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=TESTS)


def test_core_on_a_timm_vit_without_the_suite_or_diffusers():
    done = run_blocked(
        SUITE_DEPS + ["diffusers"],
        """
        import torch, tokred
        assert set(tokred.list_methods()) >= {"tome", "ca_tome", "cat_pruning"}
        import timm
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            baseline = model(x)
            for method in [m for m in tokred.list_methods() if "timm_vit" in tokred.get_method(m).options]:
                patch = tokred.apply(model, method)
                model(x)
                assert patch.token_counts()
                patch.remove()
                assert torch.equal(model(x), baseline)
        """,
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


def test_core_on_a_diffusers_unet_without_the_suite_or_timm():
    done = run_blocked(
        SUITE_DEPS + ["timm"],
        """
        import torch, tokred
        from tiny_models import tiny_sd_unet
        unet = tiny_sd_unet()
        g = torch.Generator().manual_seed(0)
        calls = [(torch.randn(2, 4, 8, 8, generator=g), torch.tensor(900 - 100 * i)) for i in range(3)]
        ctx = torch.randn(2, 7, 32, generator=g)
        with torch.no_grad():
            baseline = [unet(s, t, ctx).sample for s, t in calls]
            for method in tokred.list_methods():
                if "diffusers_unet" not in tokred.get_method(method).options:
                    continue  # the ViT-only methods and the transformer-only caches
                patch = tokred.apply(unet, method, **({"t0": 2} if method == "cat_pruning" else {}))
                [unet(s, t, ctx) for s, t in calls]
                patch.remove()
                assert all(torch.equal(unet(s, t, ctx).sample, b) for (s, t), b in zip(calls, baseline))
        """,
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


def test_pytest_plugin_imports_nothing_heavy_at_start(tmp_path):
    (tmp_path / "test_probe.py").write_text(
        "import sys\n\ndef test_probe():\n    assert 'torch' not in sys.modules, 'torch imported at pytest start'\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_probe.py")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tokred" in subprocess.run(
        [sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    ).stdout  # the plugin is loaded (its option group is there)


def test_cli_names_the_missing_bench_extra():
    done = run_blocked(
        ["tabulate"],
        """
        from tokred.bench.cli import main
        assert main(["list"]) == 2
        """,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'pip install "tokred[bench]"' in done.stderr and "tabulate" in done.stderr
