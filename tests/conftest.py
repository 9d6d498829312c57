import os
import sys

import pytest
import torch

# Tests are CPU-only and must not depend on how many threads the machine offers.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# ... nor on the machine's load: no start-up warning of a loaded machine in the CLI's output (tested on its own)
os.environ["TOKRED_LOAD_WARNING"] = "0"
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def tiny_vit():
    """A small timm ViT with a cls token (64 patches + cls)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10).eval()
