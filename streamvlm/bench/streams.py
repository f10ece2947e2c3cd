"""`streamvlm bench streams`: several live streams at once, their steps batched, against one at a time.

N live sessions (LiveSession: capture and ingest threads each, the default memory budget "auto") over N
copies of a generated video read at full speed (no frame dropped), sampled at --stream-fps, each with a
router of its own:

    one at a time   each stream ingested alone, one after the other (no batching): frames / seconds
    together        all N at once, their language-model steps run by one Batcher (--max-batch N): frames of
                    every stream / seconds until the last is done

Both from the same loaded weights in one run; `speedup` = together's aggregate frames/s over one at a
time's. With --repeats N, N rounds of one at a time then together, back to back: the frames and seconds add up
over the rounds, and each round's own speed-up is reported beside their median. After each stream ends, one
question is asked, so the answers can be compared: batched steps must not change what a stream answers.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from pathlib import Path

from streamvlm.errors import StreamVLMError

logger = logging.getLogger(__name__)

QUESTION = "What is happening in the video right now?"


def _stream(vlm, video: Path, fps: float, new_tokens: int) -> tuple[int, str]:
    """Ingest `video` as a live stream at full speed; (frames ingested, the answer to QUESTION)."""
    from streamvlm.live import LiveSession
    from streamvlm.video.live import FileSource

    with LiveSession(vlm, FileSource(video, fps=fps, speed=0), memory_budget="auto") as live:
        live.wait()
        if live.error is not None:
            raise StreamVLMError(f"bench streams: a stream failed: {live.error}")
        answer = live.ask(QUESTION, max_new_tokens=new_tokens, ignore_stop=True).text
        return live.ingested, answer


def run_streams_bench(model_dir: Path, streams: int, seconds: float, fps: float, new_tokens: int, device,
                      dtype, rounds: int = 1) -> dict:
    from streamvlm.bench.common import bench_video
    from streamvlm.runtime import StreamVLM

    if streams < 2:
        raise StreamVLMError("bench streams: --streams must be at least 2")
    if rounds < 1:
        raise StreamVLMError("bench streams: --repeats must be at least 1")
    vlm = StreamVLM.from_pretrained(model_dir, device=device, dtype=dtype)
    video = bench_video(seconds, fps=8.0, size=128)
    _stream(vlm, video, fps, 1)  # warm-up: first-call paths

    # Rounds of one at a time then together, back to back: a round's ratio compares the two on the same stretch
    # of a noisy machine.
    per_round = [_round(vlm, video, streams, fps, new_tokens) for _ in range(rounds)]
    alone = {k: sum(r["one_at_a_time"][k] for r in per_round) for k in ("frames", "seconds")}
    together = {k: sum(r["together"][k] for r in per_round) for k in ("frames", "seconds", "steps", "batched")}
    alone["frames_per_second"] = alone["frames"] / alone["seconds"]
    together["frames_per_second"] = together["frames"] / together["seconds"]
    together["mean_batch"] = together.pop("batched") / together["steps"] if together["steps"] else 0.0
    del together["steps"]
    speedups = [r["speedup"] for r in per_round]
    result = {"suite": "streams", "model": str(model_dir), "device": str(device),
              "dtype": str(dtype).replace("torch.", ""), "streams": streams, "video_seconds": seconds,
              "stream_fps": fps, "new_tokens": new_tokens, "rounds": rounds,
              "one_at_a_time": alone, "together": together,
              "speedup": together["frames_per_second"] / alone["frames_per_second"],
              "speedup_per_round": speedups, "speedup_median": statistics.median(speedups),
              "same_answers": all(r["same_answers"] for r in per_round)}
    logger.info("%d streams: %.1f frames/s together, %.1f one at a time", streams,
                together["frames_per_second"], alone["frames_per_second"])
    return result


def _round(vlm, video: Path, streams: int, fps: float, new_tokens: int) -> dict:
    """The streams one at a time, then all together, their steps run by one Batcher."""
    from streamvlm.batching import Batcher
    from streamvlm.cores import one_core

    start = time.perf_counter()
    alone = [_stream(vlm.fork(), video, fps, new_tokens) for _ in range(streams)]
    alone_s = time.perf_counter() - start

    batcher = Batcher(max_batch=streams)
    together: list = [None] * streams
    errors: list[BaseException] = []

    def run(i: int) -> None:
        one_core()  # the batcher's step thread computes (streamvlm.cores)
        try:
            together[i] = _stream(vlm.fork().batched(batcher), video, fps, new_tokens)
        except BaseException as e:  # noqa: BLE001 - raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    together_s = time.perf_counter() - start
    batcher.close()
    if errors:
        raise errors[0]
    frames_alone, frames_together = sum(f for f, _ in alone), sum(f for f, _ in together)
    return {"one_at_a_time": {"frames": frames_alone, "seconds": alone_s},
            "together": {"frames": frames_together, "seconds": together_s, "steps": batcher.steps,
                         "batched": batcher.batched},
            "speedup": (frames_together / together_s) / (frames_alone / alone_s),
            "same_answers": [a for _, a in alone] == [a for _, a in together]}


def format_streams(result: dict) -> str:
    one, many = result["one_at_a_time"], result["together"]
    return "\n".join([
        f"bench streams: {result['streams']} live streams of a {result['video_seconds']:g} s video at "
        f"{result['stream_fps']:g} fps, read at full speed; {result['model']}, {result['device']} {result['dtype']}",
        "| ingest | frames | seconds | frames/s |", "|---|---|---|---|",
        f"| one at a time | {one['frames']} | {one['seconds']:.2f} | {one['frames_per_second']:.1f} |",
        f"| together, batched (mean batch {many['mean_batch']:.2f}) | {many['frames']} | {many['seconds']:.2f} | "
        f"{many['frames_per_second']:.1f} |",
        f"speed-up {result['speedup']:.2f}x; the same answers: {'yes' if result['same_answers'] else 'NO'}",
    ] + ([f"{result['rounds']} rounds, each one at a time then together: speed-ups "
          + ", ".join(f"{x:.2f}x" for x in result["speedup_per_round"]) + f" (median {result['speedup_median']:.2f}x)"]
         if result["rounds"] > 1 else []))
