"""`streamvlm bench serve`: the HTTP server under load, and live sessions at stream ages, measured from a
client on 127.0.0.1 in one run.

    load   `streamvlm serve` in its own process; C client threads (C in --clients, e.g. 1,4,16) each send
           short video questions (POST /v1/chat/completions: a --video-seconds clip from the media folder,
           8 frames, --new-tokens answer tokens) back to back until --requests have completed.
           Requests per second = completed / wall seconds; latency percentiles over the requests.
    live   for each age A in --ages (minutes): a generated video of A minutes is opened as a live stream
           (POST /v1/streams, --stream-fps, read at full speed so the bench does not wait A minutes of
           wall time), and once all of it is in the cache a question is sent over the WebSocket. Time to
           first token = from sending the question to the first answer.delta message, as the client sees it.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from streamvlm.bench.common import call
from streamvlm.errors import StreamVLMError

logger = logging.getLogger(__name__)

QUESTION = "What is happening in the video?"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_load(url: str, model_id: str, clients: int, requests: int, new_tokens: int) -> dict:
    """`clients` threads sending questions back to back until `requests` completed."""
    body = {"model": model_id, "max_tokens": new_tokens, "video": {"num_frames": 8},
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}},
                                                      {"type": "text", "text": QUESTION}]}]}
    latencies: list[float] = []
    tokens: list[int] = []
    failures: list[str] = []
    left = [requests]
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            start = time.perf_counter()
            try:
                status, reply = call(url, "POST", "/v1/chat/completions", body)
            except OSError as e:
                status, reply = 0, {"error": {"message": str(e)}}
            took = time.perf_counter() - start
            with lock:
                if status == 200:
                    latencies.append(took)
                    tokens.append(reply["usage"]["completion_tokens"])
                else:
                    failures.append(f"{status}: {reply.get('error', {}).get('message')}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        logger.warning("%d of %d requests failed, first: %s", len(failures), requests, failures[0])
    row = {"clients": clients, "requests": requests, "completed": len(latencies), "failed": len(failures),
           "wall_seconds": wall, "requests_per_second": len(latencies) / wall,
           "mean_completion_tokens": statistics.fmean(tokens) if tokens else 0.0}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        row[f"latency_{name}_s"] = _percentile(latencies, q) if latencies else None
    logger.info("%d clients: %.2f req/s, p50 %.3f s", clients, row["requests_per_second"], row["latency_p50_s"] or 0)
    return row


def run_live_age(url: str, media: Path, minutes: float, fps: float, new_tokens: int) -> dict:
    """Open an `minutes`-long file as a live stream at full speed, wait until it is all in the cache, ask."""
    from websockets.sync.client import connect

    from streamvlm.bench.common import bench_video
    from streamvlm.video.files import probe_video

    video = bench_video(minutes * 60, fps=fps, size=128)
    name = f"age-{minutes:g}min.mp4"
    if not (media / name).exists():
        shutil.copy(video, media / name)  # a link would lead out of the media folder, which the server refuses
    frames_total = round(probe_video(video)["duration"] * fps)
    status, opened = call(url, "POST", "/v1/streams", {"source": name, "fps": fps, "speed": 0,
                                                      "max_tokens": new_tokens})
    if status != 201:
        raise StreamVLMError(f"bench serve: opening the stream failed: {opened}")
    stream_id = opened["id"]
    try:
        started = time.perf_counter()
        while True:
            stats = call(url, "GET", f"/v1/streams/{stream_id}")[1]["stats"]
            if stats["done"]:
                break
            time.sleep(0.1)
        ingest_s = time.perf_counter() - started
        if stats["error"]:
            raise StreamVLMError(f"bench serve: the stream failed: {stats['error']}")
        ws_url = url.replace("http://", "ws://") + f"/v1/streams/{stream_id}/ws"
        with connect(ws_url, open_timeout=30, max_size=None) as ws:
            sent = time.perf_counter()
            ws.send(json.dumps({"type": "ask", "id": "bench", "question": QUESTION}))
            first = None
            while True:
                message = json.loads(ws.recv(timeout=300))
                if message.get("id") != "bench":
                    continue
                if message["type"] == "answer.delta" and first is None:
                    first = time.perf_counter() - sent
                elif message["type"] == "answer.done":
                    done = message
                    break
                elif message["type"] == "error":
                    raise StreamVLMError(f"bench serve: the question failed: {message['message']}")
            answer_s = time.perf_counter() - sent
        session = call(url, "GET", f"/v1/streams/{stream_id}")[1]["stats"]["session"]
    finally:
        call(url, "DELETE", f"/v1/streams/{stream_id}")
    return {"age_minutes": minutes, "stream_fps": fps, "frames_in_video": frames_total,
            "frames_ingested": stats["ingested"], "ingest_seconds": ingest_s,
            "ingest_fps": stats["ingested"] / ingest_s if ingest_s else None,
            "ttft_s": first if first is not None else answer_s, "answer_s": answer_s,
            "server_first_token_s": done["first_token_s"], "answer_tokens_max": new_tokens,
            "kv_bytes": session["kv_bytes"], "evicted_entries": session["evicted_entries"],
            "cache_tokens": session["tokens"]}


def run_serve_bench(model_dir: Path | None, clients: list[int], requests: int, ages: list[float], stream_fps: float,
                    new_tokens: int, video_seconds: float, workers: int, abuse_rounds: int = 3) -> dict:
    from streamvlm.bench.abuse import run_abuse
    from streamvlm.bench.common import bench_video
    from streamvlm.world.builtin import default_model_dir
    from streamvlm.serve.process import ServerProcess

    if not clients or any(c < 1 for c in clients) or requests < 1 or workers < 1:
        raise StreamVLMError("--clients, --requests and --workers must be positive")
    model = Path(model_dir) if model_dir else default_model_dir()
    with tempfile.TemporaryDirectory(prefix="streamvlm-bench-serve-") as tmp:
        media = Path(tmp)
        shutil.copy(bench_video(video_seconds, fps=8.0, size=128), media / "clip.mp4")
        server = ServerProcess(["--model", str(model), "--model-name", "bench", "--workers", str(workers),
                                "--max-sessions", "2"], log_path=media / "server.log", media_dir=media)
        try:
            rss_start = server.rss_bytes()
            run_load(server.url, "bench", 1, 2, new_tokens)  # warm-up: first-call paths, worker threads
            load = [run_load(server.url, "bench", c, max(requests, c), new_tokens) for c in clients]
            live = [run_live_age(server.url, media, age, stream_fps, new_tokens) for age in ages]
            rss_end = server.rss_bytes()
            abuse = run_abuse(server, "bench", media, abuse_rounds) if abuse_rounds else None
        finally:
            server.stop()
    return {"suite": "serve", "model": str(model), "workers": workers, "video_seconds": video_seconds,
            "frames_per_request": 8, "new_tokens": new_tokens, "load": load, "live": live,
            "server_rss_start_bytes": rss_start, "server_rss_end_bytes": rss_end, "abuse": abuse}


def format_serve(result: dict) -> str:
    lines = [(f"server: {result['model']} ({result['workers']} worker(s)); short questions: "
              f"{result['video_seconds']:g} s clip, {result['frames_per_request']} frames, "
              f"up to {result['new_tokens']} answer tokens"), "",
             "| clients | requests | req/s | p50 s | p90 s | p99 s | failed |", "|---|---|---|---|---|---|---|"]
    for r in result["load"]:
        lines.append(f"| {r['clients']} | {r['completed']} | {r['requests_per_second']:.2f} | "
                     f"{r['latency_p50_s']:.3f} | {r['latency_p90_s']:.3f} | {r['latency_p99_s']:.3f} | "
                     f"{r['failed']} |")
    lines += ["", "| stream age | frames ingested | ingest fps | TTFT (client) s | answer s | KV MiB |",
              "|---|---|---|---|---|---|"]
    for r in result["live"]:
        lines.append(f"| {r['age_minutes']:g} min | {r['frames_ingested']} | {r['ingest_fps']:.1f} | "
                     f"{r['ttft_s']:.3f} | {r['answer_s']:.3f} | {r['kv_bytes'] / 2**20:.2f} |")
    if result.get("abuse"):
        from streamvlm.bench.abuse import format_abuse

        lines += ["", format_abuse(result["abuse"])]
    return "\n".join(lines)
