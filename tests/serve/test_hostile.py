"""Hostile input: malformed requests, broken WebSocket messages, unauthenticated uploads, dead streams, slow
clients and floods of questions. Each is refused with a 4xx (or an `error` event), and the server keeps
serving."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch

from streamvlm.video.files import write_video

KEY = "h0stile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    frames = torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    write_video(root / "ok.mp4", frames, fps=8)
    return root


@pytest.fixture(scope="module")
def server(serve, media):
    return serve(api_key=KEY, media_dir=media, max_sessions=1, extra=("--max-body-mb", "2", "--max-data-mb", "1"))


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client:
        yield client


def ws_url(server, stream_id: str) -> str:
    return server.url.replace("http://", "ws://") + f"/v1/streams/{stream_id}/ws"


def user(content) -> dict:
    return {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}


def video(url: str) -> dict:
    return user([{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Q?"}])


BAD_CHATS = [
    {**video("ok.mp4\x00.txt")},
    {**video("ok.mp4"), "seed": 2**70},
    {**video("ok.mp4"), "seed": -1},
    {**video("ok.mp4"), "max_tokens": 2**70},
    {**video("ok.mp4"), "max_tokens": -5},
    {**video("ok.mp4"), "max_completion_tokens": 2**64},
    {**video("ok.mp4"), "top_k": 2**70},
    {**video("ok.mp4"), "top_k": -1},
    {**video("ok.mp4"), "n": 2**70},
    {**video("ok.mp4"), "temperature": "hot"},
    {**video("ok.mp4"), "top_p": [1]},
    {**video("ok.mp4"), "routing": "mod:0.2\x00"},
    {**video("ok.mp4"), "routing": 7},
    {**video("ok.mp4"), "routing": "mod:0.2 " * 50},  # too long for a file name: OSError in Path.exists
    video("x" * 5000 + ".mp4"),
    video("a/" * 3000 + "x.mp4"),
    {**video("ok.mp4"), "stream": "yes please"},
    {**video("ok.mp4"), "video": {"num_frames": 2**70}},
    {**video("ok.mp4"), "video": {"num_frames": -1}},
    {**video("ok.mp4"), "video": {"fps": 1, "frames": 3}},
    {**video("ok.mp4"), "model": "tiny\x00"},
    {**video("ok.mp4"), "messages": "hello"},
    {**video("ok.mp4"), "messages": []},
    user("what\x00now?"),
    user([{"type": "text\x00", "text": "Q?"}]),
    user([{"type": "text", "text": "Q\x00?"}]),
    user([{"type": "video_url", "video_url": {"url": 12}}, {"type": "text", "text": "Q?"}]),
    user([{"type": "video_url", "video_url": "ok.mp4"}, {"type": "text", "text": "Q?"}]),
    user([{"type": "image_url", "image_url": "x.png"}, {"type": "text", "text": "Q?"}]),
    user([{"type": "image_url", "image_url": {"url": 7}}, {"type": "text", "text": "Q?"}]),
    user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},  # a PNG cut short
          {"type": "text", "text": "Q?"}]),
    user([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 1_500_000}},
          {"type": "text", "text": "Q?"}]),  # over --max-data-mb 1
    user([{"type": "text", "text": "<2 s>"}, {"type": "image_url", "image_url": {"url": "x.png"}},
          {"type": "text", "text": "<1 s>"}, {"type": "image_url", "image_url": {"url": "y.png"}},
          {"type": "text", "text": "Q?"}]),
    {**video("ok.mp4"), "mm_processor_kwargs": {"fps": "fast"}},
    {**video("ok.mp4"), "mm_processor_kwargs": {"num_frames": 2**70}},
    {**video("ok.mp4"), "media_io_kwargs": {"video": {"num_frames": -1}}},
    {**video("ok.mp4"), "media_io_kwargs": {"video": "ok"}},
    {**video("ok.mp4"), "media_io_kwargs": "video"},
    user(12),
    {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]},
    {"model": "tiny", "messages": [None]},
    [1, 2, 3],
    "a string",
    None,
]

BAD_STREAMS = [
    {"source": "ok.mp4\x00"},
    {"source": "sample", "routing": "fastv\x00"},
    {"source": "sample", "memory_budget": "64MB\x00"},
    {"source": "sample", "memory_budget": 2**70},
    {"source": "sample", "memory_budget": -3},
    {"source": "sample", "memory_budget": "9" * 400 + "GB"},
    {"source": "sample", "max_tokens": 2**70},
    {"source": "sample", "fps": "fast"},
    {"source": "sample", "speed": -1},
    {"source": "sample", "lop": True},  # misspelt: refused, not silently ignored
    {"source": 5},
    {"source": "x" * 5000 + ".mp4"},
    {"source": "sample", "routing": "fastv:" + "9" * 400},
    {},
    [],
]


@pytest.mark.parametrize("body", BAD_CHATS, ids=range(len(BAD_CHATS)))
def test_malformed_chat_requests_are_4xx(server, http, body):
    response = http.post("/v1/chat/completions", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}


@pytest.mark.parametrize("body", BAD_STREAMS, ids=range(len(BAD_STREAMS)))
def test_malformed_stream_requests_are_4xx(server, http, body):
    response = http.post("/v1/streams", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert "error" in response.json()


def test_nan_and_infinity_are_4xx(server, http):
    # Python's json (and so Starlette's) reads NaN and Infinity, which JSON itself does not have
    for text in ('{"source": "sample", "fps": NaN}', '{"source": "sample", "speed": Infinity}'):
        response = http.post("/v1/streams", content=text, headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, response.text
    body = json.dumps(video("ok.mp4"))[:-1] + ', "temperature": NaN}'
    response = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text


def test_server_lives_after_malformed_requests(server, http):
    assert server.alive()
    assert http.post("/v1/chat/completions", json=video("ok.mp4")).status_code == 200
    assert "Traceback" not in server.log()


def open_stream(http, **extra) -> str:
    response = http.post("/v1/streams", json={"source": "sample", "loop": True, **extra})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def next_of(ws, *types: str, timeout: float = 30) -> dict:
    """The next message of one of `types`, skipping the stream's status, frame and event messages."""
    while True:
        message = json.loads(ws.recv(timeout=timeout))
        if message["type"] in types:
            return message


def test_a_non_ascii_key_is_refused_with_401(server):
    with raw(server) as conn:  # compare_digest raises TypeError on non-ASCII str: that was a 500
        conn.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xe9t\xe9\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 401")


def test_non_json_websocket_messages_get_an_error_and_the_connection_stays(server, http):
    from websockets.sync.client import connect

    stream_id = open_stream(http)
    try:
        with connect(ws_url(server, stream_id), additional_headers=AUTH, open_timeout=10) as ws:
            assert next_of(ws, "hello")["type"] == "hello"
            for bad in ("not json", "{", "[1, 2]", '"ask"', b"\x00\xff binary", '{"type": "ask"}',
                        '{"type": "ask", "question": "a\\u0000b"}'):
                ws.send(bad)
                error = next_of(ws, "error", "closed")
                assert error["type"] == "error" and "bad message" in error["message"], error
            ws.send(json.dumps({"type": "stats"}))
            assert next_of(ws, "status", "closed")["type"] == "status"  # still open and answering
    finally:
        assert http.delete(f"/v1/streams/{stream_id}").status_code == 200
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("key_header", [b"", b"Authorization: Bearer wrong\r\n", b"Authorization: Bearer \xe9\xff\r\n"])
def test_an_upload_without_the_key_is_refused_before_its_body_is_read(server, key_header):
    # 1.9 MB announced (under --max-body-mb 2), 1 KB sent: the 401 must come without waiting for the rest
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + key_header + b"Content-Length: 1900000\r\n\r\n" + b"x" * 1024)
        reply = b""
        while chunk := conn.recv(65536):  # a timeout here (socket.timeout) means the server waited for the body
            reply += chunk  # until the server closes the connection: the unread body is not drained
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert b"invalid_api_key" in reply


class _Fake:
    """Enough of a LiveStream for the registry: an id and whether its live session is done."""

    def __init__(self, stream_id: str):
        self.id, self.live = stream_id, type("Live", (), {"done": False})()


def test_registry_frees_the_slot_of_an_ended_stream_and_keeps_its_figures_for_a_while():
    from streamvlm.serve.errors import APIError
    from streamvlm.serve.streams import StreamRegistry

    registry = StreamRegistry(max_sessions=1, ended_grace_s=3600)
    first = _Fake(registry.reserve())
    registry.put(first)
    with pytest.raises(APIError) as info:
        registry.reserve()
    assert info.value.status == 429
    first.live.done = True  # ended (or failed)
    second = _Fake(registry.reserve())
    registry.put(second)
    assert registry.get(first.id) is first and registry.expired() == []  # still readable
    second.live.done = True
    assert registry.expired() == [first]  # only max_sessions ended streams are kept
    assert registry.get(second.id) is second
    prompt = StreamRegistry(max_sessions=1, ended_grace_s=0)
    gone = _Fake(prompt.reserve())
    prompt.put(gone)
    gone.live.done = True
    assert prompt.expired() == [gone] and len(prompt) == 0


def test_a_stream_that_ended_frees_its_slot(server, http):
    first = http.post("/v1/streams", json={"source": "ok.mp4", "speed": 0, "fps": 8})
    assert first.status_code == 201, first.text
    first_id = first.json()["id"]
    ids = [first_id]
    try:
        deadline = time.monotonic() + 120  # a bound on the wait, not a timing assertion
        while not http.get(f"/v1/streams/{first_id}").json()["stats"]["done"]:
            assert time.monotonic() < deadline, "the 1-second file never ended"
            time.sleep(0.2)
        second = http.post("/v1/streams", json={"source": "sample", "loop": True})  # --max-sessions 1
        assert second.status_code == 201, second.text
        ids.append(second.json()["id"])
        figures = http.get(f"/v1/streams/{first_id}")
        assert figures.status_code == 200 and figures.json()["stats"]["ingested"] > 0
        assert http.post("/v1/streams", json={"source": "sample"}).status_code == 429  # the running one counts
    finally:
        for stream_id in ids:
            assert http.delete(f"/v1/streams/{stream_id}").status_code == 200


@pytest.fixture(scope="module")
def impatient(serve, media):
    """A server with short timeouts and few connections, so that slow clients meet them quickly."""
    return serve(api_key=KEY, media_dir=media, max_sessions=1, extra=("--header-timeout-s", "1", "--body-timeout-s", "1"))


@pytest.fixture(scope="module")
def crowded(serve, media):
    """A server that takes few connections (its header timeout, 10 s, outlasts the test's idle ones)."""
    return serve(api_key=KEY, media_dir=media, max_sessions=1, extra=("--max-connections", "6"))


def raw(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=60)


def read_all(conn: socket.socket) -> bytes:
    """Everything until the server closes the connection (socket.timeout if it never does)."""
    reply = b""
    while chunk := conn.recv(65536):
        reply += chunk
    return reply


def test_slow_headers_are_cut_off(impatient):
    with raw(impatient) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHo")  # and never the rest
        assert read_all(conn) == b""  # closed, without a response
    with raw(impatient) as conn:  # a connection that says nothing at all
        assert read_all(conn) == b""


def test_a_stalled_body_gets_408(impatient):
    with raw(impatient) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
        reply = read_all(conn)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
    assert b"--body-timeout-s" in reply


def test_connections_are_bounded(crowded):
    idle = [raw(crowded) for _ in range(6)]
    try:
        with raw(crowded) as conn:  # the 7th: refused as soon as it connects, before it sends anything
            assert read_all(conn).startswith(b"HTTP/1.1 503")
    finally:
        for conn in idle:
            conn.close()

    deadline = time.monotonic() + 60  # the server notices the closed sockets soon; bounded wait, no timing assert
    while True:
        try:
            if httpx.get(crowded.url + "/health", timeout=30).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert crowded.alive() and "Traceback" not in crowded.log()


def _until(condition, what):
    deadline = time.monotonic() + 60  # a bound on the wait, not a timing assertion
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class _BlockingAsk:
    """A stream's `live.ask` that blocks until released, recording each question and its stop event: exactly
    what waits where is then seen, with no timing involved."""

    def __init__(self):
        self.release, self.started, self.stops = threading.Event(), [], []

    def __call__(self, question, on_piece=None, on_start=None, stop=None, **sampling):
        from streamvlm.live import LiveAnswer

        self.started.append(question)
        self.stops.append(stop)
        self.release.wait(60)
        return LiveAnswer(question, "ok", None, 0, 0.0, 0.0, "cancelled" if stop.is_set() else "stop_token")


def test_asks_are_bounded_wait_without_a_thread_and_end_with_their_connection(tiny_dir):
    """In this process, with the stream's answering replaced by one that blocks until released."""
    from fastapi.testclient import TestClient

    from streamvlm.runtime import StreamVLM
    from streamvlm.serve import Engine, ServeConfig, create_app

    blocking_ask = _BlockingAsk()
    release, started, stops, until = blocking_ask.release, blocking_ask.started, blocking_ask.stops, _until
    engine = Engine(StreamVLM.from_pretrained(tiny_dir, device="cpu"), "tiny")
    app = create_app(engine, ServeConfig(max_sessions=1, max_asks_per_connection=3, max_asks_per_stream=5))
    with TestClient(app) as client:
        stream_id = client.post("/v1/streams", json={"source": "sample", "loop": True}).json()["id"]
        stream = app.state.registry.get(stream_id)
        stream.live.ask = blocking_ask
        url = f"/v1/streams/{stream_id}/ws"

        def ask(ws, qid):
            ws.send_text(json.dumps({"type": "ask", "question": qid, "id": qid}))

        def refusals(ws, count):
            errors = []
            while len(errors) < count:
                message = ws.receive_json()
                if message["type"] == "error":
                    errors.append(message)
            return errors

        try:
            with client.websocket_connect(url) as first:
                for i in range(5):
                    ask(first, f"a{i}")
                errors = refusals(first, 2)  # 3 per connection: a3 and a4 refused
                assert [e["id"] for e in errors] == ["a3", "a4"]
                assert all(e["code"] == "too_many_questions" and "this connection" in e["message"] for e in errors)
                until(lambda: started == ["a0"], "the first question never started")
                with client.websocket_connect(url) as second:
                    for i in range(3):
                        ask(second, f"b{i}")
                    errors = refusals(second, 1)  # 5 per stream: b0, b1 wait, b2 refused
                    assert errors[0]["id"] == "b2" and "this stream" in errors[0]["message"]
                    assert stream.asks == 5
                    # one thread answers, four questions wait on the event loop: the API still answers
                    assert client.get("/v1/streams").status_code == 200
                    assert started == ["a0"]
                until(lambda: stream.asks == 3, "the second connection's waiting questions were not cancelled")
            until(lambda: stream.asks == 1, "the first connection's waiting questions were not cancelled")
            assert started == ["a0"]  # the cancelled ones never ran
            until(lambda: stops[0].is_set(), "the answering question was not told its asker left")
            release.set()
            until(lambda: stream.asks == 0, "the answering question never ended")
            with client.websocket_connect(url) as third:  # and the stream answers again
                ask(third, "c0")
                while (message := third.receive_json())["type"] != "answer.done":
                    assert message["type"] != "error", message
                assert message["id"] == "c0"
        finally:
            release.set()
            client.delete(f"/v1/streams/{stream_id}")


def test_deleting_a_stream_stops_its_answer_and_its_waiting_questions_whatever_its_clients_read(tiny_dir):
    """A stream deleted while it answers: the answer is told to stop by the deletion itself, not by its asker's
    connection closing. Here the asker has stopped reading (its messages pile up, unread, past the bounded
    queue), so its connection would never close: the question waiting behind the answer must never start,
    and the client is still sent `closed`, which no full queue drops."""
    import asyncio

    from fastapi.testclient import TestClient

    from streamvlm.runtime import StreamVLM
    from streamvlm.serve import Engine, ServeConfig, create_app
    from streamvlm.serve.streams import _WATCHER_QUEUE

    blocking_ask = _BlockingAsk()
    release, started, stops, until = blocking_ask.release, blocking_ask.started, blocking_ask.stops, _until
    engine = Engine(StreamVLM.from_pretrained(tiny_dir, device="cpu"), "tiny")
    app = create_app(engine, ServeConfig(max_sessions=1))
    with TestClient(app) as client:
        stream_id = client.post("/v1/streams", json={"source": "sample", "loop": True}).json()["id"]
        stream = app.state.registry.get(stream_id)
        stream.live.ask = blocking_ask
        try:
            with client.websocket_connect(f"/v1/streams/{stream_id}/ws") as ws:
                for qid in ("a0", "a1"):
                    ws.send_text(json.dumps({"type": "ask", "question": qid, "id": qid}))
                until(lambda: started == ["a0"] and stream.asks == 2, "the questions were not taken")
                # From here the client reads nothing: its writer waits on a queue that no longer gets messages,
                # and the messages pile up in one nobody reads, already at the bound.
                (watcher,) = stream.watchers
                unread = asyncio.Queue()
                for _ in range(_WATCHER_QUEUE):
                    unread.put_nowait({"type": "status"})
                watcher.queue = unread
                assert client.delete(f"/v1/streams/{stream_id}").status_code == 200
                until(lambda: stops[0].is_set(), "the answer was not told to stop when its stream was deleted")
                release.set()
                until(lambda: stream.asks == 0, "the questions did not end")
                assert started == ["a0"]  # the waiting one never started
                sent = [unread.get_nowait() for _ in range(unread.qsize())][_WATCHER_QUEUE:]
                assert [m["type"] for m in sent] == ["closed", "answer.done", "error"]
                assert sent[1]["id"] == "a0" and sent[1]["stop_reason"] == "cancelled"
                assert sent[2]["id"] == "a1" and sent[2]["code"] == "stream_closed"
        finally:
            release.set()


def test_the_largest_accepted_values_are_served(server, http):
    # the bounds sit where the runtime still works: the largest value each allows is a 200, not a 500
    body = {**video("ok.mp4"), "max_tokens": 2**31 - 1, "seed": 2**63 - 1, "top_k": 2**31 - 1, "temperature": 2,
            "top_p": 1}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


def test_oversized_videos_cost_bounded_memory_and_still_get_their_answer_or_400(tmp_path):
    # A 4000x3000 source (a few-KB data: URI and a file) and a 1080p one, asked for more frames than the
    # context holds (400 before decoding) and for the most it holds (200, decoded frame by frame at the
    # model's size). The server's peak RSS over idle stays under 300 MB; /health answers throughout.
    import os

    from streamvlm.bench.abuse import run_abuse
    from streamvlm.serve.process import ServerProcess
    from streamvlm.world.builtin import default_model_dir

    env = {**os.environ, "STREAMVLM_CACHE": str(tmp_path / "cache")}
    env.pop("STREAMVLM_API_KEY", None)
    media = tmp_path / "media"
    media.mkdir()
    server = ServerProcess(["--model", str(default_model_dir()), "--model-name", "bench"], env,
                           tmp_path / "server.log", media_dir=media)
    try:
        row = run_abuse(server, "bench", media, rounds=1)
        assert server.alive()
    finally:
        server.stop()
    assert [(r["status"], r["code"]) for r in row["requests"]] == [
        (400, "too_many_frames"), (400, "too_many_frames"), (200, None), (400, "too_many_frames"), (200, None)]
    assert row["data_uri_bytes"] < 2**20  # a small request
    assert row["rss_peak_bytes"] - row["rss_idle_bytes"] < 300 * 2**20, row
    assert row["health_polls"] > 0
    assert "Traceback" not in server.log()
