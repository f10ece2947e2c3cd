"""A live stream opened through `streamvlm serve` over a real RTSP server on 127.0.0.1: questions over the
WebSocket get streamed answers while ingestion goes on."""

from __future__ import annotations

import json
import time

import httpx
from websockets.sync.client import connect


def test_questions_over_websocket_while_rtsp_ingests(serve, rtsp_server):
    server = serve()
    camera = rtsp_server(fps=10)
    opened = httpx.post(server.url + "/v1/streams", json={"source": camera.url, "fps": 4, "max_tokens": 6},
                        timeout=60)
    assert opened.status_code == 201, opened.text
    stream_id = opened.json()["id"]
    ws_url = server.url.replace("http://", "ws://") + f"/v1/streams/{stream_id}/ws"
    try:
        with connect(ws_url, subprotocols=["streamvlm"], open_timeout=10) as ws:
            assert ws.subprotocol == "streamvlm"
            hello = json.loads(ws.recv(timeout=10))
            assert hello["type"] == "hello" and hello["stream"]["id"] == stream_id

            def next_message(timeout=30.0) -> dict:
                return json.loads(ws.recv(timeout=timeout))

            seen: list[dict] = []
            answers = []
            frames_at = []
            for n in range(3):
                # wait for more frames in the cache than the last answer saw: ingestion continues
                deadline = time.monotonic() + 30
                while True:
                    message = next_message()
                    seen.append(message)
                    if message["type"] == "status" and message["frames"] > (frames_at[-1] if frames_at else 0):
                        break
                    assert time.monotonic() < deadline, "no new frames were ingested"
                ws.send(json.dumps({"type": "ask", "id": f"q{n}", "question": f"What is on screen now ({n})?"}))
                deltas = []
                while True:
                    message = next_message()
                    seen.append(message)
                    if message.get("id") != f"q{n}":
                        continue
                    assert message["type"] != "error", message
                    if message["type"] == "answer.start":
                        frames_at.append(message["frames"])
                    elif message["type"] == "answer.delta":
                        deltas.append(message["text"])
                    elif message["type"] == "answer.done":
                        answers.append(message)
                        break
                assert "".join(deltas) == answers[-1]["text"]  # streamed piece by piece, then the whole
                assert answers[-1]["stop_reason"] in ("stop_token", "max_new_tokens")
                assert answers[-1]["t"] is not None and answers[-1]["first_token_s"] is not None
            assert frames_at == sorted(frames_at) and frames_at[0] < frames_at[-1]
            assert [a["frames"] for a in answers] == frames_at
            times = [a["t"] for a in answers]
            assert times == sorted(times) and times[0] < times[-1]
            types = {m["type"] for m in seen}
            assert {"status", "frame"} <= types  # figures and preview pictures came alongside
            frame = next(m for m in seen if m["type"] == "frame")
            assert frame["jpeg"].startswith("/9j/")  # base64 of a JPEG's FF D8 FF
        stats = httpx.get(server.url + f"/v1/streams/{stream_id}", timeout=30).json()["stats"]
        assert stats["ingested"] >= frames_at[-1] and stats["session"]["turns"] == 3
        assert stats["error"] is None
    finally:
        assert httpx.delete(server.url + f"/v1/streams/{stream_id}", timeout=60).status_code == 200
    assert httpx.get(server.url + "/v1/streams", timeout=30).json()["data"] == []
