"""Live sources against real servers on 127.0.0.1: GStreamer's RTSP server and ffmpeg pushing MPEG-TS
over UDP, each in its own process. Faults: a server killed and restarted, a frozen server (SIGSTOP: the
connection stays open and no data comes), a stream that never opens."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from streamvlm.errors import StreamVLMError
from streamvlm.live import LiveSession
from streamvlm.video.live import Reconnect, open_source

# Short timeouts keep the tests quick; retries=None: a test decides when the stream is gone for good.
POLICY = Reconnect(open_timeout=4.0, read_timeout=2.0, retries=None, backoff=0.2, backoff_max=1.0)


class Reader:
    """Runs a source's frames() on a thread, as a live session's capture thread does."""

    def __init__(self, source, on_event):
        self.frames, self.error, self.stop = [], None, threading.Event()
        self._cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(source, on_event), daemon=True)
        self.thread.start()

    def _run(self, source, on_event):
        try:
            for frame in source.frames(self.stop, on_event):
                with self._cond:
                    self.frames.append(frame)
                    self._cond.notify_all()
        except StreamVLMError as e:
            self.error = e

    def wait_for_frames(self, count: int, timeout: float = 30.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.frames) >= count, timeout)

    def close(self):
        self.stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive()


def is_reconnect(event) -> bool:
    return event.type == "reconnect"


def test_rtsp_frames_arrive_with_increasing_stream_times(rtsp_server, events):
    server = rtsp_server()
    reader = Reader(open_source(server.url, fps=5, reconnect=POLICY), events)
    try:
        assert reader.wait_for_frames(8)
    finally:
        reader.close()
    times = [f.time for f in reader.frames]
    assert all(b > a for a, b in zip(times, times[1:]))
    # sampled at 5 fps from a 10 fps stream: ticks 0.2 s apart (the stream's own spacing, not arrival time)
    # (the first frames arrive in a burst after the open's probing; the first lacks a pts and takes the clock)
    later = times[1:]
    assert [b - a for a, b in zip(later, later[1:])] == pytest.approx([0.2] * (len(later) - 1), abs=0.01)
    assert tuple(reader.frames[0].frame.shape) == (48, 64, 3)
    assert events.types()[0] == "connected"


def test_rtsp_server_killed_and_restarted_the_session_reconnects_and_keeps_answering(rtsp_server, tiny_vlm,
                                                                                      events):
    server = rtsp_server()
    source = open_source(server.url, fps=5, reconnect=POLICY)
    with LiveSession(tiny_vlm, source, memory_budget=None, on_event=events) as live:
        assert live.wait_for_frames(4, timeout=30)
        first = live.ask("What is there?", max_new_tokens=3)
        server.kill()
        assert events.wait_for(lambda e: e["type"] == "reconnect", timeout=20) is not None
        held = live.ingested
        # while it is down the session still answers about what it ingested (a frame still in the buffer
        # when the connection broke may join in the meantime)
        during = live.ask("Still there?", max_new_tokens=3)
        assert during.frames >= held >= first.frames
        server.start()  # the same port
        assert live.wait_for_frames(during.frames + 4, timeout=40)
        after = live.ask("And now?", max_new_tokens=3)
        stats = live.stats()
    assert first.frames >= 4 and after.frames >= during.frames + 4 and after.t > during.t
    assert stats["reconnects"] >= 1 and stats["error"] is None
    assert [e["message"].startswith("reconnected") for e in events.events if e["type"] == "connected"][-1]
    # the cache kept every frame ingested before the outage: nothing was evicted (no budget), all frames in
    assert stats["session"]["frames"] == stats["ingested"] and stats["session"]["evicted_entries"] == 0
    assert stats["session"]["turns"] == 3
    ingested_t = [e["t"] for e in events.events if e["type"] == "ingested"]
    assert all(b > a for a, b in zip(ingested_t, ingested_t[1:]))


def test_frozen_rtsp_server_times_out_and_reconnects(rtsp_server, events):
    server = rtsp_server()
    reader = Reader(open_source(server.url, fps=5, reconnect=POLICY), events)
    try:
        assert reader.wait_for_frames(3)
        server.freeze()  # the TCP connection stays open; no more data
        frozen = time.monotonic()
        stalled = events.wait_for(is_reconnect, timeout=POLICY.read_timeout + 20)
        detected = time.monotonic() - frozen
        assert stalled is not None and "read timeout" in stalled.message
        # the read timeout fires near the configured time (slack: frames already in flight, a slow machine)
        assert detected < POLICY.read_timeout + 3.0
        count = len(reader.frames)
        server.thaw()
        assert reader.wait_for_frames(count + 3, timeout=40)
    finally:
        server.thaw()
        reader.close()
    assert events.count(lambda e: e.type == "connected") >= 2


def test_stream_that_never_opens_is_a_clear_error_after_the_retries(events):
    with socket.socket() as closed:  # a port nobody listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        url = f"rtsp://127.0.0.1:{closed.getsockname()[1]}/test"
    source = open_source(url, reconnect=Reconnect(open_timeout=2.0, retries=2, backoff=0.05))
    with pytest.raises(StreamVLMError, match=r"after 3 attempt\(s\).*retries 2"):
        for _ in source.frames(threading.Event(), events):
            pass
    assert events.types() == ["reconnect", "reconnect"]


def test_server_that_accepts_but_never_answers_hits_the_open_timeout(events):
    with socket.socket() as silent:  # accepts TCP connections (backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"rtsp://127.0.0.1:{silent.getsockname()[1]}/test"
        source = open_source(url, reconnect=Reconnect(open_timeout=1.0, retries=1, backoff=0.05))
        with pytest.raises(StreamVLMError, match="open timeout"):
            for _ in source.frames(threading.Event(), events):
                pass
    assert events.types() == ["reconnect"]


def test_udp_mpegts_from_ffmpeg_with_publisher_restart(udp_publisher, events):
    publisher = udp_publisher()
    reader = Reader(open_source(publisher.url, fps=5, reconnect=POLICY), events)
    try:
        assert reader.wait_for_frames(5)
        publisher.kill()  # UDP has no connection to close: the reader sees a stall
        assert events.wait_for(is_reconnect, timeout=POLICY.read_timeout + 20) is not None
        count = len(reader.frames)
        publisher.start()
        assert reader.wait_for_frames(count + 5, timeout=40)
    finally:
        reader.close()
    times = [f.time for f in reader.frames]
    assert all(b > a for a, b in zip(times, times[1:]))
    assert tuple(reader.frames[0].frame.shape) == (48, 64, 3)


def test_http_mpegts_from_ffmpeg(http_publisher, events):
    publisher = http_publisher()
    # ffmpeg listens once it has started; the first attempts may be refused, which the retries absorb
    reader = Reader(open_source(publisher.url, fps=5, reconnect=POLICY), events)
    try:
        assert reader.wait_for_frames(5)
    finally:
        reader.close()
    times = [f.time for f in reader.frames]
    assert all(b > a for a, b in zip(times, times[1:])) and "connected" in events.types()
