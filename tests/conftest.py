import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from clip_model import load_model  # noqa: E402
from demo import make_pairs  # noqa: E402

TINY_CLIP = os.path.join(ROOT, "assets", "tiny-clip.json")


@pytest.fixture
def shapes_pairs(tmp_path):
    """24 synthetic pairs whose preferred image shows the prompt, with their PNGs in tmp_path."""
    return make_pairs(str(tmp_path / "images"), 24, seed=0)


@pytest.fixture
def tiny_init(tmp_path):
    """A random-init tiny CLIP saved as an OpenAI-format state dict: the same start for every run in a test."""
    torch.manual_seed(0)
    path = str(tmp_path / "init.pth")
    torch.save(load_model(TINY_CLIP, pretrained="none")[0].state_dict(), path)
    return path
