"""`streamvlm bench stream`: a long stream, simulated from a file at full speed, per model size.

For each model:

    ours    a LiveSession (capture and ingest threads, memory budget) over a generated video file read as
            fast as the model takes it (no frame dropped), sampled at --stream-fps. When the stream reaches
            each age (minutes), questions are asked while ingestion goes on, and timed at each
            Sustained ingest rate = frames / seconds spent ingesting (answering excluded).
    theirs  what people do with transformers today: for each question, run the model on every frame
            sampled so far plus the question (the processor's prompt: vision tower on all frames, then
            prefill); the time to the first token's logits. Same loaded weights, same machine, same run.
            When the frames so far do not fit the model's context, they are thinned uniformly to the most
            that fit (reported as baseline_frames), as a user would have to.

Memory: the process's peak resident set (and CUDA's peak allocation) after the streaming phase, before the
baseline runs; the KV cache's bytes at each age. The frames for the baseline are kept at the file's
resolution (small) and preprocessed only when the baseline runs.
"""

from __future__ import annotations

import logging
import resource
import statistics
import threading
import time
from pathlib import Path

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.kernels import stock_linears

logger = logging.getLogger(__name__)

QUESTION = "What is happening in the video right now?"


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class _Recorder:
    """A Source over another that keeps every frame (small, at the file's resolution) for the baseline."""

    def __init__(self, inner):
        self.inner, self.name, self.paced = inner, inner.name, inner.paced
        self.recorded: list[torch.Tensor] = []

    def frames(self, stop, on_event=None):
        for frame in self.inner.frames(stop, on_event):
            self.recorded.append(frame.frame)
            yield frame


def run_ours(vlm, video: Path, fps: float, ages_s: list[float], memory_budget, new_tokens: int,
             asks: int = 3) -> dict:
    """Stream the video through a LiveSession; ask at each age. Returns rows and the recorded frames."""
    from streamvlm.live import LiveSession
    from streamvlm.video.live import FileSource

    source = _Recorder(FileSource(video, fps=fps, speed=0))
    reached = threading.Condition()
    state = {"t": -1.0}

    def on_event(event):
        if event["type"] in ("ingested", "done"):
            with reached:
                state["t"] = event["t"] if event["type"] == "ingested" else float("inf")
                reached.notify_all()

    live = LiveSession(vlm, source, memory_budget=memory_budget, on_event=on_event, max_new_tokens=new_tokens,
                       ignore_stop=True)
    rows, answering = [], 0.0
    start = time.perf_counter()
    with live:
        with reached:
            reached.wait_for(lambda: state["t"] >= 0)
        live.ask(QUESTION)  # warm-up, untimed
        for age in ages_s:
            with reached:
                reached.wait_for(lambda: state["t"] >= age - 1e-6)
            if live.error is not None:
                raise StreamVLMError(f"the stream failed: {live.error}")
            # The first ask races the ingest thread encoding its next batch; the median of three is the
            # cost of a question itself (each ask adds its turn to the cache, a few dozen tokens).
            answers = [live.ask(QUESTION) for _ in range(asks)]
            answering += sum(a.seconds for a in answers)
            stats = live.stats()
            rows.append({"age_s": age, "t": answers[0].t, "frames": answers[0].frames,
                         "ours_ttft_s": statistics.median(a.first_token_s for a in answers),
                         "ours_answer_s": statistics.median(a.seconds for a in answers),
                         "kv_bytes": stats["session"]["kv_bytes"], "rss_bytes": _rss_bytes()})
            logger.info("age %.0f s: %d frames, first token in %.3f s", age, rows[-1]["frames"],
                        rows[-1]["ours_ttft_s"])
        live.stop()
    wall = time.perf_counter() - start
    return {"rows": rows, "frames": source.recorded, "ingested": live.ingested, "ingest_s": wall - answering,
            "peak_rss_bytes": _peak_rss_bytes(), "kv_bytes_peak": live.stats()["session"]["kv_bytes_peak"],
            "tokens_per_frame": vlm.tokens_per_frame}


@torch.inference_mode()
def run_theirs(vlm, frames: list[torch.Tensor]) -> tuple[float, int]:
    """transformers' forward over all frames so far (thinned to fit the context) and the question, to the
    first token's logits. Returns (seconds, frames used)."""
    hf = vlm.adapter.model
    tpf = vlm.tokens_per_frame
    prompt = vlm.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
        tokenize=False, add_generation_prompt=True)
    text_tokens = len(vlm.tokenizer(prompt)["input_ids"]) + 1
    fit = max(1, (vlm.adapter.decoder.max_positions - text_tokens - 1) // tpf)
    if len(frames) > fit:
        frames = [frames[i] for i in (torch.arange(fit) * len(frames) // fit).tolist()]
    video_token = vlm.adapter.video_token
    text = prompt.replace(video_token, video_token * (len(frames) * tpf + 1))
    input_ids = vlm.tokenizer(text, return_tensors="pt")["input_ids"].to(vlm.adapter.device)
    start = time.perf_counter()
    pixels = vlm.preprocess(torch.stack(frames))  # part of their cost: every call prepares every frame
    with stock_linears():  # their linear layers as transformers runs them (F.linear)
        hf(input_ids=input_ids, pixel_values_videos=pixels[None], use_cache=True, logits_to_keep=1)
    if vlm.adapter.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, len(frames)


def run_stream_bench(models: dict[str, Path], ages_min: list[float], fps: float, memory_budget, new_tokens: int,
                     baseline: bool, device, dtype) -> dict:
    from streamvlm.runtime import StreamVLM

    if not ages_min or any(a <= 0 for a in ages_min):
        raise StreamVLMError("--ages must be positive minutes, e.g. 1,10,60")
    ages_s = sorted(a * 60 for a in ages_min)
    from streamvlm.bench.common import bench_video, require_llava

    video = bench_video(ages_s[-1] + 1 / fps, fps, size=64)  # a frame past the last age
    results = []
    for name, model_dir in models.items():
        vlm = StreamVLM.from_pretrained(model_dir, device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ours = run_ours(vlm, video, fps, ages_s, memory_budget, new_tokens)
        cuda_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        frames = ours["frames"]
        if baseline:
            require_llava(vlm, "stream (the transformers baseline)")
            run_theirs(vlm, frames[:2])  # warm-up, untimed
        for row in ours["rows"]:
            if baseline:
                row["theirs_ttft_s"], row["baseline_frames"] = run_theirs(vlm, frames[:row["frames"]])
                row["ttft_ratio"] = row["theirs_ttft_s"] / row["ours_ttft_s"]
                logger.info("%s at %.0f s: transformers %.3f s on %d frames", name, row["age_s"], row["theirs_ttft_s"],
                            row["baseline_frames"])
        parts = vlm.adapter.decoder
        results.append({
            "model": name, "dir": str(model_dir), "layers": parts.num_layers, "hidden": parts.hidden_size,
            "tokens_per_frame": vlm.tokens_per_frame, "context": parts.max_positions,
            "ingest_fps": ours["ingested"] / ours["ingest_s"], "frames": ours["ingested"],
            "peak_rss_bytes": ours["peak_rss_bytes"], "cuda_peak_bytes": cuda_peak,
            "kv_bytes_peak": ours["kv_bytes_peak"], "rows": ours["rows"],
        })
        del vlm, ours, frames
    return {"suite": "stream", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "torch_threads": torch.get_num_threads(), "fps": fps, "ages_min": sorted(ages_min),
            "memory_budget": memory_budget, "new_tokens": new_tokens, "video": str(video), "models": results}


def format_stream(result: dict) -> str:
    lines = [f"bench stream: {result['fps']:g} fps from a file at full speed, memory budget "
             f"{result['memory_budget']}, {result['device']} {result['dtype']}"]
    for m in result["models"]:
        lines.append(f"{m['model']}: {m['layers']} layers, hidden {m['hidden']}, {m['tokens_per_frame']} tokens/frame; "
                     f"ingest {m['ingest_fps']:.1f} frames/s sustained over {m['frames']} frames; peak RSS "
                     f"{m['peak_rss_bytes'] / 2**30:.2f} GiB, KV peak {m['kv_bytes_peak'] / 2**20:.1f} MiB")
        lines.append(f"  {'age':>7}{'frames':>8}{'ours TTFT s':>13}{'KV MiB':>9}{'transformers s':>16}"
                     f"{'on frames':>11}{'ratio':>8}")
        for r in m["rows"]:
            theirs = (f"{r['theirs_ttft_s']:>16.3f}{r['baseline_frames']:>11}{r['ttft_ratio']:>7.1f}x"
                      if "theirs_ttft_s" in r else "")
            lines.append(f"  {r['age_s'] / 60:>6.1f}m{r['frames']:>8}{r['ours_ttft_s']:>13.3f}"
                         f"{r['kv_bytes'] / 2**20:>9.2f}{theirs}")
    return "\n".join(lines)
