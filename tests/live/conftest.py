"""Servers and helpers for the live tests: GStreamer's RTSP server and ffmpeg publishing MPEG-TS, each in
its own process on 127.0.0.1, started and stopped by the test.

The servers come from Debian packages (`.ci/run` installs them). Where they are missing the server tests
are skipped, unless STREAMVLM_REQUIRE_LIVE_SERVERS=1 (CI sets it), where they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from streamvlm.runtime import StreamVLM

SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")


def _missing(what: str) -> None:
    message = f"{what} is not installed (Debian: see the apt-get line in .ci/run)"
    if os.environ.get("STREAMVLM_REQUIRE_LIVE_SERVERS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Publisher:
    """A server or publisher process the test can kill, restart, freeze (SIGSTOP) and thaw."""

    def __init__(self, argv: list[str], url: str, ready: str | None = None):
        self.argv, self.url, self.ready = argv, url, ready
        self.proc: subprocess.Popen | None = None

    def start(self) -> Publisher:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self.ready is not None:
            line = self.proc.stdout.readline()  # the server prints its ready line once it listens
            if line.strip() != self.ready:
                self.kill()
                raise RuntimeError(f"{self.argv[:2]} did not start: {line!r}")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


# ffmpeg drawing a test pattern in real time, encoded as MPEG-2 video in MPEG-TS (64x48, 10 fps); the
# output URL goes last.
FFMPEG_TESTSRC = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
                  "testsrc=size=64x48:rate=10", "-c:v", "mpeg2video", "-g", "10", "-f", "mpegts"]


@pytest.fixture
def publishers():
    """The processes a test started; killed when it ends, whatever happened."""
    started: list[Publisher] = []
    yield started
    for publisher in started:
        publisher.kill()


@pytest.fixture
def rtsp_server(publishers):
    """rtsp_server() -> a started Publisher serving rtsp://127.0.0.1:PORT/test (H.264, 64x48, 10 fps)."""
    check = subprocess.run([SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
                            "from gi.repository import GstRtspServer"], capture_output=True)
    if check.returncode != 0:
        _missing("GStreamer's RTSP server for Debian's python3 (python3-gi, gir1.2-gst-rtsp-server-1.0)")

    def start(fps: int = 10) -> Publisher:
        port = free_port()
        publishers.append(Publisher([SYSTEM_PYTHON, str(RTSP_SERVER), str(port), "--fps", str(fps)],
                                    f"rtsp://127.0.0.1:{port}/test", ready="ready"))
        return publishers[-1].start()

    return start


@pytest.fixture
def udp_publisher(publishers):
    """udp_publisher() -> a started Publisher: ffmpeg sending MPEG-TS to udp://127.0.0.1:PORT in real time."""
    if shutil.which("ffmpeg") is None:
        _missing("ffmpeg")

    def start() -> Publisher:
        url = f"udp://127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
        publishers.append(Publisher(FFMPEG_TESTSRC + [f"{url}?pkt_size=1316"], url))
        return publishers[-1].start()

    return start


@pytest.fixture
def http_publisher(publishers):
    """http_publisher() -> a started Publisher: ffmpeg serving MPEG-TS at http://127.0.0.1:PORT/live.ts, in
    real time, to the first client that connects."""
    if shutil.which("ffmpeg") is None:
        _missing("ffmpeg")

    def start() -> Publisher:
        url = f"http://127.0.0.1:{free_port()}/live.ts"
        publishers.append(Publisher(FFMPEG_TESTSRC + ["-listen", "1", url], url))
        return publishers[-1].start()

    return start


class EventLog:
    """Collects events from any thread; wait_for blocks until one matches."""

    def __init__(self):
        self.events: list = []
        self._cond = threading.Condition()

    def __call__(self, event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def types(self) -> list[str]:
        with self._cond:
            return [_type(e) for e in self.events]

    def __len__(self) -> int:
        with self._cond:
            return len(self.events)

    def wait_for(self, predicate, timeout: float, since: int = 0):
        """The first event from index `since` on for which predicate is true, or None after timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[since:]:
                    if predicate(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def count(self, predicate) -> int:
        with self._cond:
            return sum(1 for e in self.events if predicate(e))


def _type(event) -> str:
    return event["type"] if isinstance(event, dict) else event.type


@pytest.fixture
def events() -> EventLog:
    return EventLog()


@pytest.fixture(scope="session")
def tiny_vlm(tiny_dir) -> StreamVLM:
    return StreamVLM.from_pretrained(tiny_dir, device="cpu")
