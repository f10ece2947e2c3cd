"""Live streams kept by the server: a LiveSession each, and the WebSocket clients watching it.

    LiveSession threads --on_event--> LiveStream.publish --loop.call_soon_threadsafe--> each watcher's queue
    ticker task (every second)   --> status (figures) and frame (a small JPEG of the newest frame) messages
    WebSocket "ask"              --> LiveSession.ask on a thread; its pieces go to the asker only

A watcher's queue is bounded: a client that stops reading loses status, frame and event messages (counted),
never its own answers nor the stream's `closed`, and never slows capture or ingest. Deleting a stream stops
its answer at the next token and refuses the questions waiting, whatever its watchers have read.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import torch

from streamvlm.live import LiveSession
from streamvlm.serve.errors import APIError
from streamvlm.serve.names import ClientNames
from streamvlm.video.live import LiveFrame, Reconnect, Source, open_source
from streamvlm.world.sample import source_spec

log = logging.getLogger(__name__)

PREVIEW_MAX_SIDE = 480
_WATCHER_QUEUE = 256


@dataclass(frozen=True)
class StreamSpec:
    source: str
    """As the client gave it (shown back); `resolved` is what is opened."""
    resolved: str
    fps: float
    routing: str
    memory_budget: str | int | None
    speed: float = 1.0
    loop: bool = False
    max_new_tokens: int = 64


class _Tap(Source):
    """A source that remembers its newest frame (for the preview) as frames pass through."""

    def __init__(self, inner: Source):
        self.inner, self.name, self.paced = inner, inner.name, inner.paced
        self.latest: LiveFrame | None = None

    def frames(self, stop, on_event=None) -> Iterator[LiveFrame]:
        for frame in self.inner.frames(stop, on_event):
            self.latest = frame
            yield frame


class Watcher:
    """One WebSocket client's view of a stream: its queue of messages, on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.lost = 0

    def offer(self, message: dict) -> None:
        """Queue a broadcast message, or count it lost if the client has fallen behind by _WATCHER_QUEUE."""
        if self.queue.qsize() >= _WATCHER_QUEUE:
            self.lost += 1
        else:
            self.queue.put_nowait(message)

    def send(self, message: dict) -> None:
        """Queue a message meant for this client (an answer), never dropped."""
        self.queue.put_nowait(message)


class LiveStream:
    """names: what the stream's figures and events call the server's paths (its source, the messages of the
    reader and the source), since they go to clients."""

    def __init__(self, stream_id: str, spec: StreamSpec, vlm, loop: asyncio.AbstractEventLoop, names: ClientNames):
        self.id, self.spec, self.loop, self.names = stream_id, spec, loop, names
        self.created = int(time.time())
        self.source = _Tap(open_source(source_spec(spec.resolved), fps=spec.fps, speed=spec.speed, loop=spec.loop,
                                       reconnect=Reconnect()))
        self.live = LiveSession(vlm, self.source, memory_budget=spec.memory_budget, on_event=self._on_event,
                                max_new_tokens=spec.max_new_tokens)
        self.watchers: set[Watcher] = set()
        # One answer at a time per stream (the session's lock would serialise them anyway): the others wait
        # here, on the event loop, instead of each blocking a thread on that lock.
        self.answering = asyncio.Lock()
        self.asks = 0  # questions answering or waiting, on the event loop only
        self.stops: set[threading.Event] = set()  # of the answer running now (set: it ends at its next token)
        self.closed = False  # deleted (or the server stopping): no question starts any more
        self._questions = itertools.count(1)
        self._preview: tuple[float, bytes] | None = None  # (stream time, JPEG) of the newest preview
        self._preview_lock = threading.Lock()
        self._ticker: asyncio.Task | None = None

    def start(self) -> None:
        self.live.start()
        self._ticker = self.loop.create_task(self._tick())

    def shut(self) -> None:
        """On the event loop, as the stream is deleted: no question starts from now on, the one answering ends
        at its next token, and every watcher is told (a message never dropped, however far behind its client
        is: its connection ends once it has read it). Before `close`."""
        self.closed = True
        if self._ticker is not None:
            self._ticker.cancel()
        for stop in self.stops:
            stop.set()
        for watcher in list(self.watchers):
            watcher.send({"type": "closed", "t": self.live.stream_time})

    def close(self) -> None:
        """Stop capture and ingest (blocking: call on a thread)."""
        self.live.stop()

    # -- what clients see --------------------------------------------------------------------------

    def describe(self) -> dict:
        spec = self.spec
        stats = {**self.live.stats(), "source": spec.source}  # as the client named it, not the file opened
        return self.names.figures({"id": self.id, "object": "stream", "source": spec.source, "fps": spec.fps,
                                   "routing": spec.routing, "memory_budget": spec.memory_budget, "speed": spec.speed,
                                   "loop": spec.loop, "created": self.created, "stats": stats})

    def status(self) -> dict:
        """The figures a watcher is sent every second (flat, for the page)."""
        s = self.live.stats()
        session = s["session"]
        return {"type": "status", "t": s["t"], "captured": s["captured"], "ingested": s["ingested"],
                "dropped": s["dropped"], "buffered": s["buffered"], "reconnects": s["reconnects"],
                "ingest_fps": s["ingest_fps"], "latency_s": s["latency_s"], "frames": session["frames"],
                "tokens": session["tokens"], "kv_bytes": session["kv_bytes"],
                "evicted_entries": session["evicted_entries"], "done": s["done"],
                "error": s["error"] and self.names.text(s["error"])}

    def preview(self) -> tuple[float, bytes] | None:
        """(stream time, JPEG bytes) of the newest captured frame, encoded at most once per frame."""
        frame = self.source.latest
        if frame is None:
            return None
        with self._preview_lock:
            if self._preview is None or self._preview[0] != frame.time:
                self._preview = (frame.time, jpeg(frame.frame))
            return self._preview

    def next_question_id(self) -> str:
        return f"q{next(self._questions)}"

    # -- fan-out -----------------------------------------------------------------------------------

    def _on_event(self, event: dict) -> None:
        """From the live session's threads."""
        if event["type"] == "ingested":  # per frame: the status message carries the count instead
            return
        self.loop.call_soon_threadsafe(self._broadcast, self.names.figures(event))

    def _broadcast(self, message: dict) -> None:
        for watcher in list(self.watchers):
            watcher.offer(message)

    async def _tick(self) -> None:
        last_preview = None
        while True:
            await asyncio.sleep(1.0)
            if not self.watchers:
                continue
            try:
                self._broadcast(await asyncio.to_thread(self.status))  # waits while an answer holds the lock
                shot = await asyncio.to_thread(self.preview)
                if shot is not None and shot[0] != last_preview:
                    last_preview = shot[0]
                    self._broadcast({"type": "frame", "t": shot[0], "jpeg": _b64(shot[1])})
            except Exception:  # a failed tick must not end the ticker
                log.exception("stream %s: status tick failed", self.id)


class StreamRegistry:
    """The server's live streams: at most `max_sessions` running (or opening) at once.

    A stream that ended or failed frees its slot at once; it stays readable (its figures, its last frame)
    until deleted, for `ended_grace_s` seconds after it was first seen ended, or until `max_sessions` newer
    ended streams push it out. `expired()` hands back those whose time is up, for the caller to close."""

    def __init__(self, max_sessions: int, ended_grace_s: float = 300.0):
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if ended_grace_s < 0:
            raise ValueError("ended_grace_s must be at least 0")
        self.max_sessions, self.ended_grace_s = max_sessions, ended_grace_s
        self._streams: dict[str, LiveStream] = {}
        self._ended_at: dict[str, float] = {}  # stream id -> monotonic time it was first seen ended
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._streams)

    def all(self) -> list[LiveStream]:
        """The open streams (not those still opening), ended ones included."""
        return [s for s in list(self._streams.values()) if s is not None]

    def _running(self) -> int:
        """Slots taken: streams opening or running (under the lock). Notes when each ended stream was first seen."""
        now = time.monotonic()
        running = 0
        for stream_id, stream in self._streams.items():
            if stream is not None and stream.live.done:
                self._ended_at.setdefault(stream_id, now)
            else:
                running += 1
        return running

    def expired(self) -> list[LiveStream]:
        """Ended streams past their grace period, or beyond the newest `max_sessions` ended ones: removed from
        the registry and returned (their threads have finished; close them to free their cache)."""
        with self._lock:
            self._running()
            now = time.monotonic()
            ended = sorted(self._ended_at, key=self._ended_at.get)
            keep = set(ended[-self.max_sessions:])
            gone = [i for i in ended if i not in keep or now - self._ended_at[i] >= self.ended_grace_s]
            for stream_id in gone:
                self._ended_at.pop(stream_id)
            return [s for s in (self._streams.pop(i, None) for i in gone) if s is not None]

    def reserve(self) -> str:
        """A new stream id, counted against the limit from now on (release it if the open fails)."""
        with self._lock:
            if self._running() >= self.max_sessions:
                raise APIError(429, f"this server runs at most {self.max_sessions} live stream(s) (--max-sessions); "
                                    "close one with DELETE /v1/streams/{id}", code="too_many_sessions")
            stream_id = "str_" + secrets.token_hex(8)
            self._streams[stream_id] = None  # type: ignore[assignment]  # reserved
            return stream_id

    def put(self, stream: LiveStream) -> None:
        with self._lock:
            self._streams[stream.id] = stream

    def release(self, stream_id: str) -> LiveStream | None:
        with self._lock:
            self._ended_at.pop(stream_id, None)
            return self._streams.pop(stream_id, None)

    def get(self, stream_id: str) -> LiveStream:
        stream = self._streams.get(stream_id)  # None too while reserved and still opening
        if stream is None:
            raise APIError(404, f"no live stream {stream_id!r}; GET /v1/streams lists the open ones",
                           param="stream_id", code="stream_not_found")
        return stream


def jpeg(frame: torch.Tensor, max_side: int = PREVIEW_MAX_SIDE, quality: int = 5) -> bytes:
    """uint8 (H, W, 3) RGB -> JPEG bytes, scaled down to at most max_side (PyAV's MJPEG encoder, no Pillow;
    quality is its quantiser scale, 2 best .. 31 worst)."""
    height, width = frame.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    # yuvj420p needs even sides
    out_w, out_h = max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)
    picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame.numpy()), format="rgb24")
    picture = picture.reformat(width=out_w, height=out_h, format="yuvj420p")
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = out_w, out_h, "yuvj420p"
    codec.time_base = Fraction(1, 25)
    codec.qmin = codec.qmax = quality
    packets = codec.encode(picture) + codec.encode(None)
    return b"".join(bytes(p) for p in packets)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
