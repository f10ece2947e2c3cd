"""The abuse row of `streamvlm bench serve`: oversized video requests against a running server.

A burst of requests whose video would, decoded naively, take gigabytes: a 4000x3000 source (as a few-KB
data: URI and as a file) and a 1080p one, asked for 1024 and 256 frames (more than any small model's
context: a 400 before decoding) and for the most frames the context holds (a 200: decoded frame by frame,
each resized to the model's input size as it comes). Measured in the server's process: RSS when idle, the
peak RSS during the burst (VmHWM, reset first), RSS after; /health is polled throughout from another
connection and its latency reported.
"""

from __future__ import annotations

import base64
import re
import statistics
import threading
import time
from pathlib import Path

import av
import numpy as np

from streamvlm.bench.common import call
from streamvlm.errors import StreamVLMError
from streamvlm.video.files import write_video

QUESTION = "What is happening in the video?"
BIG = "abuse-4000x3000.mp4"
HD = "abuse-1920x1080.mp4"


def write_abuse_media(folder: Path) -> str:
    """Write the oversized sources into the media folder; returns the 4000x3000 one as a data: URI."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"  # libx264 makes it a few KB
    big = folder / BIG
    if not big.exists():
        write_video(big, np.full((2, 3000, 4000, 3), 90, np.uint8), fps=1, codec=codec)
    if not (folder / HD).exists():
        frames = np.zeros((30, 1080, 1920, 3), np.uint8)
        frames[:, :, :, 1] = np.linspace(0, 255, 30, dtype=np.uint8)[:, None, None]  # a fade: 30 distinct frames
        write_video(folder / HD, frames, fps=30, codec=codec)
    return "data:video/mp4;base64," + base64.b64encode(big.read_bytes()).decode()


def _ask(model_id: str, url: str, video: dict) -> dict:
    return {"model": model_id, "max_tokens": 2, "video": video,
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                      {"type": "text", "text": QUESTION}]}]}


def most_frames(url: str, model_id: str) -> int:
    """The most frames the server's context holds with the bench's question, as its 400 says."""
    status, body = call(url, "POST", "/v1/chat/completions", _ask(model_id, HD, {"num_frames": 1024}))
    match = re.search(r"holds at most (\d+) frames", body.get("error", {}).get("message", ""))
    if status != 400 or match is None:
        raise StreamVLMError(f"bench serve: expected a 400 naming the frame bound, got {status}: {body}")
    return int(match.group(1))


def abuse_requests(model_id: str, data_uri: str, limit: int) -> list[tuple[str, dict, int]]:
    """(what, body, expected status) of one burst."""
    return [
        ("4000x3000 data: URI, num_frames 1024", _ask(model_id, data_uri, {"num_frames": 1024}), 400),
        ("4000x3000 file, num_frames 1024", _ask(model_id, BIG, {"num_frames": 1024}), 400),
        (f"4000x3000 file, num_frames {limit} (the most that fit)", _ask(model_id, BIG, {"num_frames": limit}), 200),
        ("1080p file, num_frames 256", _ask(model_id, HD, {"num_frames": 256}), 400),
        (f"1080p file, num_frames {limit}", _ask(model_id, HD, {"num_frames": limit}), 200),
    ]


def run_abuse(server, model_id: str, media: Path, rounds: int = 3) -> dict:
    """`rounds` bursts against a running ServerProcess whose media folder is `media`."""
    data_uri = write_abuse_media(media)
    limit = most_frames(server.url, model_id)
    requests = abuse_requests(model_id, data_uri, limit)
    call(server.url, "POST", "/v1/chat/completions", requests[-1][1])  # warm-up: first-call paths
    idle = server.rss_bytes()
    server.reset_peak()
    health: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            call(server.url, "GET", "/health", timeout=60)
            health.append(time.perf_counter() - started)
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    results = []
    started = time.perf_counter()
    try:
        for _ in range(rounds):
            for what, body, expected in requests:
                status, reply = call(server.url, "POST", "/v1/chat/completions", body)
                results.append({"request": what, "status": status, "expected": expected,
                                "code": reply.get("error", {}).get("code")})
    finally:
        stop.set()
        poller.join()
    burst_s = time.perf_counter() - started
    return {"requests": results, "rounds": rounds, "frames_limit": limit, "data_uri_bytes": len(data_uri),
            "burst_seconds": burst_s, "rss_idle_bytes": idle, "rss_peak_bytes": server.peak_rss_bytes(),
            "rss_after_bytes": server.rss_bytes(), "health_polls": len(health),
            "health_p50_s": statistics.median(health) if health else None,
            "health_max_s": max(health) if health else None}


def format_abuse(row: dict) -> str:
    lines = [f"abuse: {row['rounds']} bursts of {len(row['requests']) // row['rounds']} oversized video requests "
             f"({row['burst_seconds']:.1f} s; the context holds {row['frames_limit']} frames; the data: URI is "
             f"{row['data_uri_bytes'] / 1024:.1f} KB)", "",
             "| request | status (expected) |", "|---|---|"]
    for r in row["requests"][:len(row["requests"]) // row["rounds"]]:
        statuses = sorted({x["status"] for x in row["requests"] if x["request"] == r["request"]})
        lines.append(f"| {r['request']} | {'/'.join(map(str, statuses))} ({r['expected']}) |")
    mib = 2**20
    lines += ["", "| server RSS idle MiB | peak during MiB | after MiB | /health p50 ms | /health max ms |",
              "|---|---|---|---|---|",
              f"| {row['rss_idle_bytes'] / mib:.0f} | {row['rss_peak_bytes'] / mib:.0f} | "
              f"{row['rss_after_bytes'] / mib:.0f} | {1000 * (row['health_p50_s'] or 0):.1f} | "
              f"{1000 * (row['health_max_s'] or 0):.1f} |"]
    return "\n".join(lines)
