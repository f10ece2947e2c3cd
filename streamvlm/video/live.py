"""Live video sources: network streams, webcams, FFmpeg test sources and files played as live.

Every source yields `LiveFrame`s (stream time, upright uint8 RGB frame, when it was captured) from
`frames(stop, on_event)`, a generator meant to run on a capture thread; `stop` (a threading.Event) ends it.

    spec                              source
    (the CLI and the server turn `sample` into the built-in sample video's path before opening it)
    PATH                              a video file played as live at its own rate (speed 0: as fast as it decodes)
    rtsp://..., rtsps://...           RTSP over TCP
    udp://, rtp://, tcp://, http://,  any FFmpeg network input (MPEG-TS over UDP or HTTP, SRT, RTMP, ...)
    https://, srt://, rtmp://
    /dev/videoN                       a V4L2 webcam
    lavfi:GRAPH                       an FFmpeg lavfi source (lavfi:testsrc=size=320x240:rate=25), paced

Network streams and webcams open with an open timeout, read with a read timeout (a frozen server, the
connection open and no data coming, raises inside FFmpeg through PyAV's interrupt callback), and reconnect
with exponential backoff when the stream ends, stalls or breaks. `retries` failed attempts in a row (no
frame between them) end the source with a StreamVLMError. Connects, reconnects and the end of a finite
source are reported as `SourceEvent`s to the `on_event` given to `frames`.

Stream time is in seconds. Files and lavfi: the frame's presentation time (a looped file adds its duration
per loop). Network streams and webcams: seconds on a monotonic clock since the source started, anchored at
the first frame of each connection and advanced by the stream's own timestamps (smooth spacing, no network
jitter); frames without timestamps, and timestamps that drift far from the clock (a camera's clock reset,
a reconnect), take the clock's time. Stream time never goes backwards.

`fps` samples frames at that rate (the latest frame at each tick), before the frame is converted to RGB,
so a 60 fps camera sampled at 1 fps converts one frame a second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import av
import torch

from streamvlm.errors import StreamVLMError
from streamvlm.video.files import _quarter_turns, _upright, iter_frames, probe_video

log = logging.getLogger(__name__)

NETWORK_SCHEMES = ("rtsp", "rtsps", "udp", "rtp", "tcp", "http", "https", "srt", "rtmp", "rtmps")


@dataclass(frozen=True, eq=False)
class LiveFrame:
    time: float
    """Stream time in seconds (see the module docstring)."""
    frame: torch.Tensor
    """uint8 (H, W, 3) RGB, upright."""
    captured: float
    """time.monotonic() when the frame came out of the decoder."""


@dataclass(frozen=True)
class SourceEvent:
    type: str
    """connected | reconnect | end."""
    t: float | None
    """Stream time of the last frame before the event (None before the first frame)."""
    message: str
    attempt: int = 0
    """reconnect: the number of failed attempts in a row so far."""


@dataclass(frozen=True)
class Reconnect:
    """Timeouts and the reconnect policy of a network stream or webcam."""

    open_timeout: float = 10.0
    """Seconds an open (connect, handshake, probing the first packets) may take."""
    read_timeout: float = 5.0
    """Seconds without data before the stream counts as stalled and is reopened."""
    retries: int | None = 5
    """Failed attempts in a row before giving up (None: never give up). A frame resets the count."""
    backoff: float = 0.5
    """Seconds before the first retry; doubled after each failure, up to backoff_max."""
    backoff_max: float = 8.0

    def __post_init__(self):
        if not (self.open_timeout > 0 and self.read_timeout > 0):
            raise StreamVLMError("open and read timeouts must be positive")
        if self.retries is not None and self.retries < 0:
            raise StreamVLMError(f"retries must be >= 0 (or None for no limit), got {self.retries}")
        if self.backoff < 0 or self.backoff_max < self.backoff:
            raise StreamVLMError("backoff must be >= 0 and backoff_max >= backoff")

    def wait(self, failures: int) -> float:
        return min(self.backoff * 2 ** max(failures - 1, 0), self.backoff_max)


EventSink = Callable[[SourceEvent], None]


class FpsGate:
    """Keeps one frame per 1/fps seconds of stream time: the first at or after each tick.

    Ticks stay on a grid (t0, t0 + 1/fps, ...) while frames keep coming; after a gap longer than a tick
    (a reconnect), the grid restarts at the next frame."""

    def __init__(self, fps: float | None):
        if fps is not None and not fps > 0:
            raise StreamVLMError(f"fps must be positive, got {fps}")
        self.period = 1.0 / fps if fps else 0.0
        self._next: float | None = None

    def __call__(self, t: float) -> bool:
        if not self.period:
            return True
        if self._next is not None and t < self._next - 1e-6:
            return False
        behind = self._next is None or t - self._next >= self.period
        self._next = t + self.period if behind else self._next + self.period
        return True


class Source:
    """A video source; `frames` runs on one thread, once."""

    name: str
    paced: bool
    """Frames come on a clock (network streams and webcams; files and lavfi at a speed above 0). A
    consumer that falls behind a paced source drops frames; an unpaced one (full speed) is waited for."""

    def frames(self, stop: threading.Event, on_event: EventSink | None = None) -> Iterator[LiveFrame]:
        """Frames until the source ends, fails (StreamVLMError) or `stop` is set."""
        raise NotImplementedError


class _StreamClock:
    """Stream time for live inputs: a monotonic clock, advanced by the stream's own timestamps."""

    def __init__(self, max_drift: float):
        self.start = time.monotonic()
        self.max_drift = max_drift
        self.last: float | None = None
        self._anchor: float | None = None

    def reconnected(self) -> None:
        self._anchor = None

    def __call__(self, pts_seconds: float | None) -> float:
        now = time.monotonic() - self.start
        if pts_seconds is None:
            t = now
        else:
            if self._anchor is None or abs(self._anchor + pts_seconds - now) > self.max_drift:
                self._anchor = now - pts_seconds
            t = self._anchor + pts_seconds
        if self.last is not None and t <= self.last:
            t = self.last + 1e-3
        self.last = t
        return t


class FileSource(Source):
    """A video file played as live: frames at their own timestamps, paced by the wall clock.

    speed: 1.0 plays in real time, 2.0 twice as fast, 0 as fast as it decodes. loop: start over at the end
    (stream time keeps counting). Bad files raise StreamVLMError here, before anything starts.
    """

    def __init__(self, path: str | Path, fps: float | None = None, speed: float = 1.0, loop: bool = False):
        if speed < 0:
            raise StreamVLMError(f"speed must be >= 0, got {speed}")
        self.path = Path(path)
        self.info = probe_video(self.path)
        self.fps, self.speed, self.loop = fps, speed, loop
        self.name = str(self.path)
        self.paced = speed > 0

    def frames(self, stop: threading.Event, on_event: EventSink | None = None) -> Iterator[LiveFrame]:
        pace = _Pacer(self.speed)
        offset, last = 0.0, None
        while not stop.is_set():
            with closing(iter_frames(self.path, fps=self.fps)) as items:
                for item in items:
                    t = offset + item.time
                    if pace(t, stop):
                        return
                    last = t
                    yield LiveFrame(t, item.frame, time.monotonic())
            if not self.loop:
                if on_event is not None:
                    on_event(SourceEvent("end", last, f"end of {self.path.name}"))
                return
            offset += self.info["duration"]


class StreamSource(Source):
    """A network stream, a webcam or a lavfi graph, read with PyAV (see the module docstring)."""

    def __init__(self, url: str, *, format: str | None = None, options: dict[str, str] | None = None,
                 fps: float | None = None, reconnect: Reconnect | None = None, finite: bool = False,
                 speed: float = 0.0):
        """reconnect: timeouts and retries (default Reconnect()). finite: the stream's own timestamps are the
        stream time and its end is the end of the source, not a reason to reconnect (lavfi). speed: pace a
        finite stream's frames at their timestamps (1.0: real time; 0: as fast as they come), since a lavfi
        graph runs as fast as it is read."""
        self.url, self.format, self.fps, self.finite = url, format, fps, finite
        self.name = f"lavfi:{url}" if format == "lavfi" else url
        self.options = dict(options or {})
        self.policy = reconnect or Reconnect()
        self.speed = speed
        self.paced = not finite or speed > 0
        scheme = urlsplit(url).scheme.lower()
        # FFmpeg's RTSP demuxer, interrupted after a stall, waits once more before it gives up (measured:
        # a frozen server is detected after twice PyAV's read timeout), so RTSP gets half the budget.
        self._read_timeout = self.policy.read_timeout / (2 if scheme in ("rtsp", "rtsps") else 1)

    def _open(self):
        return av.open(self.url, format=self.format, options=self.options, metadata_errors="ignore",
                       timeout=(self.policy.open_timeout, self._read_timeout))

    def frames(self, stop: threading.Event, on_event: EventSink | None = None) -> Iterator[LiveFrame]:
        emit = on_event if on_event is not None else (lambda event: None)
        clock = _StreamClock(max_drift=max(2.0, self.policy.read_timeout))
        failures, opened_once = 0, False
        while not stop.is_set():
            got_frame = False
            try:
                container = self._open()
            except (av.FFmpegError, OSError) as e:
                reason = f"open failed: {_reason(e, self.policy.open_timeout, 'open')}"
            else:
                emit(SourceEvent("connected", clock.last, f"{'re' if opened_once else ''}connected to {self.name}"))
                opened_once = True
                clock.reconnected()
                reason = "the stream ended"
                try:
                    with container:
                        for frame in self._decode(container, clock, stop):
                            got_frame = True
                            failures = 0
                            yield frame
                except (av.FFmpegError, OSError) as e:
                    reason = _reason(e, self.policy.read_timeout, "read")
                except StreamVLMError as e:
                    reason = str(e)
            if stop.is_set():
                return
            if self.finite and got_frame and reason == "the stream ended":
                emit(SourceEvent("end", clock.last, f"end of {self.name}"))
                return
            if not got_frame:
                failures += 1
            if self.policy.retries is not None and failures > self.policy.retries:
                raise StreamVLMError(
                    f"could not read {self.name} after {failures} attempt(s) in a row (last: {reason}). Check the "
                    f"address and that the stream is running (open timeout {self.policy.open_timeout:g} s, "
                    f"read timeout {self.policy.read_timeout:g} s, retries {self.policy.retries}).")
            wait = self.policy.wait(max(failures, 1))
            emit(SourceEvent("reconnect", clock.last, f"{reason}; reconnecting in {wait:.1f} s", attempt=failures))
            if stop.wait(wait):
                return

    def _decode(self, container, clock: _StreamClock, stop: threading.Event) -> Iterator[LiveFrame]:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "no streams"
            raise StreamVLMError(f"{self.name} has no video stream (it has: {kinds})")
        stream = container.streams.video[0]
        gate = FpsGate(self.fps)
        pace = _Pacer(self.speed if self.finite else 0.0)
        tb, origin = stream.time_base, stream.start_time or 0
        for frame in container.decode(stream):
            seconds = float((frame.pts - origin) * tb) if frame.pts is not None and tb else None
            if self.finite:  # lavfi: its own timestamps are the stream time
                t = seconds if seconds is not None else clock(None)
                if pace(t, stop):
                    return
            else:
                t = clock(seconds)
            if stop.is_set():
                return
            if not gate(t):
                continue
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))
            turns = _quarter_turns(frame.rotation)
            yield LiveFrame(t, _upright(rgb[None], turns * 90)[0] if turns else rgb, time.monotonic())


class _Pacer:
    """Sleeps until a frame's time has come on the wall clock (speed 0: never sleeps)."""

    def __init__(self, speed: float):
        self.speed = speed
        self._origin: tuple[float, float] | None = None  # (stream time, monotonic) of the first frame

    def __call__(self, t: float, stop: threading.Event) -> bool:
        """Wait for t; True if `stop` was set meanwhile."""
        if not self.speed:
            return stop.is_set()
        if self._origin is None:
            self._origin = (t, time.monotonic())
        due = self._origin[1] + (t - self._origin[0]) / self.speed
        return stop.wait(max(0.0, due - time.monotonic()))


def _reason(error: Exception, timeout: float, what: str) -> str:
    if isinstance(error, av.ExitError):  # PyAV's interrupt callback: the timeout fired
        return f"no data for {timeout:g} s ({what} timeout)"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def open_source(spec: str | Path, *, fps: float | None = None, speed: float = 1.0, loop: bool = False,
                reconnect: Reconnect | None = None, options: dict[str, str] | None = None) -> Source:
    """A Source for a spec (see the module docstring). Files are probed here, so a bad file fails now."""
    spec = str(spec)
    if fps is not None and not fps > 0:
        raise StreamVLMError(f"fps must be positive, got {fps}")
    if spec.startswith("lavfi:"):
        graph = spec[len("lavfi:"):]
        if not graph:
            raise StreamVLMError("lavfi: needs a filter graph, e.g. lavfi:testsrc=size=320x240:rate=25")
        # a lavfi graph runs as fast as it is read: pace it at its own rate, unless speed 0 asks for full speed
        return StreamSource(graph, format="lavfi", options=options, fps=fps, speed=speed, finite=True,
                            reconnect=Reconnect(retries=0))
    scheme = urlsplit(spec).scheme.lower()
    if scheme in NETWORK_SCHEMES:
        opts = {"analyzeduration": "1000000"}  # probe one second of stream, not FFmpeg's default five
        if scheme in ("rtsp", "rtsps"):
            opts["rtsp_transport"] = "tcp"
        if scheme == "udp":
            opts.update(overrun_nonfatal="1", fifo_size="1000000")  # a slow reader loses packets, not the stream
        opts.update(options or {})
        return StreamSource(spec, options=opts, fps=fps, reconnect=reconnect)
    if "://" in spec:
        schemes = ", ".join(s + "://" for s in NETWORK_SCHEMES)
        raise StreamVLMError(f"unsupported source {spec!r}: use one of {schemes}, a file, /dev/videoN, lavfi:GRAPH "
                             "or sample")
    if spec.startswith("/dev/video"):
        if not Path(spec).exists():
            raise StreamVLMError(f"no camera at {spec}; list the cameras with `v4l2-ctl --list-devices` or "
                                 "`ls /dev/video*`")
        return StreamSource(spec, format="video4linux2", options=options, fps=fps, reconnect=reconnect)
    if not Path(spec).expanduser().exists():
        raise StreamVLMError(f"source {spec!r} is not a file, a URL, a camera or 'sample'. Check the path "
                             f"(relative paths start at {Path.cwd()}) or the URL's scheme.")
    return FileSource(Path(spec).expanduser(), fps=fps, speed=speed, loop=loop)


class LatestFrames:
    """A bounded buffer between a capture thread and a consumer that may be slower than the camera.

    put() does not block: when the buffer is full the oldest frame is dropped (and counted), so the
    consumer always gets the newest frames and its lag stays bounded by the capacity. put(wait=True)
    waits for room instead, for sources that run at the consumer's pace (a file at full speed).
    Thread-safe.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise StreamVLMError(f"the frame buffer needs room for at least 1 frame, got {capacity}")
        self.capacity = capacity
        self.dropped = 0
        self._items: deque = deque()
        self._closed = False
        self._ready = threading.Condition()

    def put(self, item, wait: bool = False) -> int:
        """Add an item; returns how many old items it pushed out (0 or 1)."""
        with self._ready:
            if wait:
                self._ready.wait_for(lambda: len(self._items) < self.capacity or self._closed)
            lost = 0
            if len(self._items) >= self.capacity:
                self._items.popleft()
                lost = 1
                self.dropped += 1
            self._items.append(item)
            self._ready.notify()
            return lost

    def take(self, max_items: int, timeout: float | None = None) -> list:
        """Up to max_items of the oldest items, waiting up to timeout for the first; [] on timeout or when
        closed and empty."""
        with self._ready:
            self._ready.wait_for(lambda: self._items or self._closed, timeout)
            items = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
            self._ready.notify_all()  # a producer may be waiting for room
            return items

    def close(self) -> None:
        """No more puts; take() returns what is left, then []."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    @property
    def drained(self) -> bool:
        with self._ready:
            return self._closed and not self._items

    def __len__(self) -> int:
        with self._ready:
            return len(self._items)
