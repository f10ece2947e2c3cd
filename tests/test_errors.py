"""Mistakes a user can make give StreamVLMError with a message that says what to do."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streamvlm import StreamVLM, StreamVLMError
from streamvlm.tiny import TinySpec, write_tiny_checkpoint
from support import random_frames


@pytest.fixture(scope="module")
def vlm(tiny_dir):
    return StreamVLM.from_pretrained(tiny_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(StreamVLMError, match="does not exist.*init-tiny"):
        StreamVLM.from_pretrained(tmp_path / "nope")


def test_file_instead_of_directory(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(StreamVLMError, match="is a file"):
        StreamVLM.from_pretrained(path)


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(StreamVLMError, match="no config.json"):
        StreamVLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    with pytest.raises(StreamVLMError, match="no weights"):
        StreamVLM.from_pretrained(tmp_path)


def test_unsupported_family_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(StreamVLMError, match="'bert'.*supported families are: llava_onevision"):
        StreamVLM.from_pretrained(tmp_path)


def test_unknown_routing(tiny_dir):
    with pytest.raises(StreamVLMError, match="unknown routing"):
        StreamVLM.from_pretrained(tiny_dir, routing="magic:0.3")


@pytest.mark.parametrize("frames, message", [
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), r"shape \(T, H, W, 3\).*permute"),
    (torch.zeros(2, 32, 32, 3), "must be uint8"),
    (np.zeros((2, 32, 32, 3), dtype=np.float32), "must be uint8"),
    (torch.zeros(0, 32, 32, 3, dtype=torch.uint8), "no frames"),
    ([], "no frames"),
    ([np.zeros((32, 32, 3), np.uint8), np.zeros((16, 32, 3), np.uint8)], "share a shape"),
    ("video.mp4", "must be a uint8 tensor or array"),
    (torch.zeros(2, 32, 32, 4, dtype=torch.uint8), r"\(T, H, W, 3\)"),
])
def test_bad_frames(vlm, frames, message):
    with pytest.raises(StreamVLMError, match=message):
        vlm.generate(frames, "What?")
    with pytest.raises(StreamVLMError, match=message):
        vlm.session().append_frames(frames)


def test_frames_as_numpy_and_lists_are_accepted(vlm):
    frames = random_frames(2, seed=1)
    expected = vlm.generate(frames, "What?", max_new_tokens=4, ignore_stop=True)
    assert vlm.generate(frames.numpy(), "What?", max_new_tokens=4, ignore_stop=True) == expected
    assert vlm.generate(list(frames.numpy()), "What?", max_new_tokens=4, ignore_stop=True) == expected


def test_empty_question_and_bad_sampling(vlm):
    session = vlm.session()
    with pytest.raises(StreamVLMError, match="question is empty"):
        session.ask("   ")
    with pytest.raises(ValueError, match="top_p"):
        session.ask("What?", top_p=0.0)
    with pytest.raises(StreamVLMError, match="timestamps"):
        session.append_frames(random_frames(2), timestamps=[0.0])


def test_prompt_longer_than_the_context(tmp_path):
    model_dir = write_tiny_checkpoint(tmp_path / "short", TinySpec(max_position_embeddings=48))
    vlm = StreamVLM.from_pretrained(model_dir)  # 4 tokens per frame, 48 positions
    with pytest.raises(StreamVLMError, match="context.*fewer frames"):
        vlm.generate(random_frames(12), "What?")
    session = vlm.session()
    session.append_frames(random_frames(4))
    before = session.stats()["tokens"]
    with pytest.raises(StreamVLMError, match="the question .* context"):
        session.ask("What? " * 40)
    assert session.stats()["tokens"] == before  # nothing was fed
    # A question that fits is answered until the context is full, then stops cleanly.
    session.ask("What?", max_new_tokens=100, ignore_stop=True)
    assert session.turns[-1].stop_reason == "context_full"
    assert session.stats()["tokens"] == 48
