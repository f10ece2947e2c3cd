"""MediaPolicy on its own (what a request may point the server at), and the listening socket."""

from __future__ import annotations

import base64
import os

import pytest

from streamvlm.serve.errors import APIError
from streamvlm.serve.media import MediaPolicy


def status(call) -> tuple[int, str]:
    with pytest.raises(APIError) as info:
        call()
    return info.value.status, info.value.message


def test_no_media_folder_reads_no_files():
    policy = MediaPolicy(None)
    code, message = status(lambda: policy.file("clip.mp4", "url"))
    assert code == 400 and "data: URI" in message
    code, message = status(lambda: policy.live_source("clip.mp4"))
    assert code == 400 and "sample" in message and "data:" not in message
    assert policy.live_source("sample") == "sample"
    assert policy.live_source("rtsp://cam/stream") == "rtsp://cam/stream"
    assert policy.listing() == []


def test_files_resolve_inside_the_folder_only(tmp_path):
    media, outside = tmp_path / "media", tmp_path / "outside"
    (media / "a").mkdir(parents=True), outside.mkdir()
    (media / "a" / "clip.mp4").write_bytes(b"x")
    (outside / "x.mp4").write_bytes(b"x")
    os.symlink(outside / "x.mp4", media / "out.mp4")
    os.symlink(media / "a" / "clip.mp4", media / "in.mp4")  # a link that stays inside is fine
    policy = MediaPolicy(media)
    assert policy.file("a/clip.mp4", "url") == (media / "a" / "clip.mp4").resolve()
    assert policy.file(str(media / "a" / "clip.mp4"), "url") == (media / "a" / "clip.mp4").resolve()
    assert policy.file("in.mp4", "url") == (media / "a" / "clip.mp4").resolve()
    for ref in ("out.mp4", "../outside/x.mp4", "a/../../outside/x.mp4", str(outside / "x.mp4")):
        assert status(lambda: policy.file(ref, "url"))[0] == 403, ref
    assert status(lambda: policy.file("a", "url"))[0] == 404  # a folder is not a video
    assert policy.listing() == ["a/clip.mp4", "in.mp4"]  # the link out is not offered


def test_data_uris(tmp_path):
    policy = MediaPolicy(None, max_data_bytes=1000)
    payload = os.urandom(600)
    with policy.video("data:video/mp4;base64," + base64.b64encode(payload).decode(), "url") as path:
        assert path.read_bytes() == payload
    assert not path.exists()  # removed when the request is done
    assert status(lambda: policy.decode_data_uri("data:video/mp4;base64," + "A" * 1400, "url"))[0] == 413
    assert status(lambda: policy.decode_data_uri("data:video/mp4,rawbytes", "url"))[0] == 400
    assert status(lambda: policy.decode_data_uri("data:video/mp4;base64,!!!!", "url"))[0] == 400


def test_listening_socket_turns_nagle_off_for_accepted_connections():
    import socket

    from streamvlm.serve import listen_socket

    with listen_socket("127.0.0.1", 0) as server, socket.create_connection(server.getsockname()):
        accepted, _ = server.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
