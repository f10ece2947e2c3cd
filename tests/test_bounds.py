"""Bounded work before decoding: the frame count is checked against the context, frames are resized to the
model's input as they decode (in `ask`, `caption`, `live` and the server alike), and the pixels the model
sees are the ones preprocessing the full-size frames gives."""

from __future__ import annotations

import pytest
import torch

from streamvlm.cli import main
from streamvlm.errors import FrameBudgetError, StreamVLMError
from streamvlm.live import LiveSession
from streamvlm.runtime import StreamVLM
from streamvlm.tiny.qwen import write_tiny_qwen
from streamvlm.video import files
from streamvlm.video.files import write_video
from streamvlm.video.live import FileSource
from support import indexed_frames


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return StreamVLM.from_pretrained(write_tiny_qwen(tmp_path_factory.mktemp("bounds") / "q", "qwen2_5_vl"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A 24-frame 128x160 video: larger than every test model's input."""
    return write_video(tmp_path_factory.mktemp("bounds") / "wide.mp4", indexed_frames(24, 128, 160), fps=8)


@pytest.mark.parametrize("model", ["builtin", "qwen"])
def test_frame_capacity_is_what_the_context_holds(model, request):
    vlm = request.getfixturevalue(model)
    capacity = vlm.frame_capacity()
    step = vlm.adapter.frames_per_step
    assert capacity > 0 and capacity % step == 0
    frames = torch.zeros(capacity + step, 32, 32, 3, dtype=torch.uint8)
    vlm.session().append_frames(frames[:capacity])  # fits
    with pytest.raises(StreamVLMError, match="context"):
        vlm.session().append_frames(frames)  # a frame of tokens more does not
    assert vlm.frame_capacity(reserve_tokens=500) < capacity


def test_too_many_frames_are_refused_before_anything_is_decoded(builtin, wide, monkeypatch):
    monkeypatch.setattr(files, "_decode_picks", lambda *a: pytest.fail("decoded"))
    capacity = builtin.frame_capacity(reserve_tokens=10)
    with pytest.raises(FrameBudgetError, match=f"holds at most {capacity} frames.*ask for at most {capacity}") as e:
        builtin.read_video(wide, num_frames=capacity + 1, reserve_tokens=10)
    assert (e.value.frames, e.value.limit) == (capacity + 1, capacity)
    with pytest.raises(FrameBudgetError):
        builtin.read_video(wide, fps=1000, max_frames=capacity + 1)


@pytest.mark.parametrize("model", ["builtin", "qwen"])
def test_frames_resized_while_decoding_encode_as_the_full_size_frames(model, wide, request):
    vlm = request.getfixturevalue(model)
    full = files.read_video(wide, num_frames=4)
    small = vlm.read_video(wide, num_frames=4)
    cfg = vlm.adapter.preprocess_config
    assert small.frames.shape == (4, cfg.height, cfg.width, 3)
    assert torch.equal(vlm.encode(small.frames), vlm.encode(full.frames))
    streamed = torch.stack([f.frame for f in vlm.iter_frames(wide, fps=2)])
    assert torch.equal(streamed, vlm.read_video(wide, fps=2).frames)


def test_live_buffers_frames_at_the_models_size(builtin, wide):
    shapes = []
    real = builtin.encode

    def encode(frames):
        shapes.append(tuple(frames.shape[1:]))
        return real(frames)

    builtin.encode = encode
    try:
        with LiveSession(builtin, FileSource(wide, fps=4, speed=0), memory_budget=None) as live:
            assert live.wait(timeout=60)
    finally:
        del builtin.encode
    assert live.error is None and live.ingested > 0
    assert set(shapes) == {(96, 96, 3)}  # the source sends 128x160


def test_ask_refuses_more_frames_than_the_context_holds(wide, capsys):
    assert main(["ask", str(wide), "--num-frames", "1024", "-q", "how many objects are there now?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "1024 frames" in err[-1] and "ask for at most" in err[-1]
    assert "Traceback" not in "\n".join(err)
