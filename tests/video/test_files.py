"""Video file decoding, sampling, rotation, bad files and the sample video. Videos are made with PyAV."""

from __future__ import annotations

import logging
from fractions import Fraction
from functools import partial

import av
import numpy as np
import pytest
import torch

from streamvlm import world
from streamvlm.errors import StreamVLMError
from streamvlm.video import files
from streamvlm.world import sample
from streamvlm.video.files import probe_video, read_video, write_video
from streamvlm.video.preprocess import PreprocessConfig, preprocess, resize_frame
from support import FPS, N, encode, indexed_frames, indices, upright_picture


@pytest.fixture
def video(tmp_path):
    return write_video(tmp_path / "indexed.mp4", indexed_frames(), fps=FPS)


# ---------------------------------------------------------------- decoding and sampling


def test_every_frame_with_content_and_timestamps(video):
    clip = read_video(video)
    assert clip.frames.shape == (N, 48, 64, 3) and clip.frames.dtype == torch.uint8
    assert clip.timestamps.dtype == torch.float64
    assert clip.timestamps.tolist() == pytest.approx([i / FPS for i in range(N)])
    assert indices(clip) == list(range(N))
    expected = torch.from_numpy(indexed_frames()).float()
    assert (clip.frames.float() - expected).abs().mean() < 3  # codec tolerance
    assert clip.duration == pytest.approx(N / FPS) and clip.fps == pytest.approx(FPS)
    assert clip.path == str(video)


def test_frames_are_the_same_pixels_as_pyavs_conversion_at_a_named_size(video):
    # read_video converts a frame of the stream's own size without naming the size (much faster in PyAV);
    # the pixels must be those of the named-size conversion it used before (that path scales a resolution
    # change back).
    with av.open(str(video)) as container:
        named = [f.to_ndarray(format="rgb24", width=64, height=48) for f in container.decode(video=0)]
    clip = read_video(video)
    assert len(named) == N and torch.equal(clip.frames, torch.from_numpy(np.stack(named)))


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_write_video_codecs_round_trip(tmp_path, codec):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this PyAV build")
    path = write_video(tmp_path / "v.mkv", torch.from_numpy(indexed_frames()), fps=FPS, codec=codec)
    clip = read_video(path)
    assert indices(clip) == list(range(N))  # libx264 reorders frames (B-frames): order must come back right
    assert probe_video(path)["codec"] == {"mpeg4": "mpeg4", "libx264": "h264"}[codec]


@pytest.mark.parametrize(
    "num_frames, expected",
    [
        (6, [0, 4, 8, 12, 16, 20]),  # targets 0, .5, 1, ... land on frames
        (5, [0, 5, 10, 14, 19]),  # targets 0, .6, 1.2, 1.8, 2.4: nearest are .625, 1.25, 1.75, 2.375
        (1, [0]),
    ],
)
def test_num_frames_picks_nearest(video, num_frames, expected):
    clip = read_video(video, num_frames=num_frames)
    assert indices(clip) == expected
    assert clip.timestamps.tolist() == pytest.approx([i / FPS for i in expected])
    assert clip.fps == pytest.approx(num_frames / (N / FPS))


def test_num_frames_more_than_the_video_gives_each_frame_once(video, tmp_path):
    clip = read_video(video, num_frames=2 * N)
    assert indices(clip) == list(range(N))  # no frame twice: a short video does not fill the count with copies
    assert clip.timestamps.tolist() == pytest.approx([i / FPS for i in range(N)])
    assert clip.fps == pytest.approx(FPS)
    one = write_video(tmp_path / "one.mp4", indexed_frames(1), fps=FPS)
    assert len(read_video(one, num_frames=1024)) == 1


# ---------------------------------------------------------------- bounded work


def _model_resize(height=20, width=30, resample=3):
    cfg = PreprocessConfig.from_dict({"size": {"height": height, "width": width}, "resample": resample})
    return cfg, partial(resize_frame, cfg=cfg)


@pytest.mark.parametrize("resample", [3, 2, 0])
@pytest.mark.parametrize("kwargs", [{}, {"num_frames": 5}, {"fps": 3}, {"num_frames": 40}])
def test_resizing_while_decoding_gives_the_pixels_preprocessing_makes(video, resample, kwargs):
    cfg, resize = _model_resize(resample=resample)
    full = read_video(video, **kwargs)
    small = read_video(video, resize=resize, **kwargs)
    assert small.frames.shape == (len(full), 20, 30, 3) and small.frames.dtype == torch.uint8
    assert torch.equal(small.timestamps, full.timestamps)
    assert torch.equal(preprocess(small.frames, cfg), preprocess(full.frames, cfg))


def test_resizing_a_rotated_video_resizes_the_upright_frame(tmp_path):
    stored = np.ascontiguousarray(np.rot90(upright_picture(), k=-1))
    path = encode(tmp_path / "rotated.mp4", np.stack([stored] * 4), rotation=90)
    cfg, resize = _model_resize(height=12, width=16)
    full, small = read_video(path), read_video(path, resize=resize)
    assert torch.equal(preprocess(small.frames, cfg), preprocess(full.frames, cfg))
    streamed = [f.frame for f in files.iter_frames(path, resize=resize)]
    assert torch.equal(torch.stack(streamed), small.frames)


def test_the_full_size_frames_are_not_held_together(video, monkeypatch):
    # every frame is finished (resized) before the next one is decoded
    held, finished = [], []
    real = files._decode_picks

    def decode(*args):
        for t, array in real(*args):
            held.append(len(finished))
            yield t, array

    monkeypatch.setattr(files, "_decode_picks", decode)
    cfg, resize = _model_resize()
    read_video(video, resize=lambda f: finished.append(1) or resize(f), fps=4)
    assert held == list(range(len(held))) and len(finished) == len(held)  # the k-th decode sees k finished


@pytest.mark.parametrize("kwargs, count", [({"num_frames": 7}, 7), ({"num_frames": 7, "max_frames": 3}, 3),
                                           ({"fps": 2}, 6), ({"fps": 4, "max_frames": 5}, 5), ({}, N),
                                           ({"num_frames": 100}, 100)])
def test_admit_hears_the_count_before_anything_is_decoded(video, monkeypatch, kwargs, count):
    heard = []

    def refuse(n):
        heard.append(n)
        raise StreamVLMError("too many")

    monkeypatch.setattr(files, "_decode_picks", lambda *a: pytest.fail("decoded before admit"))
    monkeypatch.setattr(files, "_read_nearest_decord", lambda *a: pytest.fail("decoded before admit"))
    with pytest.raises(StreamVLMError, match="too many"):
        read_video(video, admit=refuse, **kwargs)
    assert heard == [count]


def test_admitted_reads_return_at_most_the_admitted_count(video):
    for kwargs in ({"num_frames": 7}, {"fps": 2}, {"fps": 4, "max_frames": 5}, {}):
        heard = []
        clip = read_video(video, admit=heard.append, **kwargs)
        assert len(clip) <= heard[0]


def test_frames_over_the_pixel_bound_are_refused_from_the_header(video, monkeypatch):
    monkeypatch.setattr(files, "MAX_PIXELS", 48 * 64 - 1)
    monkeypatch.setattr(files, "_frames", lambda *a: pytest.fail("decoded a frame"))
    for read in (read_video, probe_video, files.iter_frames):  # read_video: decord is not asked either
        with pytest.raises(StreamVLMError, match=r"64x48 frames .* at most 0 MP a frame. Scale it down"):
            read(video)
    monkeypatch.undo()
    monkeypatch.setattr(files, "MAX_PIXELS", 48 * 64)
    assert len(read_video(video, num_frames=2)) == 2  # at the bound: read


def test_fps_takes_latest_frame_at_or_before_each_tick(video):
    clip = read_video(video, fps=3)
    # ticks k/3 s; latest frames at or before: 0, .25, .625, 1, 1.25, 1.625, 2, 2.25, 2.625
    assert indices(clip) == [0, 2, 5, 8, 10, 13, 16, 18, 21]
    assert clip.fps == 3
    assert len(read_video(video, fps=16)) == 48  # one frame per tick, repeated above the native rate


def test_start_and_end(video):
    clip = read_video(video, start=1.0, end=2.0)
    assert indices(clip) == list(range(8, 16))
    assert clip.timestamps.tolist() == pytest.approx([i / FPS for i in range(8, 16)])
    assert indices(read_video(video, num_frames=4, start=1.0, end=2.0)) == [8, 10, 12, 14]
    assert indices(read_video(video, fps=2, start=0.5)) == [4, 8, 12, 16, 20]


def test_start_seeks_past_a_keyframe(tmp_path):
    # keyframes every 12 frames (mpeg4's default gop): start=1.6 seeks to frame 12 and drops it
    path = write_video(tmp_path / "v.mp4", indexed_frames(), fps=FPS)
    clip = read_video(path, start=1.6)
    assert indices(clip) == list(range(13, N))
    assert clip.timestamps[0].item() == pytest.approx(13 / FPS)


def test_max_frames_thins_uniformly(video):
    assert indices(read_video(video, max_frames=6)) == [0, 4, 8, 12, 16, 20]
    assert indices(read_video(video, fps=8, max_frames=4)) == [0, 6, 12, 18]
    assert indices(read_video(video, num_frames=10, max_frames=3)) == [0, 8, 16]
    assert len(read_video(video, max_frames=100)) == N


def test_variable_frame_rate_keeps_real_timestamps(tmp_path):
    pts_ms = [0, 100, 200, 700, 750, 1500]
    path = encode(tmp_path / "vfr.mp4", indexed_frames(len(pts_ms)), pts=pts_ms, time_base=Fraction(1, 1000))
    clip = read_video(path)
    assert clip.timestamps.tolist() == pytest.approx([t / 1000 for t in pts_ms])
    assert indices(clip) == list(range(len(pts_ms)))
    # ticks 0, .25, .5, .75, 1, 1.25: latest frames at or before are at 0, .2, .2, .75, .75, .75
    assert indices(read_video(path, fps=4, end=1.5)) == [0, 2, 2, 4, 4, 4]
    # targets 0, .5, 1: nearest are 0, .7 (vs .2), .75
    assert indices(read_video(path, num_frames=3, end=1.5)) == [0, 3, 4]


def test_stream_start_offset_is_removed(tmp_path):
    # first frame at pts 8 (1 s): timestamps still count from the stream start
    path = encode(tmp_path / "offset.mkv", indexed_frames(8), pts=[8 + i for i in range(8)])
    clip = read_video(path)
    assert clip.timestamps.tolist() == pytest.approx([i / FPS for i in range(8)])
    assert indices(clip) == list(range(8))


@pytest.mark.skipif(files._decord is None, reason="decord not installed")
@pytest.mark.parametrize("name", ["v.mp4", "v.mkv"])
@pytest.mark.parametrize("num_frames", [5, 7, 16, 48])
@pytest.mark.parametrize("resized", [False, True])
def test_decord_and_pyav_agree(tmp_path, monkeypatch, name, num_frames, resized):
    resize = _model_resize()[1] if resized else None
    monkeypatch.setattr(files, "_DECORD_SPACING", 0)  # decord even where it saves no decoding
    path = encode(tmp_path / name, indexed_frames(noise=True), pts=[i + (3 if i > 9 else 0) for i in range(N)])
    calls = []
    real = files._read_nearest_decord
    monkeypatch.setattr(files, "_read_nearest_decord", lambda *a: calls.append(1) or real(*a))
    fast = read_video(path, num_frames=num_frames, start=0.2, resize=resize)
    assert calls and real(files._probe(path), np.array([0.0]), 0.0, 10.0, files._finisher(0, None)) is not None
    # (decord really ran)
    monkeypatch.setattr(files, "_decord", None)
    slow = read_video(path, num_frames=num_frames, start=0.2, resize=resize)
    assert torch.equal(fast.timestamps, slow.timestamps)
    assert torch.equal(fast.frames, slow.frames)


# ---------------------------------------------------------------- rotation


@pytest.mark.parametrize("rotation", [90, 180, -90])
def test_rotated_video_comes_out_upright(tmp_path, rotation):
    upright = upright_picture()
    # stored turned clockwise by `rotation`; the display matrix says turn it back counter-clockwise
    stored = np.ascontiguousarray(np.rot90(upright, k=-rotation // 90))
    path = encode(tmp_path / "rotated.mp4", np.stack([stored] * 4), rotation=rotation)

    info = probe_video(path)
    assert info["rotation"] % 360 == rotation % 360
    assert (info["width"], info["height"]) == (64, 48)
    clip = read_video(path)
    assert clip.frames.shape == (4, 48, 64, 3)
    assert (clip.frames[0].float() - torch.from_numpy(upright).float()).abs().mean() < 4
    if files._decord is not None:  # an independent reader that applies the rotation itself
        import decord

        by_decord = decord.VideoReader(str(path))[0].asnumpy()
        assert np.abs(by_decord.astype(float) - upright).mean() < 4


def test_rotation_helper_on_a_synthetic_frame():
    frame = torch.arange(6, dtype=torch.uint8).reshape(1, 2, 3, 1).expand(1, 2, 3, 3)
    # [[0 1 2], [3 4 5]] turned counter-clockwise: the right column becomes the top row
    assert files._upright(frame, 90)[0, :, :, 0].tolist() == [[2, 5], [1, 4], [0, 3]]
    assert files._upright(frame, -90)[0, :, :, 0].tolist() == [[3, 0], [4, 1], [5, 2]]
    assert files._upright(frame, 180)[0, :, :, 0].tolist() == [[5, 4, 3], [2, 1, 0]]
    assert files._upright(frame, 0) is frame


# ---------------------------------------------------------------- bad input


def test_probe_video(video):
    info = probe_video(video)
    assert info["duration"] == pytest.approx(3.0)
    assert info["fps"] == pytest.approx(FPS)
    assert (info["width"], info["height"], info["codec"], info["rotation"]) == (64, 48, "mpeg4", 0)
    assert info["num_frames"] == N


def test_missing_path(tmp_path):
    with pytest.raises(StreamVLMError, match="not found"):
        read_video(tmp_path / "nope.mp4")


def test_directory(tmp_path):
    with pytest.raises(StreamVLMError, match="is a directory"):
        probe_video(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.mp4").touch()
    with pytest.raises(StreamVLMError, match="empty"):
        read_video(tmp_path / "empty.mp4")


def test_text_file(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video, just some notes\n" * 50)
    with pytest.raises(StreamVLMError, match="not a video file"):
        read_video(path)


def test_audio_only_file(tmp_path):
    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(StreamVLMError, match="no video stream.*audio"):
        read_video(path)


def test_destroyed_header(tmp_path, video):
    data = bytearray(video.read_bytes())
    data[:256] = np.random.default_rng(1).integers(0, 256, 256, dtype=np.uint8).tobytes()
    (tmp_path / "bad.mp4").write_bytes(bytes(data))
    with pytest.raises(StreamVLMError, match="corrupt"):
        read_video(tmp_path / "bad.mp4")


def test_random_bytes_in_the_middle(tmp_path, caplog):
    # mp4 keeps its index at the end, so the damage lands in frame data: those frames are skipped
    good = write_video(tmp_path / "good.mp4", indexed_frames(noise=True), fps=FPS).read_bytes()
    middle = len(good) // 2
    junk = np.random.default_rng(2).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    path = tmp_path / "bad.mp4"
    path.write_bytes(good[: middle - 500] + junk + good[middle + 500 :])
    with caplog.at_level(logging.WARNING, logger="streamvlm.video.files"):
        clip = read_video(path)
    assert 0 < len(clip) < N
    assert indices(clip)[:10] == list(range(10))
    assert "truncated or corrupt" in caplog.text


def test_truncated_mkv_returns_what_decoded(tmp_path, caplog, monkeypatch):
    good = write_video(tmp_path / "good.mkv", indexed_frames(noise=True), fps=FPS).read_bytes()
    path = tmp_path / "cut.mkv"
    path.write_bytes(good[: len(good) * 6 // 10])
    with caplog.at_level(logging.WARNING, logger="streamvlm.video.files"):
        clip = read_video(path)
    assert 5 < len(clip) < N
    assert indices(clip)[:5] == list(range(5))
    assert clip.timestamps.tolist() == pytest.approx([i / FPS for i in range(len(clip))])
    assert "truncated or corrupt" in caplog.text
    # sampling past the cut returns only frames that exist, warns, and agrees with or without decord
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamvlm.video.files"):
        sampled = read_video(path, num_frames=12)
    assert 0 < len(sampled) < 12 and "truncated or corrupt" in caplog.text
    monkeypatch.setattr(files, "_decord", None)
    assert torch.equal(read_video(path, num_frames=12).frames, sampled.frames)


@pytest.mark.parametrize("name, keep", [("cut.mp4", 0.6), ("cut.mkv", 0.05)])
def test_truncated_with_no_frame_is_an_error(tmp_path, name, keep):
    # an .mp4 cut short loses its index (written last); an mkv cut inside its first frame has no frame
    good = write_video(tmp_path / ("good" + name[3:]), indexed_frames(noise=True), fps=FPS).read_bytes()
    (tmp_path / name).write_bytes(good[: int(len(good) * keep)])
    with pytest.raises(StreamVLMError, match="truncated"):
        read_video(tmp_path / name)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_frames=4, fps=2.0), "not both"),
        (dict(num_frames=0), "num_frames"),
        (dict(fps=0.0), "fps must be positive"),
        (dict(max_frames=0), "max_frames"),
        (dict(start=-1.0), "start"),
        (dict(start=2.0, end=1.0), "must be after start"),
        (dict(start=5.0), "past the end"),
    ],
)
def test_bad_arguments(video, kwargs, message):
    with pytest.raises(StreamVLMError, match=message):
        read_video(video, **kwargs)


@pytest.mark.parametrize(
    "frames, message",
    [
        (np.zeros((2, 47, 64, 3), np.uint8), "even"),
        (np.zeros((2, 48, 64, 3), np.float32), "uint8"),
        (np.zeros((48, 64, 3), np.uint8), "uint8 \\(T, H, W, 3\\)"),
        (np.zeros((0, 48, 64, 3), np.uint8), "T >= 1"),
    ],
)
def test_write_video_rejects_bad_frames(tmp_path, frames, message):
    with pytest.raises(StreamVLMError, match=message):
        write_video(tmp_path / "v.mp4", frames)


def test_write_video_unknown_codec(tmp_path):
    with pytest.raises(StreamVLMError, match="not in this PyAV build"):
        write_video(tmp_path / "v.mp4", indexed_frames(2), codec="no-such-codec")


# ---------------------------------------------------------------- sample video


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMVLM_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert sample.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("STREAMVLM_CACHE")
    assert sample.cache_dir() == tmp_path / "x" / "streamvlm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sample.cache_dir() == tmp_path / "home" / ".cache" / "streamvlm"


def region(frame: torch.Tensor, top: int, left: int, size: int = 16) -> list[float]:
    return frame[top : top + size, left : left + size].double().mean(dim=(0, 1)).tolist()


def test_sample_video_is_created_once_and_shows_its_content(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMVLM_CACHE", str(tmp_path))
    path = sample.sample_video()
    assert path == tmp_path / sample.SAMPLE_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [sample.SAMPLE_NAME]  # no temp file left behind

    writes = []
    monkeypatch.setattr(sample, "write_video", lambda *a, **k: writes.append(a))
    assert sample.sample_video() == path and not writes

    clip = read_video(path)
    assert clip.frames.shape == (64, 256, 256, 3)
    assert clip.duration == pytest.approx(8.0) and clip.fps == pytest.approx(8.0)
    red, green, blue = ([float(v) for v in world.COLOURS[c]] for c in ("red", "green", "blue"))

    def at(frame_index: int, x: float, y: float) -> list[float]:  # unit coordinates -> the 16 px around it
        return region(clip.frames[frame_index], int(y * 256) - 8, int(x * 256) - 8)

    # the red square moves right along y = 0.3: x = 0.2 at the start, 0.2 + 0.07 * 7.875 at the end
    assert at(0, 0.2, 0.3) == pytest.approx(red, abs=12)
    assert at(63, 0.2 + 0.07 * 63 / 8, 0.3) == pytest.approx(red, abs=12)
    assert at(63, 0.2, 0.3)[0] < 100
    # the green triangle (moving left along y = 0.75) is there until second 4.5, then gone
    assert at(0, 0.75, 0.77) == pytest.approx(green, abs=12)
    assert at(35, 0.75 - 0.06 * 35 / 8, 0.77) == pytest.approx(green, abs=12)
    assert at(36, 0.75 - 0.06 * 36 / 8, 0.77)[1] < 100
    # the blue circle appears at second 3 at (0.3, 0.85)
    assert at(23, 0.3, 0.85)[2] < 100
    assert at(24, 0.3, 0.85) == pytest.approx(blue, abs=12)
    # the whole picture matches what was drawn
    assert (clip.frames.float() - sample._draw_sample().float()).abs().mean() < 3


def test_sample_video_at_a_given_path(tmp_path):
    path = sample.sample_video(tmp_path / "here" / "s.mkv")
    assert path.is_file() and probe_video(path)["duration"] == pytest.approx(8.0)


def test_decord_is_asked_only_where_its_random_access_saves_decoding(video, monkeypatch):
    info = files._probe(video)  # 64x48, 24 frames over 3 s
    assert files._decord_pays(info, 6, 0.0, 3.0)  # 4 frames of the file per frame asked
    assert not files._decord_pays(info, 7, 0.0, 3.0)  # nearly every frame: a sequential decode is as fast
    monkeypatch.setattr(files, "_DECORD_MAX_PIXELS", 64 * 48 - 1)  # frames larger than the bound: PyAV
    assert not files._decord_pays(info, 1, 0.0, 3.0)
