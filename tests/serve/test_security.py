"""Keys, the media folder, size limits and bad requests: each refused with the right 4xx and OpenAI's error
JSON, and the server keeps serving."""

from __future__ import annotations

import base64
import json
import os

import httpx
import pytest
import torch

from streamvlm.video.files import write_video

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    media, outside = root / "media", root / "outside"
    media.mkdir(), outside.mkdir()
    frames = torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    write_video(media / "ok.mp4", frames, fps=8)
    write_video(outside / "secret.mp4", frames, fps=8)
    os.symlink(outside / "secret.mp4", media / "link.mp4")  # a link out of the folder
    (media / "sub").mkdir()
    os.symlink(outside, media / "sub" / "escape")  # a linked folder out of it
    return media, outside


@pytest.fixture(scope="module")
def server(serve, folders):
    return serve(api_key=KEY, media_dir=folders[0], max_sessions=1,
                 extra=("--max-data-mb", "0.5", "--max-body-mb", "1"))


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def chat(http, url: str, key: str | None = KEY, **extra):
    body = {"model": "tiny", "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Q?"}]}],
        **extra}
    return http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"} if key else {})


def refused(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    assert "Traceback" not in response.text
    return error


def test_keys(server, http):
    assert http.get("/health").status_code == 200  # the one endpoint open without a key
    refused(http.get("/v1/models"), 401, "Authorization: Bearer")
    refused(http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    refused(http.get("/v1/models", headers={"Authorization": KEY}), 401)  # no "Bearer "
    refused(chat(http, "ok.mp4", key=None), 401)
    refused(http.post("/v1/streams", json={"source": "sample"}), 401)
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert chat(http, "ok.mp4").status_code == 200


def test_websocket_needs_the_key(server, http):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    opened = http.post("/v1/streams", json={"source": "sample"}, headers={"Authorization": f"Bearer {KEY}"})
    assert opened.status_code == 201
    ws_url = server.url.replace("http://", "ws://") + f"/v1/streams/{opened.json()['id']}/ws"
    try:
        for headers, protocols in (({}, None), ({"Authorization": "Bearer wrong"}, None), ({}, ["bearer.wrong"])):
            with pytest.raises(InvalidStatus) as info:
                connect(ws_url, additional_headers=headers, subprotocols=protocols, open_timeout=10)
            assert info.value.response.status_code == 403
        for headers, protocols in (({"Authorization": f"Bearer {KEY}"}, None), ({}, ["streamvlm", f"bearer.{KEY}"])):
            with connect(ws_url, additional_headers=headers, subprotocols=protocols, open_timeout=10) as ws:
                assert json.loads(ws.recv(timeout=10))["type"] == "hello"
    finally:
        assert http.delete(f"/v1/streams/{opened.json()['id']}",
                           headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.mark.parametrize("ref, status, words", [
    ("../outside/secret.mp4", 403, ["outside the allowed media folder"]),
    ("sub/../../outside/secret.mp4", 403, ["outside the allowed media folder"]),
    ("link.mp4", 403, ["outside the allowed media folder"]),
    ("sub/escape/secret.mp4", 403, ["outside the allowed media folder"]),
    ("/etc/passwd", 403, ["outside the allowed media folder"]),
    ("file:///etc/passwd", 403, ["outside the allowed media folder"]),
    ("missing.mp4", 404, ["no file"]),
    ("http://127.0.0.1:1/x.mp4", 400, ["not fetched"]),
])
def test_paths_outside_the_media_folder_are_refused(server, http, folders, ref, status, words):
    refused(chat(http, ref), status, *words)


def test_live_sources_obey_the_same_folder(server, http):
    headers = {"Authorization": f"Bearer {KEY}"}
    refused(http.post("/v1/streams", json={"source": "../outside/secret.mp4"}, headers=headers), 403, "outside")
    refused(http.post("/v1/streams", json={"source": "link.mp4"}, headers=headers), 403, "outside")
    refused(http.post("/v1/streams", json={"source": "lavfi:movie=/etc/passwd"}, headers=headers), 403, "lavfi")
    refused(http.post("/v1/streams", json={"source": "gopher://x"}, headers=headers), 400, "gopher")


def test_size_limits(server, http, folders):
    big = base64.b64encode(os.urandom(600 * 1024)).decode()  # 0.6 MiB decoded, over --max-data-mb 0.5
    refused(chat(http, f"data:video/mp4;base64,{big}"), 413, "0.5 MiB", "--max-data-mb")
    huge = base64.b64encode(os.urandom(900 * 1024)).decode()  # a body over --max-body-mb 1
    refused(chat(http, f"data:video/mp4;base64,{huge}"), 413, "--max-body-mb")
    # a chunked body (no Content-Length) is cut off at the limit too
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": huge}]}).encode()
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
    refused(http.post("/v1/chat/completions", content=chunks, headers={"Authorization": f"Bearer {KEY}",
                                                                      "Content-Type": "application/json"}), 413)
    refused(chat(http, "data:video/mp4;base64,@@@not-base64@@@"), 400, "base64")
    small = base64.b64encode((folders[0] / "ok.mp4").read_bytes()).decode()
    assert chat(http, f"data:video/mp4;base64,{small}").status_code == 200


def test_bad_requests(server, http):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    refused(http.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers=auth), 400,
            "not valid JSON")
    refused(http.post("/v1/chat/completions", json={"model": "tiny"}, headers=auth), 400, "messages")
    refused(http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
                      headers=auth), 404, "nope")
    refused(chat(http, "ok.mp4", n=2), 400, "n=1")
    refused(chat(http, "ok.mp4", tools=[{"type": "function"}]), 400, "tools")
    refused(chat(http, "ok.mp4", routing="../../etc"), 400, "routing")
    refused(chat(http, "ok.mp4", routing="nonsense:7"), 400, "routing")
    refused(chat(http, "ok.mp4", max_tokens=0), 400, "max_tokens")
    for url, status, words in (("x.png", 404, ("no file", "x.png")), ("../outside.png", 403, ("outside",)),
                               ("https://example.com/x.png", 400, ("not fetched",)),
                               ("data:image/png,raw", 400, ("base64",))):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Q?"}]
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}]}
        refused(http.post("/v1/chat/completions", json=body, headers=auth), status, *words)
    (folders_media := server.media_dir / "notvideo.mp4").write_bytes(b"this is not a video")
    refused(chat(http, folders_media.name), 400, "video")
    refused(http.get("/v1/streams/str_nope", headers=auth), 404, "str_nope")
    refused(http.delete("/v1/streams/str_nope", headers=auth), 404)
    refused(http.get("/v1/streams/str_nope/frame.jpg", headers=auth), 404)
    refused(http.post("/v1/streams", json={"source": "sample", "fps": -1}, headers=auth), 400, "fps")
    refused(http.post("/v1/streams", json={"source": "sample", "memory_budget": "lots"}, headers=auth), 400,
            "memory_budget")
    refused(http.get("/v1/nowhere", headers=auth), 404)


def test_unknown_stream_over_websocket(server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url = server.url.replace("http://", "ws://") + "/v1/streams/str_nope/ws"
    with connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}, open_timeout=10) as ws:
        message = json.loads(ws.recv(timeout=10))
        assert message["type"] == "error" and "str_nope" in message["message"]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 4404


def test_too_many_sessions(server, http):
    auth = {"Authorization": f"Bearer {KEY}"}
    first = http.post("/v1/streams", json={"source": "sample", "loop": True}, headers=auth)
    assert first.status_code == 201
    refused(http.post("/v1/streams", json={"source": "sample"}, headers=auth), 429, "at most 1")
    assert http.delete(f"/v1/streams/{first.json()['id']}", headers=auth).status_code == 200
    again = http.post("/v1/streams", json={"source": "sample"}, headers=auth)
    assert again.status_code == 201
    assert http.delete(f"/v1/streams/{again.json()['id']}", headers=auth).status_code == 200


def test_server_kept_serving_and_leaked_no_traceback(server, http):
    # runs last in this module: after every refusal above, the same process still answers
    assert server.alive()
    assert chat(http, "ok.mp4").status_code == 200
    assert "Traceback" not in server.log()
