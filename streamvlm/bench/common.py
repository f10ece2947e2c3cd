"""Helpers every bench shares: timing, the matmul reference, the checkpoints and videos they run on."""

from __future__ import annotations

import http.client
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import torch

from streamvlm.errors import StreamVLMError

logger = logging.getLogger(__name__)


def _timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` timed calls of fn after one untimed warm-up (allocator, kernels, caches)."""
    return statistics.median(timed_rounds({"fn": fn}, repeats)["fn"])


def timed_rounds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """{name: seconds of each round}: every fn once untimed (warm-up), then `repeats` rounds that each time
    every fn once, in turn. Interleaved so that the phases of one round meet the same machine: a ratio of two
    phases within a round holds where blocks of one phase's repeats would each catch a different stretch of a
    noisy machine's drift."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return times


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, size: int = 2048) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = _timed(lambda: a @ b, 5)
    return 2 * size**3 / seconds


def bench_model_dir() -> Path:
    """A random checkpoint with the shape of a real small model, cached between runs."""
    from streamvlm.tiny import TinySpec, write_tiny_checkpoint
    from streamvlm.paths import cache_dir

    target = cache_dir() / "bench-real-small"
    if not (target / "config.json").is_file():
        logger.info("writing a random real-small-shaped checkpoint to %s", target)
        write_tiny_checkpoint(target, TinySpec.real_small())
    return target


def stream_tiny_dir() -> Path:
    """The built-in model's decoder with a context long enough for an hour at 1 fps (16 tokens a frame), so
    the transformers baseline can take every frame; cached between runs."""
    from streamvlm.tiny import TinySpec, write_tiny_checkpoint
    from streamvlm.paths import cache_dir

    target = cache_dir() / "bench-tiny-long-context"
    if not (target / "config.json").is_file():
        write_tiny_checkpoint(target, TinySpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                               intermediate_size=256, image_size=56, patch_size=8,
                                               max_position_embeddings=131072))
    return target


def require_llava(vlm, what: str) -> None:
    """The benches that time transformers' own forward next to ours build its inputs the LLaVA-OneVision way."""
    if vlm.adapter.family != "llava_onevision":
        raise StreamVLMError(f"bench {what} times transformers' LLaVA-OneVision forward next to ours; "
                             f"{vlm.adapter.family} checkpoints are not supported there yet (bench routing is)")


def bench_video(seconds: float = 60, fps: float = 8.0, size: int = 256) -> Path:
    """A procedurally drawn video (a moving disc and square on a slowly changing background), cached.

    Drawn in slices, so an hour at 1 fps (3600 frames) needs little memory before encoding."""
    from streamvlm.video.files import write_video
    from streamvlm.paths import cache_dir

    count = max(1, round(seconds * fps))
    target = cache_dir() / f"bench-{count}f-{fps:g}fps-{size}px.mp4"
    if target.is_file():
        return target
    scale = size / 256
    y, x = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    frames = torch.empty(count, size, size, 3, dtype=torch.uint8)
    for start in range(0, count, 512):
        t = torch.arange(start, min(start + 512, count), dtype=torch.float32)[:, None, None]
        block = torch.zeros(t.shape[0], size, size, 3)
        block[..., 2] = 60 + 40 * torch.sin(t / 40)
        cx, cy = (t * 3 * scale) % size, size / 2 + 80 * scale * torch.sin(t / 25)
        block[..., 0] += 255 * (((x - cx) ** 2 + (y - cy) ** 2) < (30 * scale) ** 2)
        block[..., 1] += 200 * ((x - (size - 1 - cx)).abs() < 20 * scale) * ((y - 60 * scale).abs() < 20 * scale)
        frames[start:start + t.shape[0]] = block.clamp(0, 255).to(torch.uint8)
    tmp = target.with_suffix(".tmp.mp4")
    write_video(tmp, frames, fps=fps)
    tmp.replace(target)
    return target


def call(url: str, method: str, path: str, body: dict | None = None, timeout: float = 300) -> tuple[int, dict]:
    """One request on a fresh connection (as a new client would): (status, JSON body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, None if body is None else json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()
