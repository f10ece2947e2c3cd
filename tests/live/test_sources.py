"""Live sources without servers: files played as live, lavfi, the fps gate, the frame buffer, the stream
clock, and the errors a user can cause."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from streamvlm.errors import StreamVLMError
from streamvlm.video import live as live_mod
from streamvlm.video.files import iter_frames
from streamvlm.video.live import (FileSource, FpsGate, LatestFrames, Reconnect, StreamSource, _StreamClock,
                                  open_source)
from support import FPS, N, encode, indexed_frames, indices, upright_picture


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("live") / "indexed.mp4", indexed_frames())


def take(source, count=None, on_event=None):
    stop = threading.Event()
    out = []
    for frame in source.frames(stop, on_event):
        out.append(frame)
        if count is not None and len(out) == count:
            stop.set()
            break
    return out


def test_fps_gate_keeps_one_frame_per_tick_and_restarts_after_a_gap():
    gate = FpsGate(2.0)
    times = [0.0, 0.1, 0.3, 0.5, 0.55, 0.99, 1.0, 1.2, 5.0, 5.2, 5.5]
    assert [t for t in times if gate(t)] == [0.0, 0.5, 1.0, 5.0, 5.5]
    assert all(FpsGate(None)(t) for t in times)
    with pytest.raises(StreamVLMError, match="positive"):
        FpsGate(0)


def test_latest_frames_drops_the_oldest_and_counts():
    buffer = LatestFrames(3)
    lost = [buffer.put(i) for i in range(7)]
    assert lost == [0, 0, 0, 1, 1, 1, 1] and buffer.dropped == 4
    assert buffer.take(2) == [4, 5] and buffer.take(5) == [6]
    assert buffer.take(1, timeout=0.01) == []  # empty: waits, then gives nothing
    buffer.put(7)
    buffer.close()
    assert not buffer.drained and buffer.take(4) == [7] and buffer.drained and buffer.take(1) == []
    with pytest.raises(StreamVLMError):
        LatestFrames(0)


def test_latest_frames_wakes_a_waiting_consumer():
    buffer = LatestFrames(2)
    got = []
    consumer = threading.Thread(target=lambda: got.append(buffer.take(2, timeout=30)))
    consumer.start()
    buffer.put("frame")
    consumer.join(30)
    assert got == [["frame"]]


def test_stream_clock_follows_pts_is_monotonic_and_reanchors(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(live_mod.time, "monotonic", lambda: now[0])
    clock = _StreamClock(max_drift=2.0)
    now[0] = 101.0
    assert clock(50.0) == pytest.approx(1.0)  # anchored: first frame at the clock's time
    now[0] = 101.3
    assert clock(50.1) == pytest.approx(1.1)  # then the stream's own spacing, not the arrival jitter
    assert clock(None) == pytest.approx(1.3)  # no pts: the clock
    assert clock(50.1) > 1.3  # never backwards
    now[0] = 110.0
    assert clock(50.2) == pytest.approx(10.0)  # pts far from the clock (a camera reset): re-anchored
    clock.reconnected()
    now[0] = 112.0
    assert clock(0.0) == pytest.approx(12.0)  # a new connection starts its pts at 0: anchored again


def test_file_at_full_speed_gives_the_frames_iter_frames_picks(video):
    frames = take(FileSource(video, fps=4.0, speed=0))
    expected = list(iter_frames(video, fps=4.0))
    assert [f.time for f in frames] == [f.time for f in expected]
    assert indices(torch.stack([f.frame for f in frames])) == indices(torch.stack([f.frame for f in expected]))


def test_file_played_as_live_is_paced_by_the_wall_clock(video):
    # A frame never comes out before its time: frame k of a file at speed 2 waits until k/(2*fps) s.
    source = FileSource(video, speed=2.0)
    start = time.monotonic()
    frames = take(source, 6)
    for frame in frames[1:]:
        assert frame.captured - start >= (frame.time - frames[0].time) / 2.0 - 0.01
    assert [f.time for f in frames] == pytest.approx([k / FPS for k in range(6)])


def test_file_loop_keeps_stream_time_increasing(video, events):
    frames = take(FileSource(video, speed=0, loop=True), 2 * N + 3, events)
    times = [f.time for f in frames]
    assert all(b > a for a, b in zip(times, times[1:]))
    assert times[N] == pytest.approx(N / FPS)  # the second pass starts where the first ended
    assert indices(torch.stack([f.frame for f in frames]))[N:N + 3] == [0, 1, 2]
    assert "end" not in events.types()


def test_file_end_is_reported(video, events):
    assert len(take(FileSource(video, speed=0), None, events)) == N
    assert events.types() == ["end"] and events.events[0].t == pytest.approx((N - 1) / FPS)


def test_rotated_file_as_live_comes_out_upright(tmp_path):
    picture = upright_picture()
    path = encode(tmp_path / "rotated.mp4", np.stack([np.rot90(picture, -1)] * 3).copy(), rotation=90)
    frame = take(FileSource(path, speed=0), 1)[0].frame
    assert frame.shape == picture.shape and torch.equal(frame[:8, :8], torch.full((8, 8, 3), 235, dtype=torch.uint8))


def test_lavfi_source_is_paced_at_its_rate_and_sampled(events):
    source = open_source("lavfi:testsrc=size=64x48:rate=20", fps=5.0)
    start = time.monotonic()
    frames = take(source, 4, events)
    assert [f.time for f in frames] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert frames[-1].captured - start >= 0.6 - 0.01  # paced, not read as fast as the filter runs
    assert tuple(frames[0].frame.shape) == (48, 64, 3) and frames[0].frame.dtype == torch.uint8
    assert events.types() == ["connected"]


def test_finite_lavfi_graph_ends(events):
    frames = take(open_source("lavfi:testsrc=size=32x32:rate=10:duration=0.5", speed=0), None, events)
    assert len(frames) == 5 and events.types() == ["connected", "end"]


@pytest.mark.parametrize("spec, message", [
    ("ftp://example/video", "unsupported source"),
    ("/nonexistent/clip.mp4", "is not a file, a URL"),
    ("/dev/video99", "no camera at /dev/video99"),
    ("lavfi:", "needs a filter graph"),
])
def test_bad_specs(spec, message):
    with pytest.raises(StreamVLMError, match=message):
        open_source(spec)


def test_bad_file_fails_before_anything_starts(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(StreamVLMError, match="empty"):
        open_source(str(empty))
    with pytest.raises(StreamVLMError, match="speed"):
        FileSource(empty, speed=-1)


def test_bad_lavfi_graph_is_a_clear_error_after_its_retries(events):
    source = StreamSource("nosuchfilter=x", format="lavfi", reconnect=Reconnect(retries=1, backoff=0.01))
    with pytest.raises(StreamVLMError, match="after 2 attempt"):
        take(source, None, events)
    assert events.types() == ["reconnect"]


@pytest.mark.parametrize("kwargs", [dict(open_timeout=0), dict(read_timeout=-1), dict(retries=-1),
                                    dict(backoff=2.0, backoff_max=1.0)])
def test_bad_reconnect_policy(kwargs):
    with pytest.raises(StreamVLMError):
        Reconnect(**kwargs)


def test_backoff_doubles_up_to_its_cap():
    policy = Reconnect(backoff=0.5, backoff_max=3.0)
    assert [policy.wait(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_latest_frames_put_can_wait_for_room():
    buffer = LatestFrames(1)
    buffer.put("a")
    producer = threading.Thread(target=lambda: buffer.put("b", wait=True))
    producer.start()
    producer.join(0.1)
    assert producer.is_alive() and len(buffer) == 1  # waiting, not dropping
    assert buffer.take(1) == ["a"]
    producer.join(30)
    assert buffer.take(1) == ["b"] and buffer.dropped == 0
