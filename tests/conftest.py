import importlib
import os
import sys

import pytest
import torch

# Tests are CPU-only and must not depend on how many threads the machine offers. One thread: the tiny models are
# overhead-bound, and a second thread beside another busy process makes them many times slower.
torch.set_num_threads(int(os.environ.get("TOKRED_TEST_THREADS", "1")))
# ... nor on the machine's load: no start-up warning of a loaded machine in the CLI's output (tested on its own)
os.environ["TOKRED_LOAD_WARNING"] = "0"
# ... and cases time in the test's own process unless a test asks for worker processes (each spawn costs seconds)
os.environ["TOKRED_PROCESSES"] = "1"
sys.path.insert(0, os.path.dirname(__file__))
# Import the core's modules now: pytester's in-process runs (tests/test_pytest_plugin.py) restore sys.modules
# afterwards, which drops modules first imported inside them, and a later re-import would make a second Patch
# class that isinstance checks on earlier patches do not recognise.
import tokred.api  # noqa: E402,F401
import tokred.patch  # noqa: E402,F401

# The parity references (tomesd, ca-tome) are test-only dependencies; their metadata pins old torch/numpy, so
# they are installed without dependencies (tox -e test and CI do this). Missing references fail the parity tests
# unless this variable is set to 1, so that a plain `pytest` never skips them silently.
SKIP_PARITY_VAR = "TOKRED_SKIP_PARITY"
REFERENCES_HINT = "python -m pip install --no-deps tomesd==0.1.3 ca-tome==0.1.3 DeepCache==0.1.1"


def require_reference(module: str):
    """Import a parity reference, or fail with the install hint (skip only when TOKRED_SKIP_PARITY=1)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        message = (
            f"parity reference {module.split('.')[0]!r} is not installed ({err}); install it with `{REFERENCES_HINT}` "
            f"(tox -e test does), or set {SKIP_PARITY_VAR}=1 to skip the parity tests"
        )
        if os.environ.get(SKIP_PARITY_VAR) == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)


@pytest.fixture
def tiny_vit():
    """A small timm ViT with a cls token (64 patches + cls)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10).eval()


# --- the out-of-tree fixture plugin (fixtures/fake_plugin: the fake_vit task and the fake_merge method) -----------
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
BENCH_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "test_methods.py")


@pytest.fixture
def fake_plugin(monkeypatch):
    """Install the fixture plugin (sys.path + dist-info entry points) for this test only."""
    from tokred.bench.task import tasks as task_registry
    from tokred.registry import methods as method_registry

    monkeypatch.syspath_prepend(os.path.join(FIXTURES, "fake_plugin"))
    for registry in (method_registry, task_registry):
        registry.names()  # built-ins registered before the snapshot
        monkeypatch.setattr(registry, "_loaded", False)
        monkeypatch.setattr(registry, "_items", dict(registry._items))
    # pytester removes the modules an in-process run imported; torch's and timm's must stay (they cannot be
    # imported twice in one process), so they are imported here, before pytester's snapshot
    for module in ("timm.models.vision_transformer", "tokred_fake_plugin", "tokred.bench.harness", "tokred.flops",
                   "torch.profiler", "pytest_benchmark.stats"):
        importlib.import_module(module)


@pytest.fixture
def bench_dir(fake_plugin, pytester):
    """A pytester folder holding the project's own benchmark file. ``fake_plugin`` comes first: the built-in
    methods and tasks are imported before pytester snapshots ``sys.modules`` (and restores it afterwards)."""
    with open(BENCH_FILE, encoding="utf-8") as fh:
        pytester.makepyfile(test_methods=fh.read())
    return pytester


@pytest.fixture
def setup_calls(fake_plugin, monkeypatch):
    """Counts the fake task's (slow, in real tasks) setups: a refused run must not reach one."""
    import tokred_fake_plugin

    calls = []
    setup = tokred_fake_plugin.FakeVitTask.setup

    def counted(self):
        calls.append(1)
        setup(self)

    monkeypatch.setattr(tokred_fake_plugin.FakeVitTask, "setup", counted)
    return calls
