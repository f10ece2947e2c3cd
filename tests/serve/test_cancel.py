"""A request whose client leaves stops at its session's next forward (streamvlm.cancel), streamed or not."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

import streamvlm.serve.app as app_module
from streamvlm import StreamVLM
from streamvlm.cancel import Cancelled, cancel_on, cancelled
from streamvlm.serve import Engine, MediaPolicy, ServeConfig, create_app
from streamvlm.session import Session
from support import encode, indexed_frames, random_frames


def test_a_session_stops_before_its_next_forward_once_its_event_is_set(tiny_dir):
    vlm = StreamVLM.from_pretrained(tiny_dir, device="cpu")
    outer, inner = threading.Event(), threading.Event()
    session = vlm.session()
    with cancel_on(outer):
        session.append_frames(random_frames(2), [0.0, 0.5])
        with cancel_on(inner):
            inner.set()
            assert cancelled()
            tokens = session.stats()["tokens"]
            with pytest.raises(Cancelled):
                session.ask("Still there?")
            assert session.stats()["tokens"] == tokens  # nothing more was fed
        assert not cancelled()  # the outer block's event is not set
    other = vlm.session()
    other.append_frames(random_frames(2), [0.0, 0.5])  # outside any block nothing is stopped
    assert other.ask("Still there?", max_new_tokens=2)


def _request(loop, app, body: dict, leave: asyncio.Event) -> list[dict]:
    """POST body to /v1/chat/completions through the ASGI app, on `loop`; the client disconnects once `leave`
    is set. Returns what the app sent."""
    data = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(data)).encode())]}
    read = False
    sent: list[dict] = []

    async def receive():
        nonlocal read
        if not read:
            read = True
            return {"type": "http.request", "body": data, "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def run():
        await asyncio.wait_for(app(scope, receive, send), 120)

    loop.run_until_complete(run())
    return sent


@pytest.mark.parametrize("max_batch", [1, 4])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("leave_after", [1, 6])  # forwards: the video's ingest; a few answer tokens
def test_a_request_whose_client_leaves_stops_at_its_next_forward(tiny_dir, tmp_path, monkeypatch, stream, max_batch,
                                                                  leave_after):
    # Before, nothing noticed a client leave until a reply's first byte: the server ingested and prefilled for
    # no one, and unstreamed generated all of max_tokens too.
    encode(tmp_path / "clip.mkv", indexed_frames(8))
    engine = Engine(StreamVLM.from_pretrained(tiny_dir, device="cpu"), "tiny", max_batch=max_batch)
    app = create_app(engine, ServeConfig(media=MediaPolicy(tmp_path)))
    loop = asyncio.new_event_loop()
    leave = asyncio.Event()
    forwards = []
    done = threading.Event()
    real_run, real_chat = Session._run, app_module.run_chat

    def run(self, pieces, logits):
        out = real_run(self, pieces, logits)
        forwards.append(len(pieces))
        if len(forwards) == leave_after:  # the client leaves
            loop.call_soon_threadsafe(leave.set)
            deadline = time.monotonic() + 60  # a bound on the wait for the server to notice, not a timing check
            while not cancelled() and time.monotonic() < deadline:
                time.sleep(0.01)
        return out

    def watched(*args):
        try:
            yield from real_chat(*args)
        finally:
            done.set()

    monkeypatch.setattr(Session, "_run", run)
    monkeypatch.setattr(app_module, "run_chat", watched)
    body = {"model": "tiny", "max_tokens": 1000, "ignore_eos": True, "stream": stream, "video": {"num_frames": 2},
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mkv"}},
                                                      {"type": "text", "text": "What is it?"}]}]}
    try:
        sent = _request(loop, app, body, leave)
        assert done.wait(60)
    finally:
        engine.close()
        loop.close()
    assert len(forwards) == leave_after  # not one forward after the server noticed (of 1000 tokens asked for)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == (200 if stream and leave_after > 2 else 499)  # a stream's reply begins at token 1


def test_work_whose_client_left_while_it_waited_for_a_worker_never_starts(tiny_dir):
    engine = Engine(StreamVLM.from_pretrained(tiny_dir, device="cpu"), "tiny")
    started = []

    def make():
        started.append(1)
        yield "never"

    cancel = threading.Event()
    cancel.set()  # the client left before a worker took the request

    async def consume():
        return [item async for item in engine.stream_in_thread(make, cancel)]

    try:
        with pytest.raises(Cancelled):
            asyncio.run(consume())
    finally:
        engine.close()
    assert started == []
