"""The prefix cache: a request about media an earlier request ingested forks that request's session, answers
exactly as a fresh one, and never serves another video, other options or another routing."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from streamvlm import StreamVLM
from streamvlm.serve import Engine, MediaPolicy
from streamvlm.serve.completions import ChatRequest, ChatResult, parse_request, run_chat
from streamvlm.serve.errors import APIError
from streamvlm.serve.prefix import PrefixCache
from support import encode, indexed_frames

QUESTION = "What is in the video?"


# -- the cache alone ----------------------------------------------------------------------------------------

class FakeSession:
    def __init__(self, name: str, nbytes: int = 10):
        self.name, self.nbytes = name, nbytes

    def fork(self):
        return FakeSession(self.name + "'", self.nbytes)


def test_one_build_per_key_and_every_caller_gets_a_fork():
    cache = PrefixCache(100)
    builds = []
    started, release = threading.Event(), threading.Event()

    def build():
        builds.append(1)
        started.set()
        release.wait(5)
        return FakeSession("a"), "info"

    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("k", build, FakeSession.fork)))
               for _ in range(3)]
    threads[0].start()
    started.wait(5)
    for t in threads[1:]:
        t.start()
    release.set()
    for t in threads:
        t.join(5)
    assert len(builds) == 1
    assert sorted(hit for _, _, hit in got) == [False, True, True]
    assert all(session.name == "a'" and info == "info" for session, info, _ in got)  # a fork, never the kept one
    assert cache.stats() | {"bytes": None} == {"entries": 1, "bytes": None, "max_bytes": 100, "hits": 2,
                                               "misses": 1, "evictions": 0}


def test_least_recently_used_go_first_and_a_session_too_large_is_not_kept():
    cache = PrefixCache(25)
    for key in "abc":
        cache.get(key, lambda key=key: (FakeSession(key), None), FakeSession.fork)
        if key == "b":
            assert cache.get("a", None, FakeSession.fork)[2]  # a is used again: b is now the oldest
    assert cache.stats()["entries"] == 2 and cache.stats()["evictions"] == 1
    assert cache.get("a", None, FakeSession.fork)[2] and cache.get("c", None, FakeSession.fork)[2]
    cache.get("big", lambda: (FakeSession("big", 26), None), FakeSession.fork)
    assert cache.stats()["entries"] == 2
    assert not cache.get("big", lambda: (FakeSession("big", 26), None), FakeSession.fork)[2]


def test_a_failed_build_keeps_nothing_and_the_next_caller_builds():
    cache = PrefixCache(100)

    def fails():
        raise APIError(400, "bad video")

    with pytest.raises(APIError):
        cache.get("k", fails, FakeSession.fork)
    session, _, hit = cache.get("k", lambda: (FakeSession("a"), None), FakeSession.fork)
    assert not hit and session.name == "a'"


# -- the server's requests ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return StreamVLM.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture()
def media(tmp_path):
    encode(tmp_path / "clip.mkv", indexed_frames(12))
    return tmp_path


def body(question=QUESTION, url="clip.mkv", system=None, history=(), **extra) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    first = question if not history else history[0][0]
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": first}]
    messages.append({"role": "user", "content": content})
    if history:
        messages += [{"role": "assistant", "content": history[0][1]}, {"role": "user", "content": question}]
    return {"model": "m", "messages": messages, "max_tokens": 6, "ignore_eos": True,
            "video": {"num_frames": 4}, **extra}


def answer(engine: Engine, media_dir, request: dict) -> ChatResult:
    job = parse_request(ChatRequest.model_validate(request), "m")
    *_, result = run_chat(engine, MediaPolicy(media_dir), job)
    return result


def test_a_second_request_about_the_video_is_a_hit_and_answers_as_a_fresh_session(tiny, media):
    cached, plain = Engine(tiny, "m"), Engine(tiny, "m", prefix_cache_bytes=0)
    # the first request samples: the session it leaves must not hand its sampling to the greedy ones after it
    requests = [body(temperature=1.5, seed=3), body(), body("Anything moving?"), body(temperature=1.5, seed=4),
                body("And now?", history=[(QUESTION, "a cat")])]
    results = [answer(cached, media, r) for r in requests]
    assert [r.extension["prefix_cache"] for r in results] == ["miss", "hit", "hit", "hit", "hit"]
    for request, result in zip(requests, results):
        alone = answer(plain, media, request)
        assert alone.extension["prefix_cache"] == "off"
        assert (result.text, result.prompt_tokens) == (alone.text, alone.prompt_tokens)
        assert result.extension["kv_bytes"] == alone.extension["kv_bytes"]
    assert cached.prefix.stats()["entries"] == 1


def test_a_request_feeds_nothing_after_its_answer(tiny, media):
    # its session is its own and thrown away: the answer's last token and the closing text are not fed
    result = answer(Engine(tiny, "m"), media, body())
    p = tiny.decoder.parts
    entry = 2 * p.num_kv_heads * p.head_dim * 4 * p.num_layers  # float32 K and V at every layer
    assert result.completion_tokens == 6  # ignore_eos: the sixth token is generated, never fed
    assert result.extension["kv_bytes"] == (result.prompt_tokens + 5) * entry


@pytest.mark.parametrize("change", ["frames", "system", "routing", "file", "salt"])
def test_other_media_options_or_routing_are_a_miss(tiny, media, change):
    engine = Engine(tiny, "m")
    assert answer(engine, media, body())
    if change == "file":  # rewritten in place: the same name, other frames
        os.utime(media / "clip.mkv", ns=(1, 1))
        encode(media / "clip.mkv", indexed_frames(12, noise=True))
        request = body()
    else:
        request = {"frames": dict(body(), video={"num_frames": 3}),
                   "system": body(system="Be brief."), "routing": body(routing="mod:0.5"),
                   "salt": body(cache_salt="tenant-b")}[change]
    result = answer(engine, media, request)
    assert result.extension["prefix_cache"] == "miss"
    fresh = answer(Engine(tiny, "m", prefix_cache_bytes=0), media, request)
    assert result.text == fresh.text


def test_a_hit_still_refuses_frames_its_longer_question_leaves_no_room_for(tiny, media):
    engine = Engine(tiny, "m")
    request = body(video={"num_frames": 12})
    assert answer(engine, media, request).extension["prefix_cache"] == "miss"
    words = 1
    while tiny.frame_capacity(len(tiny.tokenizer(" word" * words)["input_ids"])) >= 12:
        words *= 2
    with pytest.raises(APIError, match="more frames than fit") as refused:
        answer(engine, media, body(" word" * words, video={"num_frames": 12}))
    assert refused.value.status == 400


def test_concurrent_batched_requests_about_one_video_ingest_it_once(tiny, media):
    engine = Engine(tiny, "m", max_batch=4)
    alone = answer(Engine(tiny, "m", prefix_cache_bytes=0), media, body())
    results = []
    threads = [threading.Thread(target=lambda: results.append(answer(engine, media, body()))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.close()
    assert sorted(r.extension["prefix_cache"] for r in results) == ["hit", "hit", "hit", "miss"]
    assert {r.text for r in results} == {alone.text}


def test_requests_with_the_same_salt_share_the_cache(tiny, media):
    engine = Engine(tiny, "m")
    assert answer(engine, media, body(cache_salt="a")).extension["prefix_cache"] == "miss"
    assert answer(engine, media, body("Anything moving?", cache_salt="a")).extension["prefix_cache"] == "hit"
    assert answer(engine, media, body()).extension["prefix_cache"] == "miss"  # no salt is a salt of its own


@pytest.mark.parametrize("salt, why", [(123, "string"), ("s" * 1025, "at most 1024")])
def test_a_bad_cache_salt_is_a_400_naming_the_field(tiny, media, salt, why):
    from fastapi.testclient import TestClient

    from streamvlm.serve import ServeConfig, create_app

    engine = Engine(tiny, "m")
    with TestClient(create_app(engine, ServeConfig(media=MediaPolicy(media)))) as http:
        reply = http.post("/v1/chat/completions", json=body(cache_salt=salt))
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert "cache_salt" in error["message"] and why in error["message"]
        assert http.post("/v1/chat/completions", json=body()).status_code == 200  # nothing kept from it
    assert engine.prefix.stats()["misses"] == 1


def test_a_long_prompt_under_a_small_step_budget_answers_as_alone(tiny, media):
    # the server's --max-step-tokens: the system prompt and video are fed in pieces of at most 24 tokens
    request = body(system="You watch videos closely. " * 12)
    alone = answer(Engine(tiny, "m", prefix_cache_bytes=0), media, request)
    engine = Engine(tiny, "m", max_batch=4, max_step_tokens=24, prefix_cache_bytes=0)
    try:
        assert engine.batcher.max_step_tokens == 24
        result = answer(engine, media, request)
        steps = engine.batcher.steps
    finally:
        engine.close()
    assert result.text == alone.text and result.prompt_tokens == alone.prompt_tokens > 24 * 4
    # a step per piece of the prompt (none holds more than 24 tokens), then one per answer token after the first
    assert steps >= -(-result.prompt_tokens // 24) + result.completion_tokens - 1
