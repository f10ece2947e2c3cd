"""The request shapes real clients send: lmms-eval's frames as PNG `image_url` parts (with Qwen3-VL's
`<t seconds>` texts), mixed videos and images, vLLM's video fields, and hostile images (too many, too big,
decompression bombs).

The answers are checked through OpenAI's own client, against a server app run in this process (its HTTP
client is the app's TestClient), so the model is loaded once and shared with the reference; the bounded-memory
checks run against a real `streamvlm serve` process, whose RSS is the server's alone.
"""

from __future__ import annotations

import base64
import logging
import struct
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from streamvlm.runtime import StreamVLM
from streamvlm.serve.completions import ChatRequest, ImageRun, VideoPart, parse_request
from streamvlm.serve.errors import APIError
from streamvlm.serve.images import load_image, read_header
from streamvlm.video.files import read_video, write_video

QUESTION = "what is there now ?"


# -- images, written losslessly in pure Python (PNG) or by FFmpeg (JPEG) --------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(width: int, height: int, idat: bytes, depth: int = 8, colour: int = 2, extra: bytes = b"") -> bytes:
    """A PNG with the given IHDR fields and IDAT data (which need not hold what IHDR claims)."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def png(frame: np.ndarray | torch.Tensor) -> bytes:
    """uint8 (H, W, C), C = 1 (grey), 3 (RGB) or 4 (RGBA) -> PNG bytes, losslessly."""
    frame = np.asarray(frame)
    colour = {1: 0, 3: 2, 4: 6}[frame.shape[2]]
    raw = b"".join(b"\x00" + row.tobytes() for row in frame)  # filter 0 on every row
    return png_file(frame.shape[1], frame.shape[0], zlib.compress(raw), colour=colour)


def jpeg(frame: np.ndarray | torch.Tensor) -> bytes:
    frame = np.asarray(frame)
    context = av.CodecContext.create("mjpeg", "w")
    context.width, context.height, context.pix_fmt = frame.shape[1], frame.shape[0], "yuvj444p"
    context.time_base = Fraction(1, 1)
    picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuvj444p")
    return b"".join(bytes(p) for p in context.encode(picture) + context.encode(None))


def with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) claiming another size."""
    at = data.index(b"\xff\xc0")
    return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(data)}}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def frames_message(frames, question: str = QUESTION, stamps=None, text_first: bool = False) -> dict:
    """The user message lmms-eval builds: a PNG image_url part per frame, each after a `<t seconds>` text part
    when stamps are given (its Qwen3-VL layout), then the question (first, in its simple model)."""
    content = []
    for i, frame in enumerate(frames):
        if stamps is not None:
            content.append(text(f"<{stamps[i]:.1f} seconds>"))
        content.append(image(png(frame)))
    content = [text(question), *content] if text_first else [*content, text(question)]
    return {"role": "user", "content": content}


def world_frames(count: int = 8, size: int = 128) -> torch.Tensor:
    """The sample scene of the built-in model's world, one frame a second."""
    from streamvlm.world import render
    from streamvlm.world.sample import SCENE

    return render(SCENE, size, fps=1, count=count)


def write_lossless(path, frames: torch.Tensor, fps: int = 1) -> None:
    """A video whose decoded frames are exactly `frames` (FFV1 in Matroska), frame i at i / fps seconds."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24").reformat(format="bgr0")
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


# -- a server app in this process, reached through OpenAI's client --------------------------------------------

class InProcess:
    """create_app over `vlm`, with OpenAI's client whose HTTP client is the app's TestClient."""

    def __init__(self, vlm: StreamVLM, model_id: str, media_dir=None):
        import openai
        from fastapi.testclient import TestClient

        from streamvlm.serve import Engine, MediaPolicy, ServeConfig, create_app

        self.engine = Engine(vlm, model_id)
        self.http = TestClient(create_app(self.engine, ServeConfig(media=MediaPolicy(media_dir))))
        self.http.__enter__()
        self.model_id = model_id
        self.client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=self.http,
                                    max_retries=0)

    def ask(self, *messages, **extra):
        return self.client.chat.completions.create(model=self.model_id, messages=list(messages), **extra)

    def close(self) -> None:
        self.http.__exit__(None, None, None)


@pytest.fixture(scope="module")
def builtin():
    from streamvlm.world.builtin import default_model_dir

    return StreamVLM.from_pretrained(default_model_dir(), device="cpu")


@pytest.fixture(scope="module")
def builtin_app(builtin):
    app = InProcess(builtin, "builtin")
    yield app
    app.close()


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return StreamVLM.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def tiny_media(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients-media")
    frames = torch.randint(0, 255, (16, 48, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    write_video(root / "clip.mp4", frames, fps=8)
    return root


@pytest.fixture(scope="module")
def tiny_app(tiny, tiny_media):
    app = InProcess(tiny, "tiny", tiny_media)
    yield app
    app.close()


# -- lmms-eval's shapes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text_first", [False, True], ids=["chat-model", "simple-model"])
def test_lmms_eval_frames_answer_as_the_same_frames_sent_as_a_video(builtin, builtin_app, tmp_path, text_first):
    frames = world_frames()
    assert all(torch.equal(load_image(png(f), "p"), f) for f in frames)  # the PNGs hold the frames exactly
    reply = builtin_app.ask(frames_message(frames, text_first=text_first), max_tokens=24)
    assert reply.model_extra["streamvlm"]["frames"] == 8
    answer = reply.choices[0].message.content
    assert answer  # the built-in model describes the scene

    # the same 8 frames as a video the server decodes to the same pixels, one frame a second
    write_lossless(tmp_path / "frames.mkv", frames)
    clip = read_video(tmp_path / "frames.mkv", num_frames=8)
    assert torch.equal(clip.frames, frames) and clip.timestamps.tolist() == [float(i) for i in range(8)]
    url = data_uri((tmp_path / "frames.mkv").read_bytes(), "video/x-matroska")
    as_video = builtin_app.ask({"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                             text(QUESTION)]},
                               max_tokens=24, extra_body={"video": {"num_frames": 8}})
    assert as_video.model_extra["streamvlm"]["frames"] == 8
    assert answer == as_video.choices[0].message.content
    assert reply.usage.prompt_tokens == as_video.usage.prompt_tokens
    assert answer == builtin.generate(frames, QUESTION, timestamps=[float(i) for i in range(8)], max_new_tokens=24)


def test_qwen3_vl_layout_stamps_are_taken_as_frame_times_not_text(builtin, builtin_app):
    frames = world_frames()
    stamps = [0.5 + i for i in range(8)]
    reply = builtin_app.ask(frames_message(frames, stamps=stamps), max_tokens=24)
    plain = builtin_app.ask(frames_message(frames), max_tokens=24)
    assert reply.model_extra["streamvlm"]["frames"] == 8
    assert reply.choices[0].message.content == builtin.generate(frames, QUESTION, timestamps=stamps,
                                                                max_new_tokens=24)
    # LLaVA-OneVision writes no times: the stamps' text parts were consumed, not added to the question
    assert reply.usage.prompt_tokens == plain.usage.prompt_tokens
    assert reply.choices[0].message.content == plain.choices[0].message.content


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from streamvlm.tiny.qwen3 import write_tiny_qwen3_vl

    return StreamVLM.from_pretrained(write_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3") / "tiny"), device="cpu")


def test_qwen3_vl_stamps_reach_the_frames_timestamp_text(qwen3):
    # Qwen3-VL writes "<t seconds>" before each pair of frames: the stamps the client sent are the ones written
    frames = torch.randint(0, 256, (8, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    stamps = [100.0 + i for i in range(8)]

    def local(times):
        session = qwen3.session(max_new_tokens=6)
        session.append_frames(frames, times)
        answer = session.ask(QUESTION)
        return answer, session.turns[-1].context_tokens

    want, context = local(stamps)
    assert context != local([float(i) for i in range(8)])[1]  # the times change the prompt
    app = InProcess(qwen3, "qwen3")
    try:
        reply = app.ask(frames_message(frames, stamps=stamps), max_tokens=6)
    finally:
        app.close()
    assert reply.model_extra["streamvlm"]["frames"] == 8
    assert (reply.choices[0].message.content, reply.usage.prompt_tokens) == (want, context)


# -- mixed content, single images, the fields other servers take ------------------------------------------------

def test_videos_images_and_text_in_one_message_keep_their_order(tiny, tiny_app, tiny_media):
    pictures = torch.randint(0, 256, (3, 30, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    message = {"role": "user", "content": [
        text("Look at this."), {"type": "video_url", "video_url": {"url": "clip.mp4"}}, text("Then these:"),
        image(png(pictures[0])), image(jpeg(pictures[1])), {"type": "image_url", "image_url": {"url": "extra.png"}},
        text("What changed?")]}
    (tiny_media / "extra.png").write_bytes(png(pictures[2]))
    reply = tiny_app.ask(message, max_tokens=8, extra_body={"video": {"num_frames": 4}})

    # the session the server should have built: the text before the video, its 4 frames, the text between,
    # then the images one second apart from one second after the video's last frame, then the question
    clip = read_video(tiny_media / "clip.mp4", num_frames=4, resize=tiny.resize)
    end = clip.timestamps[-1].item() + 1.0
    images = torch.stack([tiny.resize(load_image(data, "p")) for data in (png(pictures[0]), jpeg(pictures[1]))]
                         + [tiny.resize(pictures[2])])
    session = tiny.session(max_new_tokens=8)
    session.say("Look at this.")
    session.append_frames(clip.frames, clip.timestamps.tolist())
    session.say("Then these:")
    session.append_frames(images, [end, end + 1, end + 2])
    want = session.ask("What changed?")
    moved = tiny.session(max_new_tokens=8)  # the text all after the media: another prompt
    moved.append_frames(clip.frames, clip.timestamps.tolist())
    moved.append_frames(images, [end, end + 1, end + 2])
    moved.ask("Look at this.\nThen these:\nWhat changed?")
    assert moved.token_ids() != session.token_ids()
    assert reply.choices[0].message.content == want
    assert reply.usage.prompt_tokens == session.turns[-1].context_tokens
    ext = reply.model_extra["streamvlm"]
    assert ext["frames"] == 7 and ext["video_seconds"] == pytest.approx(clip.duration + 3.0)


def test_a_video_gets_the_frames_the_images_left(tiny, tiny_app):
    import openai

    capacity = tiny.frame_capacity(reserve_tokens=len(tiny.tokenizer("Q?", add_special_tokens=False)["input_ids"]))
    pictures = [image(png(np.full((8, 8, 3), 9, np.uint8)))] * (capacity - 2)
    message = {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}}, *pictures,
                                           text("Q?")]}
    with pytest.raises(openai.BadRequestError) as info:  # refused before the video or any image is decoded
        tiny_app.ask(message, max_tokens=1, extra_body={"video": {"num_frames": 4}})
    error = info.value.body
    assert error["code"] == "too_many_frames" and error["param"] == "video"
    assert f"holds at most {capacity} frames" in error["message"] and "ask for at most 2 video frames" in \
        error["message"]


def test_a_single_image_is_a_one_frame_video(tiny, tiny_app):
    picture = torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    reply = tiny_app.ask({"role": "user", "content": [image(png(picture)), text("What is this?")]}, max_tokens=6)
    assert reply.model_extra["streamvlm"]["frames"] == 1
    assert reply.choices[0].message.content == tiny.generate(picture[None], "What is this?", timestamps=[0.0],
                                                             max_new_tokens=6)


def test_images_are_spaced_at_the_requests_fps(tiny, tiny_app):
    frames = torch.randint(0, 256, (4, 28, 28, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    reply = tiny_app.ask(frames_message(frames, "Q?"), max_tokens=4, extra_body={"video": {"fps": 4}})
    assert reply.model_extra["streamvlm"]["video_seconds"] == pytest.approx(1.0)
    assert reply.choices[0].message.content == tiny.generate(frames, "Q?", timestamps=[0, 0.25, 0.5, 0.75],
                                                             max_new_tokens=4)


def test_max_completion_tokens_and_the_usage_chunk(tiny_app, tiny_media):
    message = {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}}, text("Q?")]}
    capped = tiny_app.ask(message, max_completion_tokens=3)
    assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"
    same = tiny_app.ask(message, max_tokens=3)
    assert capped.choices[0].message.content == same.choices[0].message.content
    chunks = list(tiny_app.ask(message, max_completion_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == capped.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == capped.choices[0].message.content


def test_the_models_listing_says_how_many_frames_fit(tiny, tiny_app):
    listing = tiny_app.http.get("/v1/models").json()["data"][0]
    assert listing["context_frames"] == tiny.frame_capacity() > 0


# -- parsing -----------------------------------------------------------------------------------------------------

def parse(*content, **fields):
    body = {"model": "m", "messages": [{"role": "user", "content": list(content)}], **fields}
    return parse_request(ChatRequest.model_validate(body), "m")


def refusal(*content, **fields) -> APIError:
    with pytest.raises(APIError) as info:
        parse(*content, **fields)
    assert 400 <= info.value.status < 500
    return info.value


def ref(name: str) -> dict:
    return {"type": "image_url", "image_url": {"url": name, "detail": "low"}}


def test_stamps_runs_and_text_are_parsed_in_order():
    job = parse(text("<0.5 seconds>"), ref("a.png"), text("<1.5 s>"), ref("b.png"), text("What?"))
    assert job.media == [ImageRun(("a.png", "b.png"), ("messages[0].content[1].image_url.url",
                                                        "messages[0].content[3].image_url.url"), (0.5, 1.5))]
    assert job.question == "What?"
    job = parse(text("Intro"), ref("a.png"), ref("b.png"), {"type": "video_url", "video_url": {"url": "v.mp4"}},
                text("<3 seconds>"), ref("c.png"), text("<9 seconds>"), text("Why?"))
    assert [type(m) for m in job.media] == [str, ImageRun, VideoPart, ImageRun]
    assert job.media[0] == "Intro"  # text before the media stands before them
    assert job.media[1].times is None and job.media[3].urls == ("c.png",) and job.media[3].times == (3.0,)
    assert job.question == "<9 seconds>\nWhy?"  # a stamp before no image is text
    job = parse(text("One"), text("Two"), ref("a.png"), text("Three"), ref("b.png"))
    assert job.media[0] == "One\nTwo" and job.media[2] == "Three" and job.question == ""
    assert "has no text" in refusal(ref("a.png")).message


def test_bad_stamps_and_misplaced_images_are_refused():
    assert "before every image" in refusal(text("<1 s>"), ref("a.png"), ref("b.png"), text("Q")).message
    assert "backwards" in refusal(text("<2 s>"), ref("a.png"), text("<1 s>"), ref("b.png"), text("Q")).message
    error = refusal(ref("a.png"))
    assert "no text" in error.message
    with pytest.raises(APIError, match="first user message"):
        parse_request(ChatRequest.model_validate({"model": "m", "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [ref("a.png"), text("Q")]}]}), "m")
    with pytest.raises(APIError, match="system message"):
        parse_request(ChatRequest.model_validate({"model": "m", "messages": [
            {"role": "system", "content": [ref("a.png")]}, {"role": "user", "content": "Q"}]}), "m")
    assert refusal({"type": "image_url"}, text("Q")).status == 400


def test_vllm_video_fields_map_onto_the_video_options():
    video = {"type": "video_url", "video_url": {"url": "v.mp4"}}
    job = parse(video, text("Q"), mm_processor_kwargs={"fps": 2, "max_frames": 16, "do_sample_frames": True})
    assert (job.num_frames, job.fps, job.max_frames) == (None, 2, 16)
    job = parse(video, text("Q"), mm_processor_kwargs={"fps": 2}, media_io_kwargs={"video": {"num_frames": 12}})
    assert (job.num_frames, job.fps) == (12, None)  # the later source's num_frames replaces the fps
    job = parse(video, text("Q"), media_io_kwargs={"video": {"num_frames": 12}, "image": {"x": 1}},
                video={"fps": 0.5})
    assert (job.num_frames, job.fps) == (None, 0.5)  # ours win
    assert refusal(video, text("Q"), media_io_kwargs={"video": {"num_frames": -1}}).param == \
        "media_io_kwargs.video.num_frames"
    assert refusal(video, text("Q"), mm_processor_kwargs={"fps": "fast"}).param == "mm_processor_kwargs.fps"
    assert "not both" in refusal(video, text("Q"), mm_processor_kwargs={"fps": 1, "num_frames": 4}).message


def test_unknown_fields_are_ignored_with_a_debug_log_and_meaningful_ones_refused(caplog):
    with caplog.at_level(logging.DEBUG, logger="streamvlm.serve.completions"):
        job = parse(text("Q"), reasoning_effort="low", user="u1", store=False, max_completion_tokens=5)
    assert job.sampling["max_new_tokens"] == 5
    assert "reasoning_effort, store, user" in caplog.text
    for field, value in (("tools", [{"type": "function"}]), ("response_format", {"type": "json_object"}),
                         ("logprobs", True), ("n", 2)):
        assert refusal(text("Q"), **{field: value}).param == field


# -- images: headers, bombs ---------------------------------------------------------------------------------------

def test_png_and_jpeg_decode_to_their_pixels():
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert np.array_equal(load_image(png(rgb), "p").numpy(), rgb)
    rgba = np.concatenate([rgb, np.full((37, 53, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(load_image(png(rgba), "p").numpy(), rgb)  # alpha dropped
    grey = rgb[:, :, :1]
    assert np.array_equal(load_image(png(grey), "p").numpy(), np.repeat(grey, 3, axis=2))
    palette = png_file(2, 2, zlib.compress(b"\x00\x00\x01\x00\x01\x00"), colour=3,
                       extra=_chunk(b"PLTE", bytes([255, 0, 0, 0, 0, 255])))
    assert load_image(palette, "p").tolist() == [[[255, 0, 0], [0, 0, 255]], [[0, 0, 255], [255, 0, 0]]]
    smooth = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (48, 1, 3))
    decoded = load_image(jpeg(smooth), "p")
    assert decoded.shape == (48, 64, 3) and (decoded.int() - torch.from_numpy(smooth).int()).abs().max() <= 3
    header = read_header(jpeg(smooth))
    assert (header.kind, header.width, header.height) == ("JPEG", 64, 48)


def code(data: bytes) -> tuple[str, str]:
    with pytest.raises(APIError) as info:
        load_image(data, "img")
    assert info.value.status == 400
    return info.value.code, info.value.message


def test_bombs_oversized_and_broken_images_are_refused_before_decoding(monkeypatch):
    import types

    import streamvlm.serve.images as images

    def decoder(*args):
        raise AssertionError("FFmpeg was handed an image that should have been refused from its header")

    monkeypatch.setattr(images, "av", types.SimpleNamespace(CodecContext=types.SimpleNamespace(create=decoder)))
    row = zlib.compress(b"\x00" * 3001)
    assert code(png_file(100_000, 100_000, row)) == (
        "image_too_large", "img: the image is 100000x100000 (10000 MP); the server takes at most 40 MP an image; "
                           "scale it down first")
    # under the pixel bound, but 6000x6000 RGB needs at least 104 KB of deflate: a few hundred bytes is a bomb
    error = code(png_file(6000, 6000, row))
    assert error[0] == "bad_image" and "decompression bomb" in error[1]
    small = jpeg(np.zeros((16, 16, 3), np.uint8))
    assert code(with_jpeg_size(small, 60_000, 60_000))[0] == "image_too_large"
    assert code(with_jpeg_size(small, 5000, 5000))[0] == "bad_image"
    for data in (b"GIF89a" + b"\x00" * 100, b"", png_file(1, 1, zlib.compress(b"\x00\x00\x00\x00")),
                 b"\x89PNG\r\n\x1a\n" + b"\x00" * 4):
        assert code(data)[0] == "bad_image"


def test_a_png_that_does_not_decode_is_a_400():
    good = png(np.zeros((40, 40, 3), np.uint8))
    broken = good[:33] + b"\xde\xad" * 40 + good[-12:]  # the IDAT's deflate stream is garbage
    assert code(broken)[0] == "bad_image" and "does not decode" in code(broken)[1]


# -- hostile images against a real server process, in bounded memory ---------------------------------------------

def big_png(width: int, height: int) -> bytes:
    """A real width x height black PNG, compressed a row at a time (the test holds no full-size image)."""
    squeeze = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)
    idat = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
    return png_file(width, height, idat)


def test_hostile_images_get_a_4xx_in_bounded_memory(serve):
    import httpx

    server = serve()
    tinyimg = png(np.full((8, 8, 3), 40, np.uint8))
    bodies = {
        "2000 tiny images": [image(tinyimg)] * 2000,
        "an 8000x6000 image (48 MP)": [image(big_png(8000, 6000))],
        "a PNG bomb claiming 100000x100000": [image(png_file(100_000, 100_000, zlib.compress(bytes(30_000))))],
        "a PNG bomb claiming 6000x6000": [image(png_file(6000, 6000, zlib.compress(bytes(30_000))))],
        "a JPEG bomb claiming 60000x60000": [image(with_jpeg_size(jpeg(np.zeros((16, 16, 3), np.uint8)), 60_000,
                                                                  60_000))],
    }
    with httpx.Client(base_url=server.url, timeout=120) as http:
        assert http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1, "messages": [
            frames_message([np.zeros((8, 8, 3), np.uint8)], "Q?")]}).status_code == 200  # warm: first-call paths
        before = server.rss_bytes()
        server.reset_peak()
        codes = {}
        for what, content in bodies.items():
            response = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1, "messages": [
                {"role": "user", "content": [*content, text("Q?")]}]})
            assert 400 <= response.status_code < 500, (what, response.text)
            codes[what] = response.json()["error"]["code"]
        peak = server.peak_rss_bytes()
    assert list(codes.values()) == ["too_many_frames", "image_too_large", "image_too_large", "bad_image",
                                    "image_too_large"], codes
    # decoded, the 48 MP image alone is 144 MB and the 100000x100000 bomb 30 GB
    assert peak - before < 64 * 2**20, (before, peak)
    assert server.alive() and "Traceback" not in server.log()


def test_large_images_are_decoded_one_at_a_time(serve):
    import httpx

    server = serve()
    big = image(big_png(4000, 3000))  # 36 MB decoded
    with httpx.Client(base_url=server.url, timeout=300) as http:
        before = server.rss_bytes()
        server.reset_peak()
        response = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1, "messages": [
            {"role": "user", "content": [big] * 12 + [text("Q?")]}]})
        peak = server.peak_rss_bytes()
    assert response.status_code == 200, response.text
    assert response.json()["streamvlm"]["frames"] == 12
    assert peak - before < 150 * 2**20, (before, peak)  # all 12 held at full size: 432 MB
