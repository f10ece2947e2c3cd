"""The OpenAI-compatible API against a real `streamvlm serve` process, through OpenAI's own client."""

from __future__ import annotations

import base64

import httpx
import pytest
import torch

from streamvlm.runtime import StreamVLM
from streamvlm.video.files import read_video, write_video

QUESTION = "What happens in the video?"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    g = torch.Generator().manual_seed(3)
    write_video(root / "clip.mp4", torch.randint(0, 255, (24, 48, 64, 3), dtype=torch.uint8, generator=g), fps=8)
    return root


@pytest.fixture(scope="module")
def server(serve, media):
    return serve(media_dir=media)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(tiny_dir):
    return StreamVLM.from_pretrained(tiny_dir, device="cpu")


def video_message(url: str, question: str = QUESTION) -> dict:
    return {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                        {"type": "text", "text": question}]}


def expected(local, media, question=QUESTION, num_frames=8, max_new_tokens=12):
    clip = read_video(media / "clip.mp4", num_frames=num_frames)
    return local.generate(clip.frames, question, timestamps=clip.timestamps.tolist(), max_new_tokens=max_new_tokens)


def test_openai_client_answers_as_generate_does(client, local, media):
    want = expected(local, media)
    reply = client.chat.completions.create(model="tiny", messages=[video_message("clip.mp4")], max_tokens=12)
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason in ("stop", "length")
    ext = reply.model_extra["streamvlm"]
    assert ext["frames"] == 8 and ext["routing"] == "dense" and ext["flops_fraction"] == 1.0
    assert ext["kv_bytes"] == ext["kv_bytes_dense"] > 0
    # usage: the context the answer was generated from (8 frames' tokens and the prompt), and the answer
    session = local.session(max_new_tokens=12)
    clip = read_video(media / "clip.mp4", num_frames=8)
    session.append_frames(clip.frames, clip.timestamps.tolist())
    session.ask(QUESTION)
    turn = session.turns[-1]
    assert reply.usage.prompt_tokens == turn.context_tokens > 8 * local.tokens_per_frame
    assert reply.usage.completion_tokens == len(turn.answer_ids)
    assert reply.usage.total_tokens == turn.context_tokens + len(turn.answer_ids)


def test_streamed_answer_is_the_same_text(client, local, media):
    want = expected(local, media, num_frames=6)
    stream = client.chat.completions.create(model="tiny", messages=[video_message("clip.mp4")], max_tokens=12,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"video": {"num_frames": 6}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # really streamed, piece by piece
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["streamvlm"]["frames"] == 6
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_data_uri_video_answers_as_the_file(client, local, media):
    data = base64.b64encode((media / "clip.mp4").read_bytes()).decode()
    reply = client.chat.completions.create(model="tiny", max_tokens=12,
                                           messages=[video_message(f"data:video/mp4;base64,{data}")])
    assert reply.choices[0].message.content == expected(local, media)


def test_system_prompt_and_earlier_turns_are_fed(client, local, media):
    clip = read_video(media / "clip.mp4", num_frames=8)
    session = local.session(system="You describe videos.", max_new_tokens=10)
    session.append_frames(clip.frames, clip.timestamps.tolist())
    session.score(QUESTION, local.tokenizer("a red ball", add_special_tokens=False)["input_ids"])
    want = session.ask("And then?")
    reply = client.chat.completions.create(model="tiny", max_tokens=10, messages=[
        {"role": "system", "content": "You describe videos."}, video_message("clip.mp4"),
        {"role": "assistant", "content": "a red ball"}, {"role": "user", "content": "And then?"}])
    assert reply.choices[0].message.content == want
    # and the answer differs from one without the system prompt (the prompt was really used)
    plain = local.session(max_new_tokens=10)
    plain.append_frames(clip.frames, clip.timestamps.tolist())
    plain.score(QUESTION, local.tokenizer("a red ball", add_special_tokens=False)["input_ids"])
    plain.ask("And then?")
    assert reply.usage.prompt_tokens > plain.turns[-1].context_tokens


def test_text_only_question(client, local):
    reply = client.chat.completions.create(model="tiny", max_tokens=6,
                                           messages=[{"role": "user", "content": "Hello?"}])
    session = local.session(max_new_tokens=6)
    assert reply.choices[0].message.content == session.ask("Hello?")
    assert reply.model_extra["streamvlm"]["frames"] == 0


def test_routing_per_request_cuts_flops_and_cache(client):
    reply = client.chat.completions.create(model="tiny", max_tokens=4, messages=[video_message("clip.mp4")],
                                           extra_body={"routing": "uniform:0.25"})
    ext = reply.model_extra["streamvlm"]
    assert ext["routing"].startswith("uniform")
    assert ext["flops_fraction"] < 0.8 and ext["kv_fraction"] < 0.8


def test_models_health_and_docs(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/streams", "/v1/streams/{stream_id}"} <= set(schema["paths"])
    assert httpx.get(server.url + "/docs").status_code == 200
    assert "<html" in httpx.get(server.url + "/").text.lower()
