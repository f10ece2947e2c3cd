"""iter_frames: the same frames as read_video, one at a time, with the file closed when iteration stops."""

from __future__ import annotations

import gc
import logging
import os
import weakref
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from streamvlm.errors import StreamVLMError
from streamvlm.video.files import TimedFrame, iter_frames, read_video, write_video
from support import FPS, N, encode, indexed_frames, indices, upright_picture


@pytest.fixture
def video(tmp_path):
    return write_video(tmp_path / "indexed.mp4", indexed_frames(), fps=FPS)


def assert_same(frames: list[TimedFrame], clip) -> None:
    """Bit-identical to a VideoClip: timestamps and pixels."""
    assert all(isinstance(f, TimedFrame) and isinstance(f.time, float) for f in frames)
    assert [f.time for f in frames] == clip.timestamps.tolist()
    assert torch.equal(torch.stack([f.frame for f in frames]), clip.frames)


# ---------------------------------------------------------------- same frames as read_video


@pytest.mark.parametrize("fps", [2.0, 3.0, 16.0])  # 16: above the native rate, frames repeat
def test_fps_equals_read_video(video, fps):
    assert_same(list(iter_frames(video, fps=fps)), read_video(video, fps=fps))


def test_every_frame_equals_read_video(video):
    frames = list(iter_frames(video))
    assert len(frames) == N and frames[0].frame.shape == (48, 64, 3) and frames[0].frame.dtype == torch.uint8
    assert_same(frames, read_video(video))


def test_variable_frame_rate_equals_read_video(tmp_path):
    pts_ms = [0, 100, 200, 700, 750, 1500]
    path = encode(tmp_path / "vfr.mp4", indexed_frames(len(pts_ms)), pts=pts_ms, time_base=Fraction(1, 1000))
    assert_same(list(iter_frames(path)), read_video(path))
    assert_same(list(iter_frames(path, fps=4, end=1.5)), read_video(path, fps=4, end=1.5))
    assert indices(torch.stack([f.frame for f in iter_frames(path, fps=4, end=1.5)])) == [0, 2, 2, 4, 4, 4]


@pytest.mark.parametrize(
    "kwargs",
    [dict(start=1.0, end=2.0), dict(start=1.6), dict(fps=2.0, start=0.5), dict(fps=3.0, start=0.4, end=2.2)],
)
def test_start_and_end_equal_read_video(video, kwargs):
    assert_same(list(iter_frames(video, **kwargs)), read_video(video, **kwargs))


def test_start_end_and_max_frames_pick_the_right_frames(video):
    def picked(**kwargs):
        return indices(torch.stack([f.frame for f in iter_frames(video, **kwargs)]))

    assert picked(start=1.0, end=2.0) == list(range(8, 16))
    assert picked(fps=2, start=0.5) == [4, 8, 12, 16, 20]
    # max_frames stops early (read_video would thin uniformly over the range instead)
    assert picked(max_frames=5) == [0, 1, 2, 3, 4]
    assert picked(fps=3, max_frames=4) == [0, 2, 5, 8]
    assert picked(fps=2, start=1.0, end=2.5, max_frames=2) == [8, 12]
    assert len(list(iter_frames(video, max_frames=100))) == N


# ---------------------------------------------------------------- resources


def open_files() -> set[Path]:
    fds = Path("/proc/self/fd")
    paths = set()
    for fd in fds.iterdir():
        try:
            paths.add(Path(os.readlink(fd)))
        except OSError:  # the fd listing the directory itself is gone by now
            pass
    return paths


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
def test_stopping_early_closes_the_file(video):
    target = video.resolve()
    frames = iter_frames(video, fps=4)
    assert target not in open_files()  # probed and closed again; decoding has not started
    first = next(frames)
    assert first.time == 0.0 and target in open_files()
    frames.close()
    assert target not in open_files()

    frames = iter_frames(video)
    for _ in frames:
        pass
    assert target not in open_files()  # exhausted


def live_video_frames() -> int:
    """av.VideoFrame objects alive in this process (decoded frames, whose pixels FFmpeg allocates)."""
    return sum(type(o) is av.VideoFrame for o in gc.get_objects())


def test_memory_stays_bounded(tmp_path):
    # the pixels of decoded and converted frames are allocated by FFmpeg, out of tracemalloc's sight, so
    # this counts frames instead: decoded ones inside the iterator, and yielded ones it might keep
    count = 600
    path = write_video(tmp_path / "long.mp4", np.repeat(indexed_frames(1, 96, 128), count, axis=0), fps=30)
    before = live_video_frames()
    yielded, inside = [], []
    for i, item in enumerate(iter_frames(path)):
        yielded.append(weakref.ref(item.frame))
        if i % 100 == 50:
            inside.append(live_video_frames() - before)
    del item
    assert len(yielded) == count and len(inside) == 6
    assert max(inside) <= 4, f"decoded frames alive inside the iterator: {inside}"
    assert sum(ref() is not None for ref in yielded) == 0  # the iterator kept none of the yielded frames
    kept = list(iter_frames(path, max_frames=50))
    assert live_video_frames() - before >= 50 and len(kept) == 50  # control: the count sees frames


# ---------------------------------------------------------------- rotation and bad files


@pytest.mark.parametrize("rotation", [90, 180, -90])
def test_rotated_video_comes_out_upright(tmp_path, rotation):
    upright = upright_picture()
    stored = np.ascontiguousarray(np.rot90(upright, k=-rotation // 90))
    path = encode(tmp_path / "rotated.mp4", np.stack([stored] * 4), rotation=rotation)
    frames = list(iter_frames(path, fps=16))  # above the native rate: each frame is picked twice
    assert len(frames) == 8 and frames[0].frame.shape == (48, 64, 3) and frames[0].frame.is_contiguous()
    assert (frames[0].frame.float() - torch.from_numpy(upright).float()).abs().mean() < 4
    assert_same(frames, read_video(path, fps=16))


def test_destroyed_header_raises(tmp_path, video):
    data = bytearray(video.read_bytes())
    data[:256] = np.random.default_rng(1).integers(0, 256, 256, dtype=np.uint8).tobytes()
    (tmp_path / "bad.mp4").write_bytes(bytes(data))
    with pytest.raises(StreamVLMError, match="corrupt"):
        next(iter_frames(tmp_path / "bad.mp4"))


@pytest.mark.parametrize(
    "name, content, message",
    [("nope.mp4", None, "not found"), ("empty.mp4", b"", "empty"), ("notes.mp4", b"just notes\n" * 50, "not a video")],
)
def test_bad_files_raise_before_decoding(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(StreamVLMError, match=message):
        iter_frames(path)  # from the probe, before the first next()


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(fps=0.0), "iter_frames: fps must be positive"), (dict(max_frames=0), "max_frames"),
     (dict(start=2.0, end=1.0), "must be after start"), (dict(start=5.0), "past the end")],
)
def test_bad_arguments(video, kwargs, message):
    with pytest.raises(StreamVLMError, match=message):
        iter_frames(video, **kwargs)


def test_truncated_file_warns_and_ends(tmp_path, caplog):
    good = write_video(tmp_path / "good.mkv", indexed_frames(noise=True), fps=FPS).read_bytes()
    path = tmp_path / "cut.mkv"
    path.write_bytes(good[: len(good) * 6 // 10])
    with caplog.at_level(logging.WARNING, logger="streamvlm.video.files"):
        frames = list(iter_frames(path))
    assert 5 < len(frames) < N and "truncated or corrupt" in caplog.text
    assert_same(frames, read_video(path))
