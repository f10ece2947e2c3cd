"""Fixtures: tiny random checkpoints saved by transformers, loaded once per test run."""

from __future__ import annotations

import pytest
import torch

from streamvlm.tiny import write_tiny_checkpoint
from support import SPECS


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict:
    """name -> path of a checkpoint written by `write_tiny_checkpoint` (transformers' save_pretrained)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {name: write_tiny_checkpoint(root / name, spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="session")
def tiny_dir(checkpoints):
    return checkpoints["gqa"]


@pytest.fixture(scope="session")
def hf_model():
    """Load transformers' own model for a checkpoint directory (cached per path)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    cache = {}

    def load(model_dir):
        if model_dir not in cache:
            cache[model_dir] = LlavaOnevisionForConditionalGeneration.from_pretrained(
                model_dir, dtype=torch.float32).eval()
        return cache[model_dir]

    return load
