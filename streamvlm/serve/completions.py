"""`POST /v1/chat/completions`: OpenAI's request and response shapes over a streamvlm session.

A conversation maps onto one session: system messages become its system prompt; the first user message
may carry the media, whose frames are ingested first; earlier user/assistant pairs are fed as given
(teacher-forced, as `Session.score` does), and the last user message is answered. For a single question
about a video this is exactly `StreamVLM.generate(frames, question)`.

Media, in the order the message gives them, on one timeline (one video, as the session lays out a turn):
- a `video_url` part (a file in the media folder or a data: URI), sampled by the request's video options;
- a run of consecutive `image_url` parts (PNG or JPEG), each image a frame, resized to the model's input
  size as it is decoded (so images of any sizes make one video). This is how evaluation harnesses send a
  video (lmms-eval samples it and sends a PNG per frame). A text part that is only `<T seconds>` (or
  `<T s>`) right before an image gives that frame's time and is not text (lmms-eval's Qwen3-VL layout);
  without them the frames are 1/fps apart (the video options' fps, default 1).
A later video or run starts where the one before ended (its times shifted when they would overlap).

Text stays where it stands: the text after the last video or image run is the question; text before the
first is the turn's preface, which the checkpoint's chat template places as it places text before a video
(before it for templates that write parts in order, after it for those that write media first, as the
family's own processor would); text between two runs is written between their frames (`Session.say`).
Consecutive text parts are joined by newlines.

Extensions (sent by the openai client through `extra_body`): `video` {num_frames | fps, max_frames}
(default 8 frames spread over the video, as `streamvlm ask`), `routing` (a --routing spec), `top_k`,
`cache_salt` (vLLM's: only requests with the same salt share the prefix cache). vLLM's
`mm_processor_kwargs` and `media_io_kwargs["video"]` give the same three video options (ours win). Other
unknown fields are ignored (logged at debug level), as OpenAI ignores them; fields that would change what
an answer means and are not implemented are refused.
Responses carry a `streamvlm` object: frames, video seconds, routing, language-model FLOPs as a fraction
of dense, and KV cache bytes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from streamvlm.errors import StreamVLMError
from streamvlm.runtime import StreamVLM
from streamvlm.serve.engine import Engine
from streamvlm.serve.errors import APIError
from streamvlm.serve.images import load_image
from streamvlm.serve.media import MediaPolicy
from streamvlm.session import Session
from streamvlm.video.files import VideoClip

log = logging.getLogger(__name__)

DEFAULT_FRAMES = 8
DEFAULT_IMAGE_FPS = 1.0
"""Frames per second of image runs without `<T seconds>` parts, unless the request gives video.fps."""
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


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: Text
    detail: Text | None = None
    """OpenAI's resolution hint; every image is resized to the model's input size whatever it says."""


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Text
    text: Text | None = None
    video_url: VideoURL | None = None
    image_url: ImageURL | None = None


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
    mm_processor_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM's: its fps, num_frames and max_frames are read as `video`'s; the rest is ignored")
    ignore_eos: bool = Field(False, description="vLLM's: keep generating past the end-of-turn token, up to the "
                                                  "token limit (benchmarks)")
    media_io_kwargs: dict[str, dict[str, Any]] | None = Field(
        None, description="vLLM's: the \"video\" entry's fps, num_frames and max_frames are read as `video`'s")
    cache_salt: Text | None = Field(
        None, max_length=1024, description="vLLM's: requests share the prefix cache only with requests that give the "
                                           "same salt (e.g. one per tenant: a hit is faster, and says so)")


# Fields whose presence would change the answer in ways this server does not implement.
_REFUSED = ("tools", "functions", "response_format", "logit_bias", "stop", "audio", "prediction")
_VIDEO_KEYS = ("num_frames", "fps", "max_frames")
# A text part that is only a frame's time, as lmms-eval writes one before each Qwen3-VL frame: "<12.5 seconds>"
_STAMP = re.compile(r"\s*<\s*(\d{1,7}(?:\.\d*)?)\s*(?:seconds|s)\s*>\s*")


@dataclass(frozen=True)
class VideoPart:
    """A `video_url` part, sampled by the request's video options."""

    url: str
    param: str


@dataclass(frozen=True)
class ImageRun:
    """Consecutive `image_url` parts: one video whose frames are the images, in order."""

    urls: tuple[str, ...]
    params: tuple[str, ...]
    times: tuple[float, ...] | None
    """Seconds of each frame, from the `<T seconds>` parts before them; None: 1/fps apart."""


Media = VideoPart | ImageRun
Content = VideoPart | ImageRun | str
"""A user message's media in order, with the text before and between them (a str) where it stands."""


@dataclass
class ChatJob:
    """A parsed request: what the worker thread needs, and nothing from the HTTP layer."""

    question: str
    system: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    media: list[Content] = field(default_factory=list)
    """The first user message's videos, image runs and the text before and between them, in order."""
    num_frames: int | None = DEFAULT_FRAMES
    fps: float | None = None
    max_frames: int | None = None
    routing: str | None = None
    sampling: dict = field(default_factory=dict)
    cache_salt: str | None = None
    """Part of the prefix cache's key: only requests with the same salt share a kept session."""


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
    if extra:
        log.debug("chat request: ignoring the fields %s", ", ".join(sorted(extra)))

    job = ChatJob(question="", routing=req.routing, cache_salt=req.cache_salt)
    video = _video_options(req)
    job.num_frames = None if video.fps is not None else (video.num_frames or DEFAULT_FRAMES)
    job.fps, job.max_frames = video.fps, video.max_frames
    max_tokens = req.max_completion_tokens or req.max_tokens
    job.sampling = {k: v for k, v in dict(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                          top_k=req.top_k, seed=req.seed).items() if v is not None}
    if req.ignore_eos:
        job.sampling["ignore_stop"] = True

    system: list[str] = []
    turns: list[tuple[str, str]] = []  # (role, text)
    for i, message in enumerate(req.messages):
        param = f"messages[{i}]"
        text, media = _content(message, param)
        if message.role in ("system", "developer"):
            if turns:
                raise APIError(400, f"{param}: system messages must come before the conversation", param=param)
            if media:
                raise APIError(400, f"{param}: a system message cannot carry a video or images", param=param)
            system.append(text)
            continue
        if media:
            if turns or job.media:
                raise APIError(400, f"{param}: videos and images must be in the first user message (the "
                                    "conversation's video comes first)", param=param)
            job.media = media
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if message.role != expected:
            raise APIError(400, f"{param}: expected a {expected} message here (user and assistant take turns, "
                                "starting with the user)", param=param)
        if message.role == "user" and not text.strip() and not any(isinstance(m, str) for m in media):
            raise APIError(400, f"{param}: the user message has no text; ask a question about the video",
                           param=param)
        turns.append((message.role, text))
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "messages: the last message must be the user's question", param="messages")
    job.system = "\n".join(system) if system else None
    job.history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    job.question = turns[-1][1]
    return job


def _video_options(req: ChatRequest) -> VideoOptions:
    """The request's video options: vLLM's mm_processor_kwargs, then its media_io_kwargs["video"], then our
    `video`, each overriding the one before; fps and num_frames replace each other (as in vLLM)."""
    merged: dict = {}
    for name, given in (("mm_processor_kwargs", req.mm_processor_kwargs),
                        ("media_io_kwargs.video", (req.media_io_kwargs or {}).get("video")),
                        ("video", req.video.model_dump(exclude_none=True) if req.video is not None else None)):
        if not given:
            continue
        taken = {key: given[key] for key in _VIDEO_KEYS if key in given}
        if len(taken) < len(given):
            log.debug("chat request: ignoring %s %s", name, ", ".join(sorted(set(given) - set(taken))))
        try:
            VideoOptions.model_validate(taken)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join([name, *map(str, first["loc"])])
            raise APIError(400, f"{where}: {first['msg']}", param=where) from None
        if "num_frames" in taken and "fps" in taken:
            raise APIError(400, f"{name}: give num_frames or fps, not both", param=name)
        for key, other in (("num_frames", "fps"), ("fps", "num_frames")):
            if key in taken:
                merged.pop(other, None)
        merged.update(taken)
    return VideoOptions.model_validate(merged)


def _content(message: Message, param: str) -> tuple[str, list[Content]]:
    """A message's last text (its text parts after the last video or image run, joined by newlines) and, in
    order, its media with the text before and between them (see the module's docstring)."""
    if message.content is None:
        return "", []
    if isinstance(message.content, str):
        return message.content, []
    texts: list[str] = []  # text parts since the last video or image run
    media: list[Content | _Run] = []
    run: _Run | None = None  # the image run being read

    def text_stands_here() -> None:
        if texts:
            media.append("\n".join(texts))
            texts.clear()

    stamp: float | None = None  # the time a <T seconds> part gave the next image
    parts = message.content
    for j, part in enumerate(parts):
        where = f"{param}.content[{j}]"
        if part.type == "image_url":
            if part.image_url is None:
                raise APIError(400, f"{where}: an image_url part needs {{'image_url': {{'url': ...}}}}", param=where)
            if run is None:
                text_stands_here()
                run = _Run()
                media.append(run)
            run.add(part.image_url.url, f"{where}.image_url.url", stamp)
            stamp = None
            continue
        if part.type == "text":
            match = _STAMP.fullmatch(part.text or "")
            if match and j + 1 < len(parts) and parts[j + 1].type == "image_url":
                stamp = float(match.group(1))
                continue
            if part.text:
                texts.append(part.text)
        elif part.type == "video_url":
            if part.video_url is None:
                raise APIError(400, f"{where}: a video_url part needs {{'video_url': {{'url': ...}}}}", param=where)
            text_stands_here()
            media.append(VideoPart(part.video_url.url, f"{where}.video_url.url"))
        else:
            raise APIError(400, f"{where}: unknown content type {part.type!r}; use text, video_url or image_url",
                           param=where, code="unsupported_content")
        run = None
    content = [item.close() if isinstance(item, _Run) else item for item in media]
    return "\n".join(texts), content


class _Run:
    """An image run as it is read: its parts' URLs, where they stand, and their times (None: not given)."""

    def __init__(self):
        self.urls: list[str] = []
        self.params: list[str] = []
        self.stamps: list[float | None] = []

    def add(self, url: str, param: str, stamp: float | None) -> None:
        self.urls.append(url)
        self.params.append(param)
        self.stamps.append(stamp)

    def close(self) -> ImageRun:
        if all(t is None for t in self.stamps):
            return ImageRun(tuple(self.urls), tuple(self.params), None)
        if None in self.stamps:
            where = self.params[self.stamps.index(None)]
            raise APIError(400, f"{where}: this image has no <T seconds> text part before it but others of its run "
                                "do; give one before every image of the run or before none", param=where)
        for where, before, t in zip(self.params[1:], self.stamps, self.stamps[1:]):
            if t < before:
                raise APIError(400, f"{where}: <{t:g} seconds> comes after <{before:g} seconds>; frame times must "
                                    "not go backwards", param=where)
        return ImageRun(tuple(self.urls), tuple(self.params), tuple(self.stamps))


def run_chat(engine: Engine, media: MediaPolicy, job: ChatJob) -> Iterator[str | ChatResult]:
    """On a worker thread: the answer's text pieces as they are generated, then a ChatResult."""
    started = time.perf_counter()
    vlm = engine.model(job.routing)
    session, seconds, prefix = _start(engine, vlm, media, job)
    tokenizer = vlm.tokenizer
    for question, answer in job.history:
        session.score(question, tokenizer(answer, add_special_tokens=False)["input_ids"])
    first = None
    pieces = []
    for piece in session.ask_stream(job.question, last=True):  # the session is this request's alone
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
        "prefix_cache": prefix,
    }
    yield ChatResult("".join(pieces), FINISH_REASONS.get(turn.stop_reason, "stop"), turn.context_tokens,
                     len(turn.answer_ids), extension)


def _start(engine: Engine, vlm: StreamVLM, policy: MediaPolicy, job: ChatJob) -> tuple[Session, float, str]:
    """The request's session with its media fed: (session, the media's seconds, "hit", "miss" or "off" for the
    prefix cache). With the cache on, a request whose media, system prompt, video options and routing an
    earlier request had forks that request's session instead of ingesting (`streamvlm.serve.prefix`)."""
    key = media_key(vlm, policy, job) if engine.prefix is not None and job.media else None
    if key is None:
        session = vlm.session(system=job.system, **job.sampling)
        return session, _feed_media(vlm, session, policy, job)[0] if job.media else 0.0, "off"

    def build():
        # the kept session has the server's sampling: each request's own is set on its fork
        session = vlm.session(system=job.system)
        return session, _feed_media(vlm, session, policy, job)

    session, (seconds, frames), hit = engine.prefix.get(
        key, build, lambda kept: kept.fork(vlm.decoder, **job.sampling))
    if hit:  # the same frames, but this request's text may leave them less room
        _FrameBudget(vlm, _text_tokens(vlm, job)).take(frames, "frames", "messages")
    return session, seconds, "hit" if hit else "miss"


def media_key(vlm: StreamVLM, policy: MediaPolicy, job: ChatJob) -> tuple:
    """What a session is after `_feed_media`: the routing, the system prompt, the video options, and the media
    in order, each text as is, each file by its real path and identity (device, inode, size, modification
    time in ns: a file rewritten is another file), each data: URI by its SHA-256; and the request's cache
    salt, which keeps clients that give different salts apart."""
    def source(url: str, param: str, what: str):
        if url.startswith("data:"):
            return hashlib.sha256(url.encode()).hexdigest()
        path = policy.local(url, param, what)
        stat = path.stat()
        return str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns

    parts = []
    for part in job.media:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, VideoPart):
            parts.append(("video", source(part.url, part.param, "video")))
        else:
            parts.append(("images", tuple(source(u, p, "image") for u, p in zip(part.urls, part.params)), part.times))
    return job.cache_salt, vlm.router.spec(), job.system, job.num_frames, job.fps, job.max_frames, tuple(parts)


def _text_tokens(vlm: StreamVLM, job: ChatJob) -> int:
    """Tokens of the conversation's text, which the frames must leave room for."""
    texts = [job.question, *(text for exchange in job.history for text in exchange), job.system or "",
             *(part for part in job.media if isinstance(part, str))]
    return sum(len(vlm.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts if text)


def _feed_media(vlm: StreamVLM, session: Session, policy: MediaPolicy, job: ChatJob) -> tuple[float, int]:
    """Feed the conversation's videos and image runs into the session in order, on one timeline, with the text
    before and between them where it stands; returns the seconds they span and the frames taken. Their frames
    are counted against the context before anything is decoded (the images' at once, each video's as its read
    is planned), and each frame is resized to the model's input size as it is decoded, so no two full-size
    frames are held together."""
    # the text's tokens are kept free: frames that leave no room for the question are refused before decoding
    budget = _FrameBudget(vlm, _text_tokens(vlm, job))
    budget.take(sum(len(run.urls) for run in job.media if isinstance(run, ImageRun)), "images", "messages")
    spacing = 1 / (job.fps or DEFAULT_IMAGE_FPS)
    end = None  # where the next video or run may start: one frame interval after the last frame fed
    seconds = 0.0
    for part in job.media:
        if isinstance(part, str):
            session.say(part)
            continue
        if isinstance(part, VideoPart):
            clip = _read_video(vlm, policy, job, part, budget)
            times = _after(clip.timestamps.tolist(), end)
            session.append_frames(clip.frames, times)
            seconds += clip.duration
        else:
            times = _after(list(part.times) if part.times else [i * spacing for i in range(len(part.urls))], end)
            step = vlm.max_chunk_frames  # decoded and fed a chunk at a time: only a chunk is held
            for first in range(0, len(part.urls), step):
                frames = [vlm.resize(load_image(policy.image(url, param), param))
                          for url, param in zip(part.urls[first:first + step], part.params[first:first + step])]
                session.append_frames(torch.stack(frames), times[first:first + step])
            seconds += times[-1] - times[0] + spacing
        end = times[-1] + spacing
    return seconds, budget.capacity - budget.left


class _FrameBudget:
    """The input frames a request's context holds besides its text, spent as videos and images are planned."""

    def __init__(self, vlm: StreamVLM, reserve_tokens: int):
        self.capacity = vlm.frame_capacity(reserve_tokens)
        self.left = self.capacity
        self._context = vlm.adapter.decoder.max_positions

    def take(self, count: int, what: str, param: str) -> None:
        """Spend `count` frames (`what`: "images", "video frames"), or refuse with a 400 if they do not fit."""
        if count <= self.left:
            self.left -= count
            return
        taken = self.capacity - self.left
        raise APIError(400, f"{param}: {count} {what} are more frames than fit: the model's {self._context}-token "
                            f"context holds at most {self.capacity} frames besides the text"
                            f"{f', and the message takes {taken} elsewhere' if taken else ''}; ask for at most "
                            f"{self.left} {what} (fewer images, fewer num_frames, a lower fps, or max_frames)",
                       param=param, code="too_many_frames")


def _read_video(vlm: StreamVLM, policy: MediaPolicy, job: ChatJob, part: VideoPart, budget: _FrameBudget) -> VideoClip:
    # the frame count checked against what the message's other media left
    with policy.video(part.url, part.param) as path:
        try:
            return vlm.read_video(path, num_frames=job.num_frames, fps=job.fps, max_frames=job.max_frames,
                                  admit=lambda count: budget.take(count, "video frames", "video"))
        except StreamVLMError as e:
            raise APIError(400, f"{part.param}: {e}", param=part.param, code="bad_video") from None


def _after(times: list[float], end: float | None) -> list[float]:
    """`times` moved later by as much as it takes for them to start at `end` or after."""
    shift = 0.0 if end is None else max(0.0, end - times[0])
    return [t + shift for t in times] if shift else times


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
