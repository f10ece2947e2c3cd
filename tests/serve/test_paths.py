"""The server never shows a client its own paths: no response (JSON body, error, stream figures, WebSocket
event) names its cache, temporary, media or model folder. Files are named as the client named them."""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from streamvlm.video.files import write_video


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    media, cache = root / "media", root / "cache"
    (media / "sub").mkdir(parents=True)
    frames = torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    write_video(media / "sub" / "ok.mp4", frames, fps=8)
    (media / "bad.mp4").write_bytes(b"this is not a video" * 100)
    return media, cache


@pytest.fixture(scope="module")
def app(tiny_dir, folders):
    from fastapi.testclient import TestClient

    from streamvlm.runtime import StreamVLM
    from streamvlm.serve import Engine, MediaPolicy, ServeConfig, create_app

    media, cache = folders
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STREAMVLM_CACHE", str(cache))  # the sample video is written (and named) here
        engine = Engine(StreamVLM.from_pretrained(tiny_dir, device="cpu"), "tiny")
        with TestClient(create_app(engine, ServeConfig(media=MediaPolicy(media), max_sessions=2))) as client:
            yield client


def forbidden(folders) -> set[str]:
    media, cache = folders
    return {str(cache), os.path.realpath(cache), str(media), os.path.realpath(media), tempfile.gettempdir(),
            os.path.realpath(tempfile.gettempdir())}


def shown(folders, text: str) -> str:
    """`text`, after checking it names none of the server's folders."""
    for path in forbidden(folders):
        assert path not in text, f"{path} in {text}"
    return text


def chat(app, url: str, **extra):
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Q?"}]
    return app.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, **extra,
                                                  "messages": [{"role": "user", "content": content}]})


def error(folders, response, status: int) -> str:
    assert response.status_code == status, response.text
    shown(folders, response.text)
    return response.json()["error"]["message"]


def test_a_stream_from_the_sample_is_called_sample(app, folders):
    opened = app.post("/v1/streams", json={"source": "sample", "speed": 4, "fps": 2})  # 2 s to play
    assert opened.status_code == 201, opened.text
    assert shown(folders, opened.text) and opened.json()["stats"]["source"] == "sample"
    stream_id = opened.json()["id"]
    try:
        with app.websocket_connect(f"/v1/streams/{stream_id}/ws") as ws:
            seen = [ws.receive_json()]
            while not (seen[-1]["type"] == "status" and seen[-1]["done"]):  # a status every second, to the end
                seen.append(ws.receive_json())
        for message in seen:
            shown(folders, json.dumps(message))
        assert seen[0]["type"] == "hello" and seen[0]["stream"]["stats"]["source"] == "sample"
        described = app.get(f"/v1/streams/{stream_id}")
        assert shown(folders, described.text) and described.json()["stats"]["source"] == "sample"
        assert shown(folders, app.get("/v1/streams").text)
    finally:
        app.delete(f"/v1/streams/{stream_id}")


def test_a_bad_data_uri_video_is_called_the_data_uri(app, folders):
    bad = "data:video/mp4;base64," + base64.b64encode(b"this is not a video" * 100).decode()
    message = error(folders, chat(app, bad), 400)
    assert "the data: URI video" in message and "streamvlm-upload-" not in message
    assert "the data: URI video" in error(folders, chat(app, bad, stream=True), 400)


def test_files_in_the_media_folder_are_called_by_their_names_in_it(app, folders):
    media = folders[0]
    assert "'gone.mp4'" in error(folders, chat(app, "gone.mp4"), 404)  # a missing file: the client's name
    assert "gone.mp4" in error(folders, chat(app, str(media / "sub" / "gone.mp4")), 404)  # even given in full
    assert error(folders, app.post("/v1/streams", json={"source": "gone.mp4"}), 404)
    message = error(folders, chat(app, "bad.mp4"), 400)  # the reader's message named the real path
    assert "cannot read bad.mp4 as a video" in message, message
    assert "bad.mp4" in error(folders, app.post("/v1/streams", json={"source": "bad.mp4"}), 400)
    answered = chat(app, "sub/ok.mp4")
    assert answered.status_code == 200 and shown(folders, answered.text)
    sources = app.get("/v1/sources")
    assert shown(folders, sources.text) and "sub/ok.mp4" in [s["id"] for s in sources.json()["data"]]


def test_client_names_rewrite_only_paths_in_known_folders(tmp_path, monkeypatch):
    from streamvlm.serve.names import ClientNames
    from streamvlm.world.sample import SAMPLE_NAME

    monkeypatch.setenv("STREAMVLM_CACHE", str(tmp_path / "cache"))
    media = tmp_path / "media"
    names = ClientNames(media, model_dir=tmp_path / "model")
    upload = Path(tempfile.gettempdir()) / "streamvlm-upload-ab_c12.video"
    assert names.text(f"cannot read {upload} as a video ({upload!s}: bad)") == \
        "cannot read the data: URI video as a video (the data: URI video: bad)"
    assert names.text(f"no frame of {media}/a b/x.mp4. Fix '{media}/y.mp4'") == "no frame of a b/x.mp4. Fix 'y.mp4'"
    assert names.text(f"{media}: not a folder") == "the media folder: not a folder"
    assert names.text(f"{tmp_path}/media2/x.mp4") == "<temp>/" + str(tmp_path / "media2" / "x.mp4").removeprefix(
        tempfile.gettempdir() + "/")  # another folder beside the media folder is not in it
    assert names.text(f"source {tmp_path / 'cache' / SAMPLE_NAME} ended") == "source sample ended"
    assert names.text(f"{tmp_path}/cache/features/1.pt") == "<cache>/features/1.pt"
    assert names.text(f"{tmp_path}/model/router/routing.json") == "<model>/router/routing.json"
    assert names.text(f"relative paths start at {Path.cwd()}.") == \
        "relative paths start at the server's working folder."
    assert names.text("rtsp://cam/stream and a/b.mp4") == "rtsp://cam/stream and a/b.mp4"  # not paths of ours
    assert names.figures({"a": [f"{media}/x.mp4", 1, None], "b": {"c": str(media)}}) == \
        {"a": ["x.mp4", 1, None], "b": {"c": "the media folder"}}


def test_a_streams_url_credentials_are_hidden_from_every_client(app):
    opened = app.post("/v1/streams", json={"source": "rtsp://admin:s3cret@127.0.0.1:1/cam", "fps": 1})
    assert opened.status_code == 201, opened.text
    stream_id = opened.json()["id"]
    try:
        for path in ("/v1/streams", f"/v1/streams/{stream_id}"):
            body = app.get(path).text
            assert "rtsp://***@127.0.0.1:1/cam" in body and "s3cret" not in body and "admin" not in body
    finally:
        app.delete(f"/v1/streams/{stream_id}")


def test_url_credentials_are_hidden_in_any_text():
    from streamvlm.serve.names import ClientNames

    names = ClientNames(None)
    assert names.text("could not open rtsp://admin:s3cret@10.0.0.5:554/cam (timeout), srt://u@h:9") == \
        "could not open rtsp://***@10.0.0.5:554/cam (timeout), srt://***@h:9"
    assert names.text("http://host/a@b and user@example.com") == "http://host/a@b and user@example.com"
