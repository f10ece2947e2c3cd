"""A live session: a source watched on two threads while questions are asked at any time.

    capture thread:  source.frames() -> LatestFrames (bounded; when full the oldest frame is dropped)
    ingest thread:   take a few frames -> vlm.encode (no lock) -> [lock] session.append_encoded, a frame
                     at a time (append_frames)
    caller:          ask(question) -> [lock] session.ask_stream -> pieces of the answer

One lock serialises what touches the KV cache: an append, or a whole answer. A question sees every frame
ingested before it took the lock; frames captured meanwhile wait in the buffer (encoding goes on), and
are appended after the answer. The buffer bounds how far the model can fall behind the camera: frames
dropped there are counted and reported, never queued without bound. A source that is not paced (a file at
full speed) waits for room instead of dropping. The session has a memory budget
("auto": half the model's context) so the cache stays flat however long the stream runs.

Events go to `on_event` as dicts with `type` and `t` (the stream time they refer to), from the capture
and ingest threads: connected, reconnect (attempt, message), end (the source ended), dropped (count,
total), error (message, where), ingested (frames: the total so far) after each append, and done (the
last one: capture ended and everything captured was ingested, or something failed).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from streamvlm.batching import BatchedDecoder
from streamvlm.cores import one_core
from streamvlm.errors import StreamVLMError
from streamvlm.video.live import LatestFrames, LiveFrame, Source, SourceEvent

log = logging.getLogger(__name__)

EventHandler = Callable[[dict], None]

# How often (wall seconds) "dropped" events are sent while frames are being dropped.
_DROPPED_EVERY = 1.0
# Ingest rate is measured over this many recent wall seconds.
_RATE_WINDOW = 10.0


@dataclass(frozen=True)
class LiveAnswer:
    question: str
    text: str
    t: float | None
    """Stream time of the last frame the answer saw (None if no frame was in yet)."""
    frames: int
    """Frames ingested when the question was asked."""
    first_token_s: float | None
    """Seconds from the question to the first answer token (None when the first token was a stop token)."""
    seconds: float
    stop_reason: str

    def as_event(self) -> dict:
        return {"type": "answer", "t": self.t, "question": self.question, "text": self.text, "frames": self.frames,
                "first_token_s": self.first_token_s, "seconds": self.seconds, "stop_reason": self.stop_reason}


class LiveSession:
    """Watch a source and answer questions about it while it plays (see the module docstring).

        with LiveSession(vlm, open_source("rtsp://cam/stream", fps=1)) as live:
            live.wait_for_frames(10)
            print(live.ask("What is happening?").text)

    memory_budget: as StreamVLM.session (default "auto": half the model's context; None: unbounded).
    buffer_frames: capacity of the buffer between capture and ingest. max_batch: frames taken from the
    buffer and encoded at a time (default the model's max_chunk_frames). append_frames: frames appended to
    the cache per hold of the lock; a question waits for at most this many frames' append before it starts
    (1: the lowest latency; more: fewer, larger decoder calls). Keyword arguments: SamplingConfig overrides.
    """

    def __init__(self, vlm, source: Source, *, memory_budget="auto", buffer_frames: int = 8,
                 max_batch: int | None = None, append_frames: int = 1, on_event: EventHandler | None = None,
                 **sampling):
        self.vlm, self.source = vlm, source
        self.session = vlm.session(memory_budget=memory_budget, **sampling)
        self.max_batch = max_batch or vlm.max_chunk_frames
        self.append_frames = append_frames
        if self.max_batch < 1 or append_frames < 1:
            raise StreamVLMError(f"max_batch and append_frames must be at least 1, got {max_batch}, {append_frames}")
        self._buffer = LatestFrames(buffer_frames)
        self._on_event = on_event if on_event is not None else (lambda event: None)
        self._lock = threading.Lock()  # held for an append or a whole answer
        self._stop = threading.Event()
        self._stopped = threading.Event()  # stop() was called: the answers in progress then end
        self._done = threading.Event()  # capture ended and the buffer is drained (or a failure)
        self._progress = threading.Condition()
        self._threads: list[threading.Thread] = []
        self.error: BaseException | None = None
        self._started = None
        # figures, written by the worker threads
        self.captured = 0
        self.ingested = 0
        self.reconnects = 0
        self.source_time: float | None = None  # of the newest captured frame
        self.stream_time: float | None = None  # of the newest ingested frame
        self.latency_s: float | None = None  # capture -> in the cache, for the newest ingested frame
        self.latency_max_s = 0.0
        self._ingest_marks: deque = deque()  # (monotonic, frames ingested)
        self._dropped_reported = 0
        self._dropped_at = 0.0

    # -- life --------------------------------------------------------------------------------------

    def start(self) -> LiveSession:
        if self._started is not None:
            raise StreamVLMError("this live session was already started")
        self._started = time.monotonic()
        self._threads = [threading.Thread(target=self._capture, name="streamvlm-capture", daemon=True),
                         threading.Thread(target=self._ingest, name="streamvlm-ingest", daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop capturing and ingesting (frames still buffered are dropped); a question asked before ends at its
        next token, as with `ask(stop=)` (one asked later is answered in full, from the frames in).
        Waits up to timeout for the threads; a capture thread stuck in a network read ends at its read
        timeout."""
        self._stopped.set()
        self._stop.set()
        self._buffer.close()
        for thread in self._threads:
            thread.join(timeout)

    def __enter__(self) -> LiveSession:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def done(self) -> bool:
        """The source has ended (or failed) and every frame it gave was ingested."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until `done`; False on timeout."""
        return self._done.wait(timeout)

    def wait_for_frames(self, count: int, timeout: float | None = None) -> bool:
        """Wait until `count` frames are in the cache (False on timeout, or if the stream ended first)."""
        with self._progress:
            return self._progress.wait_for(lambda: self.ingested >= count or self._done.is_set(), timeout) and \
                self.ingested >= count

    # -- asking ------------------------------------------------------------------------------------

    def ask_stream(self, question: str, **sampling) -> Iterator[str]:
        """The answer's text as it is generated; sees every frame ingested before the lock was taken."""
        with self._lock:
            yield from self.session.ask_stream(question, **sampling)

    def ask(self, question: str, on_piece: Callable[[str], None] | None = None,
            on_start: Callable[[float | None, int], None] | None = None, stop: threading.Event | None = None,
            **sampling) -> LiveAnswer:
        """Answer a question about the stream so far; on_piece gets the answer's text as it is generated,
        on_start the stream time and frame count the answer will see, once the question has the lock. Once
        `stop` is set the answer ends at its next token (stop_reason "cancelled"; the turn is closed in the
        cache as any answer's, so the stream goes on as after a short answer). `stop()` ends it the same way."""
        asked = time.perf_counter()
        first, pieces = None, []
        after_stop = self._stopped.is_set()  # asked once the stream was stopped: answered in full
        with self._lock:
            t, frames = self.stream_time, self.session.stats()["frames"]
            if on_start is not None:
                on_start(t, frames)
            answer = self.session.ask_stream(question, **sampling)
            try:
                for piece in answer:
                    if first is None:  # the first token, even one that decodes to no text yet
                        first = time.perf_counter() - asked
                    pieces.append(piece)
                    if on_piece is not None:
                        on_piece(piece)
                    if (stop is not None and stop.is_set()) or (self._stopped.is_set() and not after_stop):
                        break
            finally:
                answer.close()  # a stopped answer's turn is closed here, under the lock
            turn = self.session.turns[-1]
        return LiveAnswer(question, "".join(pieces), t, frames, first, time.perf_counter() - asked,
                          turn.stop_reason)

    # -- figures -----------------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        return self._buffer.dropped

    def stats(self) -> dict:
        """The live figures and the session's (see Session.stats), taken under the lock."""
        now = time.monotonic()
        with self._lock:
            session = self.session.stats()
        with self._progress:  # the ingest thread appends to the deque under this lock
            marks = list(self._ingest_marks)
        rate = 0.0
        if len(marks) >= 2 and marks[-1][0] > marks[0][0]:
            rate = (marks[-1][1] - marks[0][1]) / (now - marks[0][0])
        return {
            "source": self.source.name, "t": self.stream_time, "source_t": self.source_time,
            "running_s": now - self._started if self._started else 0.0,
            "captured": self.captured, "ingested": self.ingested, "dropped": self.dropped,
            "buffered": len(self._buffer), "reconnects": self.reconnects, "ingest_fps": rate,
            "latency_s": self.latency_s, "latency_max_s": self.latency_max_s, "done": self.done,
            "error": str(self.error) if self.error else None, "session": session,
        }

    # -- workers -----------------------------------------------------------------------------------

    def _emit(self, event: dict) -> None:
        try:
            self._on_event(event)
        except Exception:  # a broken handler must not kill capture
            log.exception("live event handler failed on %s", event.get("type"))

    def _source_event(self, event: SourceEvent) -> None:
        if event.type == "reconnect":
            self.reconnects += 1
        payload = {"type": event.type, "t": event.t, "message": event.message}
        if event.type == "reconnect":
            payload["attempt"] = event.attempt
        self._emit(payload)

    def _report_dropped(self, force: bool = False) -> None:
        total = self._buffer.dropped
        now = time.monotonic()
        if total > self._dropped_reported and (force or now - self._dropped_at >= _DROPPED_EVERY):
            self._emit({"type": "dropped", "t": self.source_time, "count": total - self._dropped_reported,
                        "total": total})
            self._dropped_reported, self._dropped_at = total, now

    def _capture(self) -> None:
        one_core()  # it decodes and resizes frames: no OpenMP team of its own beside the computing thread's
        try:
            for frame in self.source.frames(self._stop, self._source_event):
                # resized here: the buffer holds frames at the model's input size, whatever the camera sends
                frame = replace(frame, frame=self.vlm.resize(frame.frame))
                self.captured += 1
                self.source_time = frame.time
                self._buffer.put(frame, wait=not self.source.paced)
                self._report_dropped()
                if self._stop.is_set():
                    break
        except BaseException as e:  # noqa: BLE001 - reported to the caller through .error and an event
            self._fail(e, "capture")
        finally:
            self._report_dropped(force=True)
            self._buffer.close()

    def _ingest(self) -> None:
        # A family that folds frames in pairs (Qwen-VL) encodes whole pairs only: an odd frame waits in
        # `carry` for the next batch (a question meanwhile sees the frames before it), and the stream's last
        # odd frame is paired with a copy of itself.
        step = self.vlm.adapter.frames_per_step
        carry: list[LiveFrame] = []
        if isinstance(self.vlm.decoder, BatchedDecoder):
            one_core()  # the batcher's step thread encodes and runs its forwards: this thread only feeds it
        try:
            while not self._stop.is_set():
                batch: list[LiveFrame] = self._buffer.take(self.max_batch, timeout=0.2)
                if not batch:
                    if self._buffer.drained:
                        break
                    continue
                *changed, last = _same_size_runs(carry + batch)
                for group in changed:  # the frame size changed after these: an odd one is padded
                    self._append(group, step)
                whole = len(last) - len(last) % step
                self._append(last[:whole], step)
                carry = last[whole:]
            if carry and not self._stop.is_set():
                self._append(carry, step)
        except BaseException as e:  # noqa: BLE001
            self._fail(e, "ingest")
            self._stop.set()
            self._buffer.close()
        finally:
            with self._progress:
                self._done.set()
                self._progress.notify_all()
            self._emit({"type": "done", "t": self.stream_time, "frames": self.ingested,
                        "error": str(self.error) if self.error else None})

    def _append(self, frames: list[LiveFrame], step: int) -> None:
        """Encode frames (outside the lock) and append them, append_frames frames of tokens at a time."""
        if not frames:
            return
        features = self.vlm.encode(torch.stack([f.frame for f in frames]))  # (ceil(n / step), tpf, d)
        for first in range(0, features.shape[0], self.append_frames):
            rows = features[first:first + self.append_frames]
            part = frames[first * step:(first + rows.shape[0]) * step]
            times = [f.time for f in part]
            times += times[-1:] * (rows.shape[0] * step - len(times))  # an odd last frame is paired with itself
            with self._lock:  # held briefly: a question waits for at most one part's append
                self.session.append_encoded(rows, times)
            self._ingested(part)

    def _ingested(self, frames: list[LiveFrame]) -> None:
        now = time.monotonic()
        with self._progress:
            self.ingested += len(frames)
            self.stream_time = frames[-1].time
            self.latency_s = now - frames[-1].captured
            self.latency_max_s = max(self.latency_max_s, now - frames[0].captured)
            self._ingest_marks.append((now, self.ingested))
            while self._ingest_marks and now - self._ingest_marks[0][0] > _RATE_WINDOW:
                self._ingest_marks.popleft()
            self._progress.notify_all()
        self._emit({"type": "ingested", "t": self.stream_time, "frames": self.ingested})

    def _fail(self, error: BaseException, where: str) -> None:
        if self.error is None:
            self.error = error
        if not isinstance(error, StreamVLMError):
            log.error("live %s failed", where, exc_info=error)
        self._emit({"type": "error", "t": self.source_time, "message": str(error) or type(error).__name__,
                    "where": where})


def _same_size_runs(frames: list[LiveFrame]) -> Iterator[list[LiveFrame]]:
    """Consecutive frames of one size (a stream may change resolution when it reconnects)."""
    run: list[LiveFrame] = []
    for frame in frames:
        if run and frame.frame.shape != run[0].frame.shape:
            yield run
            run = []
        run.append(frame)
    if run:
        yield run


# -- the `streamvlm live` console ------------------------------------------------------------------

# Events the console shows; "ingested" only drives --ask-every.
_SHOWN = ("connected", "reconnect", "end", "dropped", "error")
# Wall seconds the console waits for the worker threads when the run ends.
_STOP_WAIT = 1.0
# Seconds past --open-timeout before the console gives up on a source that never connected: an open that
# succeeds just inside its timeout still gets its "connected" event through.
_OPEN_GRACE = 1.0
_ENDED = {"duration": "--duration passed", "end": "the source ended", "error": "the source failed"}


@dataclass(frozen=True)
class ConsolePlan:
    """What `streamvlm live` asks and when it stops."""

    questions: tuple[str, ...] = ()
    """Asked every `ask_every` seconds of stream time, or once at the end of the run without it."""
    ask_every: float | None = None
    duration: float | None = None
    """Wall seconds after which the run ends cleanly (None: until the source ends or Ctrl-C)."""
    status_every: float = 5.0
    """Wall seconds between status lines (0: none)."""
    json: bool = False
    """One JSON object per line on stdout for every event, instead of text."""
    open_timeout: float | None = None
    """Wall seconds (plus a second's grace) within which the source must first connect, or the run ends with
    StreamVLMError (None: the source's own retries decide). For sources that send "connected" (StreamSource)."""

    def __post_init__(self):
        if self.ask_every is not None and not self.ask_every > 0:
            raise StreamVLMError(f"--ask-every must be positive, got {self.ask_every}")
        if self.ask_every is not None and not self.questions:
            raise StreamVLMError("--ask-every needs at least one --ask question")
        if self.duration is not None and not self.duration > 0:
            raise StreamVLMError(f"--duration must be positive, got {self.duration}")
        if self.status_every < 0:
            raise StreamVLMError(f"--status-every must be >= 0, got {self.status_every}")
        if self.open_timeout is not None and not self.open_timeout > 0:
            raise StreamVLMError(f"--open-timeout must be positive, got {self.open_timeout}")


class Console:
    """Runs a LiveSession for `streamvlm live`: questions from the plan and from stdin, events printed.

    The main thread waits on one inbox (events from the workers, lines from stdin) with a timeout set by
    the next status line or the end of --duration, so nothing polls. Answers are generated on the main
    thread, one at a time, in the order questions arrive.
    """

    def __init__(self, make_live: Callable[[EventHandler], LiveSession], plan: ConsolePlan, out, err):
        self.plan, self.out, self.err = plan, out, err
        self.inbox: queue.Queue = queue.Queue()
        self._held_errors: list[dict] = []
        self._last_reconnect: str | None = None
        self.live = make_live(lambda event: self.inbox.put(("event", event)))

    def read_lines(self, stream) -> None:
        """Feed questions typed on `stream` (stdin) to the inbox, from a daemon thread."""
        def pump():
            for line in stream:
                if line.strip():
                    self.inbox.put(("question", line.strip()))

        threading.Thread(target=pump, name="streamvlm-stdin", daemon=True).start()

    def run(self) -> int:
        """Run until the source ends, --duration passes, or Ctrl-C; 0 if the source never failed, 1 if it
        failed after some frames; raises StreamVLMError if no frame was ingested (a failure, the end, or
        --duration before the first frame), without answering the questions."""
        plan, live = self.plan, self.live
        started = time.monotonic()
        end_at = started + plan.duration if plan.duration else None
        next_status = started + plan.status_every if plan.status_every else None
        next_ask = plan.ask_every
        open_by = started + plan.open_timeout + _OPEN_GRACE if plan.open_timeout else None
        reason = "interrupted"
        live.start()
        try:
            while True:
                deadlines = [d for d in (end_at, next_status, open_by) if d is not None]
                timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                try:
                    kind, item = self.inbox.get(timeout=timeout)
                except queue.Empty:
                    kind, item = None, None
                now = time.monotonic()
                if end_at is not None and now >= end_at:
                    reason = "duration"
                    break
                if kind == "event" and item["type"] in ("connected", "ingested"):
                    open_by = None
                if kind == "event" and item["type"] == "reconnect":
                    self._last_reconnect = item.get("message")
                if open_by is not None and now >= open_by:
                    reason = "open_timeout"
                    break
                if next_status is not None and now >= next_status:
                    self._status()
                    next_status += plan.status_every * max(1, int((now - next_status) // plan.status_every) + 1)
                if kind == "question":
                    self._ask(item)
                elif kind == "event":
                    if item["type"] == "done":
                        reason = "error" if live.error else "end"
                        break
                    if item["type"] in _SHOWN:
                        self._show(item)
                    if item["type"] == "ingested" and next_ask is not None:
                        if item["t"] is not None and item["t"] >= next_ask:
                            for question in plan.questions:
                                self._ask(question)
                            next_ask += plan.ask_every * max(1, int((item["t"] - next_ask) // plan.ask_every) + 1)
        except KeyboardInterrupt:
            reason = "interrupted"
        # The threads are daemons: a capture thread still inside an open (up to --open-timeout) is not waited
        # for, so --duration bounds the run.
        live.stop(timeout=_STOP_WAIT)
        self._drain_events()
        saw_frames = live.ingested > 0
        if plan.ask_every is None and saw_frames:  # never answer about a video it never saw
            for question in plan.questions:
                self._ask(question)
        self._status(final=True, reason=reason)
        if not saw_frames and reason != "interrupted":
            # the one line main() prints: the error event was held back for it (shown once, not twice)
            self._held_errors.clear()
            if reason == "open_timeout":
                last = f" (last: {self._last_reconnect})" if self._last_reconnect else ""
                raise StreamVLMError(f"could not open {live.source.name} within --open-timeout "
                                     f"{plan.open_timeout:g} s{last}; check the address and that the stream is "
                                     "running, or give a longer --open-timeout")
            if live.error is None:
                raise StreamVLMError(f"no frame came from {live.source.name} ({_ENDED[reason]}); check the "
                                     "source and --open-timeout" + ("" if reason != "duration" else
                                                                    ", or give a longer --duration"))
            if isinstance(live.error, StreamVLMError):
                raise live.error
            raise StreamVLMError(f"the live source failed: {live.error}") from live.error
        for event in self._held_errors:
            self._print(event, self._text(event))
        return 0 if live.error is None else 1

    def _drain_events(self) -> None:
        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "event" and item["type"] in _SHOWN:
                self._show(item)

    def _print(self, event: dict, text: str, stream=None) -> None:
        if self.plan.json:
            print(json.dumps(event), file=self.out, flush=True)
        else:
            print(text, file=stream or self.err, flush=True)

    def _show(self, event: dict) -> None:
        if event["type"] == "error" and not self.plan.json and self.live.ingested == 0:
            self._held_errors.append(event)  # printed at the end, or raised as the run's one error line
            return
        self._print(event, self._text(event))

    @staticmethod
    def _text(event: dict) -> str:
        detail = event.get("message") or (f"{event['count']} frame(s) dropped, {event['total']} in all; the model "
                                          "is slower than the source" if event["type"] == "dropped" else "")
        return f"[{_clock(event['t'])}] {event['type']}: {detail}"

    def _ask(self, question: str) -> None:
        if self.plan.json:
            answer = self.live.ask(question)
            self._print(answer.as_event(), "")
            return
        t = self.live.stream_time
        print(f"[{_clock(t)}] Q: {question}\n[{_clock(t)}] A: ", end="", file=self.out, flush=True)
        self.live.ask(question, on_piece=lambda piece: print(piece, end="", file=self.out, flush=True))
        print(file=self.out, flush=True)

    def _status(self, final: bool = False, reason: str | None = None) -> None:
        stats = self.live.stats()
        session = stats["session"]
        event = {"type": "status", "t": stats["t"], **{k: v for k, v in stats.items() if k not in ("t", "session")},
                 "frames": session["frames"], "kv_bytes": session["kv_bytes"], "tokens": session["tokens"],
                 "evicted_entries": session["evicted_entries"], "final": final}
        if reason:
            event["reason"] = reason
        lag = f", lag {stats['latency_s']:.2f} s" if stats["latency_s"] is not None else ""
        text = (f"[{_clock(stats['t'])}] {'final' if final else 'status'}: ingest {stats['ingest_fps']:.1f} frames/s, "
                f"{session['frames']} frames, {stats['dropped']} dropped, cache {session['kv_bytes'] / 2**20:.2f} MiB "
                f"({session['tokens']} tokens), {stats['reconnects']} reconnects{lag}"
                + (f"; ended: {reason}" if reason else ""))
        self._print(event, text)


def _clock(t: float | None) -> str:
    if t is None:
        return "--:--"
    minutes, seconds = divmod(t, 60)
    return f"{int(minutes):02d}:{seconds:05.2f}"
