"""`POST /v1/chat/completions`: OpenAI's request and response shapes over a streamvlm session.

A conversation maps onto one session: system messages become its system prompt; the first user message
may carry one video (`{"type": "video_url", "video_url": {"url": ...}}`), whose frames are ingested
first; earlier user/assistant pairs are fed as given (teacher-forced, as `Session.score` does), and the
last user message is answered. For a single question about a video this is exactly
`StreamVLM.generate(frames, question)`.

Extensions (sent by the openai client through `extra_body`): `video` {num_frames | fps, max_frames}
(default 8 frames spread over the video, as `streamvlm ask`), `routing` (a --routing spec), `top_k`.
Responses carry a `streamvlm` object: frames, video seconds, routing, language-model FLOPs as a fraction
of dense, and KV cache bytes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from streamvlm.errors import FrameBudgetError, StreamVLMError
from streamvlm.serve.engine import Engine
from streamvlm.serve.errors import APIError
from streamvlm.serve.media import MediaPolicy

DEFAULT_FRAMES = 8
INT_MAX = 2**31 - 1
"""Largest count a request may give (tokens, top_k): past it a number is a mistake or an attack, and huge
ints reach torch and C code that raise (or overflow) instead of refusing."""


def _no_nul(text: str) -> str:
    # NUL ends a C string: paths, URLs and FFmpeg options with one raise ValueError deep inside a library
    if "\x00" in text:
        raise ValueError("contains a NUL character")
    return text


Text = Annotated[str, AfterValidator(_no_nul)]
"""Every string a client sends: no NUL."""
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
"""torch's generator takes a 64-bit seed."""
FINISH_REASONS = {"stop_token": "stop", "max_new_tokens": "length", "context_full": "length",
                  "cancelled": "stop"}


class VideoURL(BaseModel):
    url: Text


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Text
    text: Text | None = None
    video_url: VideoURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None


class VideoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    num_frames: int | None = Field(None, ge=1, le=1024, description="frames spread evenly over the video")
    fps: float | None = Field(None, gt=0, le=60, description="frames per second of video instead of num_frames")
    max_frames: int | None = Field(None, ge=1, le=4096, description="cap on frames when sampling by fps")


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat completion request that a video model serves, plus `video`, `routing`
    and `top_k`. Fields OpenAI defines that change the output and are not supported here are refused."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: Text
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT_MAX)
    seed: Seed | None = None
    n: int = Field(1, ge=1, le=INT_MAX)
    video: VideoOptions | None = None
    routing: Text | None = Field(None, description="a --routing spec for this request (default: the server's)")


# Fields whose presence would change the answer in ways this server does not implement.
_REFUSED = ("tools", "functions", "response_format", "logit_bias", "stop", "audio", "prediction")


@dataclass
class ChatJob:
    """A parsed request: what the worker thread needs, and nothing from the HTTP layer."""

    question: str
    system: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    video_url: str | None = None
    num_frames: int | None = DEFAULT_FRAMES
    fps: float | None = None
    max_frames: int | None = None
    routing: str | None = None
    sampling: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ChatResult:
    """The end of an answer: what the response's usage and `streamvlm` fields report."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    extension: dict


def parse_request(req: ChatRequest, model_id: str) -> ChatJob:
    if req.model != model_id:
        raise APIError(404, f"model {req.model!r} is not served here; GET /v1/models lists {model_id!r}",
                       param="model", code="model_not_found")
    if req.n != 1:
        raise APIError(400, "n: only one choice per request is generated; send n=1", param="n")
    extra = req.model_extra or {}
    for name in _REFUSED:
        if extra.get(name) not in (None, [], "", {"type": "text"}):
            raise APIError(400, f"{name}: not supported by this server", param=name, code="unsupported_parameter")
    if extra.get("logprobs"):
        raise APIError(400, "logprobs: not supported by this server", param="logprobs", code="unsupported_parameter")

    job = ChatJob(question="", routing=req.routing)
    if req.video is not None:
        if req.video.num_frames is not None and req.video.fps is not None:
            raise APIError(400, "video: give num_frames or fps, not both", param="video")
        job.num_frames = None if req.video.fps is not None else (req.video.num_frames or DEFAULT_FRAMES)
        job.fps, job.max_frames = req.video.fps, req.video.max_frames
    max_tokens = req.max_completion_tokens or req.max_tokens
    job.sampling = {k: v for k, v in dict(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                          top_k=req.top_k, seed=req.seed).items() if v is not None}

    system: list[str] = []
    turns: list[tuple[str, str]] = []  # (role, text)
    for i, message in enumerate(req.messages):
        param = f"messages[{i}]"
        text, video = _content(message, param)
        if message.role in ("system", "developer"):
            if turns:
                raise APIError(400, f"{param}: system messages must come before the conversation", param=param)
            if video is not None:
                raise APIError(400, f"{param}: a system message cannot carry a video", param=param)
            system.append(text)
            continue
        if video is not None:
            if turns or job.video_url is not None:
                raise APIError(400, f"{param}: the video must be in the first user message (one video per "
                                    "conversation)", param=param)
            job.video_url = video
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if message.role != expected:
            raise APIError(400, f"{param}: expected a {expected} message here (user and assistant take turns, "
                                "starting with the user)", param=param)
        if message.role == "user" and not text.strip():
            raise APIError(400, f"{param}: the user message has no text; ask a question about the video",
                           param=param)
        turns.append((message.role, text))
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "messages: the last message must be the user's question", param="messages")
    job.system = "\n".join(system) if system else None
    job.history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    job.question = turns[-1][1]
    return job


def _content(message: Message, param: str) -> tuple[str, str | None]:
    """The text of a message (parts joined by newlines) and its video URL, if any."""
    if message.content is None:
        return "", None
    if isinstance(message.content, str):
        return message.content, None
    texts, video = [], None
    for j, part in enumerate(message.content):
        where = f"{param}.content[{j}]"
        if part.type == "text":
            texts.append(part.text or "")
        elif part.type == "video_url":
            if part.video_url is None:
                raise APIError(400, f"{where}: a video_url part needs {{'video_url': {{'url': ...}}}}", param=where)
            if video is not None:
                raise APIError(400, f"{where}: one video per conversation", param=where)
            video = part.video_url.url
        elif part.type == "image_url":
            raise APIError(400, f"{where}: images are not supported; send a video_url (a one-frame video works)",
                           param=where, code="unsupported_content")
        else:
            raise APIError(400, f"{where}: unknown content type {part.type!r}; use text or video_url", param=where,
                           code="unsupported_content")
    return "\n".join(texts), video


def run_chat(engine: Engine, media: MediaPolicy, job: ChatJob) -> Iterator[str | ChatResult]:
    """On a worker thread: the answer's text pieces as they are generated, then a ChatResult."""
    started = time.perf_counter()
    vlm = engine.model(job.routing)
    session = vlm.session(system=job.system, **job.sampling)
    seconds = 0.0
    if job.video_url is not None:
        param = "messages[].content[].video_url.url"
        # the text's tokens are kept free: frames that leave no room for the question are refused before
        # decoding
        texts = [job.question, *(text for exchange in job.history for text in exchange), job.system or ""]
        reserve = sum(len(vlm.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts if text)
        with media.video(job.video_url, param) as path:
            try:
                clip = vlm.read_video(path, num_frames=job.num_frames, fps=job.fps, max_frames=job.max_frames,
                                      reserve_tokens=reserve)
            except FrameBudgetError as e:
                raise APIError(400, f"video: {e}", param="video", code="too_many_frames") from None
            except StreamVLMError as e:
                raise APIError(400, f"{param}: {e}", param=param, code="bad_video") from None
        session.append_frames(clip.frames, clip.timestamps.tolist())
        seconds = clip.duration
    tokenizer = vlm.tokenizer
    for question, answer in job.history:
        session.score(question, tokenizer(answer, add_special_tokens=False)["input_ids"])
    first = None
    pieces = []
    for piece in session.ask_stream(job.question):
        first = first if first is not None else time.perf_counter() - started
        pieces.append(piece)
        yield piece
    turn = session.turns[-1]
    stats = session.stats()
    flops = stats["flops"]
    extension = {
        "frames": stats["frames"], "video_seconds": seconds, "routing": stats["routing"],
        "flops_fraction": flops["llm"] / flops["llm_dense"] if flops["llm_dense"] else 1.0,
        "kv_bytes": stats["kv_bytes"], "kv_bytes_dense": stats["kv_bytes_dense"],
        "kv_fraction": stats["kv_bytes"] / stats["kv_bytes_dense"] if stats["kv_bytes_dense"] else 1.0,
        "first_token_s": first, "seconds": time.perf_counter() - started, "stop_reason": turn.stop_reason,
    }
    yield ChatResult("".join(pieces), FINISH_REASONS.get(turn.stop_reason, "stop"), turn.context_tokens,
                     len(turn.answer_ids), extension)


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(result: ChatResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def completion_body(cid: str, created: int, model: str, result: ChatResult) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": usage(result), "streamvlm": result.extension}


def chunk_body(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               **extra) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
