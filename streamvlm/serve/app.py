"""The HTTP server: an OpenAI-compatible chat API over videos, live streams with WebSocket questions, and a
web page. Built by `create_app(engine, config)`; `streamvlm serve` runs it under uvicorn.

    GET  /health                        liveness, no key needed
    GET  /v1/models                     the one model served
    POST /v1/chat/completions           OpenAI chat completions; stream=true gives server-sent events
    GET  /v1/sources                    what the page offers to open (sample, files in the media folder)
    POST /v1/streams                    open a live source and start ingesting it
    GET  /v1/streams, /v1/streams/{id}  streams and their figures
    GET  /v1/streams/{id}/frame.jpg     the newest frame, small
    DELETE /v1/streams/{id}             close it
    WS   /v1/streams/{id}/ws            ask questions, receive answers as they are generated and status events
    GET  /                              the web page (static; it calls the API with the key typed into it)

With an API key every endpoint under /v1 needs `Authorization: Bearer KEY` (a WebSocket may instead offer
the subprotocol `bearer.KEY`, since browsers cannot set its headers). The page, its assets and the API
description (/docs, /openapi.json) hold no data and run no model, so they are served without one.
Every refusal is OpenAI's error JSON with a 4xx status; an unexpected failure is a 500 with a short
message (the traceback goes to the server's log, never to the client).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from streamvlm.cancel import Cancelled
from streamvlm.cores import one_core
from streamvlm.errors import StreamVLMError
from streamvlm.memory import MemoryBudget
from streamvlm.serve.completions import (
    ChatRequest,
    ChatResult,
    Text,
    chunk_body,
    completion_body,
    completion_id,
    parse_request,
    run_chat,
    usage,
)
from streamvlm.serve.engine import Engine
from streamvlm.serve.errors import APIError, error_body
from streamvlm.serve.media import MediaPolicy
from streamvlm.serve.names import ClientNames
from streamvlm.serve.streams import LiveStream, StreamRegistry, StreamSpec, Watcher

log = logging.getLogger(__name__)

_STATIC = resources.files("streamvlm.serve") / "static"


@dataclass(frozen=True)
class ServeConfig:
    api_key: str | None = None
    """When set, every /v1 endpoint needs `Authorization: Bearer <api_key>`."""
    media: MediaPolicy = field(default_factory=lambda: MediaPolicy(None))
    max_sessions: int = 4
    """Live streams open at once."""
    max_body_bytes: int = 48 * 2**20
    """Largest request body; a data: URI video must fit in it."""
    ended_grace_s: float = 300.0
    """How long a stream that ended or failed stays readable (it no longer takes a --max-sessions slot)."""
    header_timeout_s: float = 10.0
    """Seconds a connection may take to send a request's headers (from connecting, or after the previous
    response); then it is closed."""
    body_timeout_s: float = 30.0
    """Seconds a request body may go without a byte arriving; then 408 and the connection is closed."""
    keep_alive_s: float = 5.0
    """Seconds an idle keep-alive connection is kept open between requests."""
    max_connections: int = 256
    """Connections open at once (HTTP and WebSocket); more are answered 503 and closed."""
    max_asks_per_connection: int = 4
    """Questions one WebSocket may have answering or waiting; more get an `error` event."""
    max_asks_per_stream: int = 16
    """Questions a stream may have answering (one) or waiting, over all its WebSockets."""


class StreamRequest(BaseModel):
    # a misspelt field would silently open a stream with defaults the client did not ask for
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    source: Text = Field(description="`sample`, rtsp://, udp://, http(s)://... URL, /dev/videoN, or a file in the "
                                    "media folder (played as live)")
    fps: float = Field(1.0, gt=0, le=30, description="frames per second of stream time fed to the model")
    routing: Text | None = Field(None, description="a --routing spec (default: the server's)")
    memory_budget: Text | Annotated[int, Field(ge=1, le=2**62)] | None = Field("auto", description="bound on the KV cache: entries per layer, bytes "
                                                                "('64MB'), 'auto' (half the context) or null")
    speed: float = Field(1.0, ge=0, le=100, description="files only: playback speed (0: as fast as ingest runs)")
    loop: bool = Field(False, description="files only: start again at the end")
    max_tokens: int = Field(64, ge=1, le=4096, description="default longest answer for questions to this stream")


class AskMessage(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)
    type: Literal["ask"]
    question: Text
    id: Text | None = Field(None, max_length=200)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    registry = StreamRegistry(config.max_sessions, config.ended_grace_s)
    # The reader's and the sources' messages name files by their real paths: clients get the names they know.
    names = ClientNames(config.media.allowed_dir, engine.vlm.adapter.model_dir)

    async def close(stream: LiveStream) -> None:
        stream.shut()
        await asyncio.to_thread(stream.close)

    async def sweep() -> None:
        """Close the ended streams whose grace period is over."""
        for stream in registry.expired():
            await close(stream)

    @asynccontextmanager
    async def lifespan(app):
        # asyncio.to_thread's threads (a stream's status, preview, setup) never compute: one core each, so
        # that they keep no OpenMP team beside the one of the thread that runs the model (streamvlm.cores)
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="streamvlm-aside", initializer=one_core))
        yield
        for stream in registry.all():
            await close(stream)
        engine.close()

    app = FastAPI(title="streamvlm", version="0.1.0", lifespan=lifespan,
                  description="Video questions, OpenAI-style, and live streams whose cache persists between "
                              "questions.")
    app.state.registry = registry
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(_BodyTimeout, timeout=config.body_timeout_s)
    if config.api_key is not None:  # outermost: a request without the key is refused before its body is read
        app.add_middleware(_KeyCheck, key=config.api_key)

    # -- errors ------------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(names.figures(exc.body()), status_code=exc.status)

    @app.exception_handler(StreamVLMError)
    async def _user_error(request, exc: StreamVLMError):
        return JSONResponse(error_body(400, names.text(str(exc))), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            message = f"{where or 'body'}: {first.get('msg', 'invalid')}"
        return JSONResponse(error_body(400, message, param=where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(500, f"internal error ({type(exc).__name__}); see the server log"),
                            status_code=500)

    # -- basics ------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        batcher = engine.batcher  # steps run and chunks in them: chunks / steps is the mean batch
        return {"status": "ok", "model": engine.model_id, "streams": len(registry),
                "prefix_cache": engine.prefix.stats() if engine.prefix is not None else None,
                "batching": {"max_batch": batcher.max_batch, "steps": batcher.steps, "chunks": batcher.batched}
                if batcher is not None else None}

    # the most input frames (video frames or images) one request may send, before its text takes its share
    context_frames = engine.vlm.frame_capacity()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": 0,
                                            "owned_by": "streamvlm", "routing": engine.default_routing,
                                            "context_frames": context_frames}]}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(_STATIC / "index.html"), media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in _ASSETS:
            raise APIError(404, f"no asset {name!r}")
        return FileResponse(str(_STATIC / name), media_type=_ASSETS[name])

    # -- chat completions --------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        job = parse_request(req, engine.model_id)
        if job.routing is not None:
            _check_routing(engine, job.routing)
        cid, created = completion_id(), int(time.time())
        # Until a reply's first byte nothing else notices a client that leaves: without this a request whose
        # client hung up ingested, prefilled and, unstreamed, generated all of its max_tokens for no one. Once
        # `cancel` is set its worker's session raises before its next forward (`streamvlm.cancel`).
        cancel = threading.Event()
        events = engine.stream_in_thread(lambda: run_chat(engine, config.media, job), cancel)
        gone = asyncio.ensure_future(_client_gone(request))
        gone.add_done_callback(lambda watch: watch.cancelled() or cancel.set())
        try:
            # The first item comes after the video is read and the prompt is fed: failures up to there are
            # ordinary error responses, before any byte of a stream is sent.
            first = await anext(events)
            if not req.stream:
                try:
                    result = first
                    while not isinstance(result, ChatResult):
                        result = await anext(events)
                    await _drain(events)
                finally:
                    await events.aclose()
                return completion_body(cid, created, engine.model_id, result)
        except (Cancelled, StopAsyncIteration):  # stopped at a forward, or at an item, after the client left
            if not cancel.is_set():
                raise
            return Response(status_code=499)  # nginx's "client closed request"; no one receives it
        finally:
            gone.cancel()  # a streamed reply's disconnect is the StreamingResponse's to notice
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def sse():
            try:
                yield _sse(chunk_body(cid, created, engine.model_id, {"role": "assistant", "content": ""}))
                item = first
                while True:
                    if isinstance(item, ChatResult):
                        yield _sse(chunk_body(cid, created, engine.model_id, {}, item.finish_reason,
                                              streamvlm=item.extension))
                        if include_usage:
                            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                        "model": engine.model_id, "choices": [], "usage": usage(item)})
                        await _drain(events)
                        break
                    if item:
                        yield _sse(chunk_body(cid, created, engine.model_id, {"content": item}))
                    item = await anext(events)
            except Exception as e:  # the status line is sent already: report in the stream, as OpenAI does
                log.error("streamed completion failed", exc_info=e)
                message = e.message if isinstance(e, APIError) else str(e) or type(e).__name__
                yield _sse(error_body(getattr(e, "status", 500), names.text(message)))
            finally:
                await events.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- live streams ------------------------------------------------------------------------------

    @app.get("/v1/sources")
    async def sources():
        items = [{"id": "sample", "label": "sample video (built in, played as live)"}]
        items += [{"id": name, "label": name} for name in config.media.listing()]
        return {"object": "list", "data": items}

    @app.post("/v1/streams", status_code=201)
    async def open_stream(req: StreamRequest):
        resolved = config.media.live_source(req.source)
        budget = req.memory_budget
        try:
            MemoryBudget.parse(budget)
        except (StreamVLMError, ValueError, OverflowError) as e:  # "1e999GB" overflows
            raise APIError(400, f"memory_budget: {e}", param="memory_budget") from None
        routing = req.routing
        if routing is not None:
            _check_routing(engine, routing)
        await sweep()
        spec = StreamSpec(source=req.source, resolved=resolved, fps=req.fps, routing=routing or engine.default_routing,
                          memory_budget=budget, speed=req.speed, loop=req.loop, max_new_tokens=req.max_tokens)
        stream_id = registry.reserve()
        try:
            loop = asyncio.get_running_loop()
            # opening probes files and makes a router: not on the event loop
            stream = await asyncio.to_thread(LiveStream, stream_id, spec, engine.fresh(routing), loop, names)
            stream.start()
        except BaseException:
            registry.release(stream_id)
            raise
        registry.put(stream)
        return await asyncio.to_thread(stream.describe)

    # LiveSession.stats waits for the session's lock, which an answer holds throughout: never on the loop.
    @app.get("/v1/streams")
    async def list_streams():
        await sweep()
        return {"object": "list", "data": [await asyncio.to_thread(s.describe) for s in registry.all()]}

    @app.get("/v1/streams/{stream_id}")
    async def get_stream(stream_id: str):
        return await asyncio.to_thread(registry.get(stream_id).describe)

    @app.get("/v1/streams/{stream_id}/frame.jpg")
    async def frame(stream_id: str):
        shot = await asyncio.to_thread(registry.get(stream_id).preview)
        if shot is None:
            raise APIError(404, "no frame captured yet", code="no_frame")
        return Response(shot[1], media_type="image/jpeg", headers={"X-Stream-Time": f"{shot[0]:.3f}"})

    @app.delete("/v1/streams/{stream_id}")
    async def close_stream(stream_id: str):
        stream = registry.get(stream_id)
        registry.release(stream_id)
        await close(stream)
        return {"id": stream_id, "object": "stream.deleted", "deleted": True}

    @app.websocket("/v1/streams/{stream_id}/ws")
    async def stream_ws(websocket: WebSocket, stream_id: str):
        offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        if config.api_key is not None and not (
                _key_ok(websocket.headers.get("authorization"), config.api_key)
                or any(_same(p, "bearer." + config.api_key) for p in offered)):
            await websocket.close(code=1008, reason="missing or wrong API key")  # before accept: HTTP 403
            return
        await websocket.accept(subprotocol="streamvlm" if "streamvlm" in offered else None)
        try:
            stream = registry.get(stream_id)
        except APIError as e:
            await websocket.send_json({"type": "error", "message": e.message, "code": e.code})
            await websocket.close(code=4404, reason="unknown stream")
            return
        watcher = Watcher(asyncio.get_running_loop())
        stream.watchers.add(watcher)
        try:
            await websocket.send_json({"type": "hello", "stream": await asyncio.to_thread(stream.describe)})
            await _serve_watcher(websocket, stream, watcher, config)
        except WebSocketDisconnect:
            pass
        finally:
            stream.watchers.discard(watcher)

    return app


async def _serve_watcher(websocket: WebSocket, stream: LiveStream, watcher: Watcher, config: ServeConfig) -> None:
    """Read questions and write messages until the client leaves or the stream is closed; then its questions
    still waiting are cancelled."""
    answers: set[asyncio.Task] = set()

    async def writer():
        while True:
            message = await watcher.queue.get()
            await websocket.send_json(message)
            if message["type"] == "closed":
                await websocket.close(code=1000, reason="stream closed")
                return

    def finished(task: asyncio.Task) -> None:
        # a done callback, not a finally in _answer: a task cancelled before its first step never runs its body
        answers.discard(task)
        stream.asks -= 1

    async def reader():
        while True:
            received = await websocket.receive()
            if received["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(received.get("code", 1000))
            message = None  # what the except branch reports, whatever failed first
            try:
                raw = received.get("text")
                if raw is None:
                    raise ValueError("a message is JSON text, not binary")
                message = json.loads(raw)
                if not isinstance(message, dict):
                    raise ValueError("a message is a JSON object")
                if message.get("type") == "stats":
                    watcher.send(await asyncio.to_thread(stream.status))
                    continue
                ask = AskMessage.model_validate(message)
            except (ValueError, json.JSONDecodeError) as e:  # pydantic's ValidationError is a ValueError
                watcher.send({"type": "error", "id": message.get("id") if isinstance(message, dict) else None,
                              "message": f"bad message: {_short(e)}; send "
                                         '{"type": "ask", "question": "..."} or {"type": "stats"}'})
                continue
            busy = ("this connection", config.max_asks_per_connection) if len(answers) >= \
                config.max_asks_per_connection else ("this stream", config.max_asks_per_stream) if \
                stream.asks >= config.max_asks_per_stream else None
            if busy is not None:
                watcher.send({"type": "error", "id": ask.id, "code": "too_many_questions",
                              "message": f"{busy[0]} already has {busy[1]} question(s) answering or waiting; "
                                         "ask again when one is answered"})
                continue
            stream.asks += 1
            task = asyncio.create_task(_answer(stream, watcher, ask))
            answers.add(task)
            task.add_done_callback(finished)

    tasks = [asyncio.create_task(writer()), asyncio.create_task(reader())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.exception() is not None and not isinstance(task.exception(), WebSocketDisconnect):
                raise task.exception()
    finally:
        for task in (*tasks, *answers):
            task.cancel()


async def _answer(stream: LiveStream, watcher: Watcher, ask: AskMessage) -> None:
    """Answer on a thread (it waits for the stream's lock); pieces go to the asker's queue as they come,
    never dropped (an answer is at most max_tokens pieces)."""
    qid = ask.id or stream.next_question_id()
    loop = watcher.loop
    stop = threading.Event()  # set when the asker leaves: the answer ends at its next token

    def put(message: dict) -> None:
        loop.call_soon_threadsafe(watcher.send, message)

    def work():
        sampling = {k: v for k, v in (("max_new_tokens", ask.max_tokens), ("temperature", ask.temperature))
                    if v is not None}

        def on_piece(piece: str) -> None:
            if piece:
                put({"type": "answer.delta", "id": qid, "text": piece})

        def on_start(t: float | None, frames: int) -> None:
            put({"type": "answer.start", "id": qid, "question": ask.question, "t": t, "frames": frames})

        return stream.live.ask(ask.question, on_piece=on_piece, on_start=on_start, stop=stop, **sampling)

    try:
        async with stream.answering:  # waiting costs no thread
            if stream.closed:  # deleted while this question waited
                watcher.send({"type": "error", "id": qid, "code": "stream_closed",
                              "message": "the stream was closed before this question was answered"})
                return
            running = asyncio.ensure_future(asyncio.to_thread(work))
            stream.stops.add(stop)  # deleting the stream sets it too
            try:
                answer = await asyncio.shield(running)
            except asyncio.CancelledError:  # the asker left: the answer stops at its next token, its turn closed
                stop.set()
                await asyncio.wait([running])
                if not running.cancelled():
                    running.exception()  # seen: no "exception was never retrieved" in the log
                raise
            finally:
                stream.stops.discard(stop)
        watcher.send({**answer.as_event(), "type": "answer.done", "id": qid})
    except StreamVLMError as e:
        watcher.send({"type": "error", "id": qid, "message": stream.names.text(str(e))})
    except Exception as e:
        log.error("live answer failed", exc_info=e)
        watcher.send({"type": "error", "id": qid, "message": f"internal error ({type(e).__name__})"})


async def _client_gone(request: Request) -> None:
    """Returns once the client has closed its connection (the request's body is read: what the server receives
    next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _drain(events) -> None:
    """Read a worker's events to their end (after its result: its worker is then idle again), so a client's next
    request, sent as soon as this reply is read, goes to the same worker (`LastIdleFirst`)."""
    async for _ in events:
        pass


def _check_routing(engine: Engine, routing: str) -> None:
    """A client may pick a routing spec, never a router folder: that would read files of its choosing."""
    from streamvlm.routers import resolve_routing

    if "/" in routing or "\\" in routing or _exists(routing):
        raise APIError(400, "routing: give a spec such as mod:0.2 or fastv; router folders are chosen when the "
                            "server starts (--routing DIR)", param="routing")
    parts = engine.vlm.adapter.decoder
    try:
        resolve_routing(routing, parts.num_layers, parts.hidden_size)
    except (StreamVLMError, ValueError, OSError) as e:  # OSError: a spec too long to be a folder's name
        raise APIError(400, f"routing: {_short(e)}", param="routing") from None


def _exists(name: str) -> bool:
    try:
        return Path(name).exists()
    except OSError:  # ENAMETOOLONG: no such file either
        return False


def _key_ok(header: str | None, key: str) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return _same(header[len("Bearer "):].strip(), key)


def _same(given: str, secret: str) -> bool:
    """Constant-time equality; as bytes, since compare_digest raises TypeError on non-ASCII str (a header is
    latin-1, so a client could send any byte)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), secret.encode("utf-8", "surrogateescape"))


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _short(error: Exception) -> str:
    text = str(error).splitlines()
    return text[0] if text else type(error).__name__


_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


class _KeyCheck:
    """401 for an HTTP request under /v1 without `Authorization: Bearer KEY`, from its headers alone: the body
    is never read (FastAPI's dependencies run after the body is parsed, so a keyless upload of 45 MB used to be
    read in full first). The connection is closed after the refusal, since the body was not drained."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers", ())).get(b"authorization")
        if header is not None and _key_ok(header.decode("latin-1"), self.key):
            return await self.app(scope, receive, send)
        body = json.dumps(error_body(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                     code="invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _BodyTimeout:
    """408 (and the connection closed) when a request body goes `timeout` seconds without a byte: a client
    that sends half a body must not hold its connection and its request open for ever."""

    def __init__(self, app, timeout: float):
        self.app, self.timeout = app, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        more = True

        async def timed():
            nonlocal more
            if not more:  # the body is in: what comes next is the disconnect, which may wait for ever
                return await receive()
            try:
                message_in = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body stalled for {self.timeout:g} s (--body-timeout-s)",
                                    headers={"Connection": "close"}) from None
            if message_in["type"] != "http.request" or not message_in.get("more_body", False):
                more = False
            return message_in

        await self.app(scope, timed, send)


class _BodyLimit:
    """Refuse bodies over `limit` bytes with 413: at once from Content-Length, or as soon as a chunked body
    passes the limit (nothing beyond it is read)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is over {self.limit / 2**20:.0f} MiB (--max-body-mb)"
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            body = json.dumps(error_body(413, message, code="body_too_large")).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def limited():
            nonlocal seen
            message_in = await receive()
            if message_in["type"] == "http.request":
                seen += len(message_in.get("body", b""))
                if seen > self.limit:  # FastAPI passes an HTTPException raised while reading the body through
                    raise HTTPException(413, message)
            return message_in

        await self.app(scope, limited, send)
