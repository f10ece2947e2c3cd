"""`streamvlm bench serve`: the HTTP server under load, and live sessions at stream ages, measured from a
client on 127.0.0.1 in one run.

    load   `streamvlm serve` in its own process, once per --max-batch value (e.g. 1,8: the same server
           without and with batching); C client threads (C in --clients, e.g. 1,4,16) each send video
           questions (POST /v1/chat/completions) back to back until --requests have completed, in two
           workloads:
             built-in      the built-in model, a --video-seconds clip, 8 frames, up to --new-tokens tokens
                           (its answers are a word or two);
             decode-heavy  a random real-small-shaped checkpoint (12 layers, hidden 640), 2 frames, 64
                           answer tokens with the end token ignored (vLLM's ignore_eos).
           Requests per second = completed / wall seconds; tokens per second = answer tokens / wall
           seconds; latency percentiles over the requests.
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


HEAVY_TOKENS = 64
HEAVY_FRAMES = 2


def run_load(url: str, model_id: str, clients: int, requests: int, new_tokens: int, frames: int = 8,
             ignore_eos: bool = False, min_seconds: float = 0.0) -> dict:
    """`clients` threads sending questions back to back until `requests` were sent and `min_seconds` have passed
    (a row of the built-in model's 10 ms answers would otherwise time a burst of a tenth of a second)."""
    body = {"model": model_id, "max_tokens": new_tokens, "video": {"num_frames": frames}, "ignore_eos": ignore_eos,
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}},
                                                      {"type": "text", "text": QUESTION}]}]}
    latencies: list[float] = []
    tokens: list[int] = []
    failures: list[str] = []
    sent = [0]
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if sent[0] >= requests and time.perf_counter() >= until:
                    return
                sent[0] += 1
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
    until = start + min_seconds
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        logger.warning("%d of %d requests failed, first: %s", len(failures), sent[0], failures[0])
    row = {"clients": clients, "requests": sent[0], "completed": len(latencies), "failed": len(failures),
           "wall_seconds": wall, "requests_per_second": len(latencies) / wall,
           "tokens_per_second": sum(tokens) / wall,
           "mean_completion_tokens": statistics.fmean(tokens) if tokens else 0.0}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        row[f"latency_{name}_s"] = _percentile(latencies, q) if latencies else None
    logger.info("%d clients: %.2f req/s, p50 %.3f s", clients, row["requests_per_second"], row["latency_p50_s"] or 0)
    return row


def _with_prefix(server, load) -> dict:
    """`load()`'s row with the prefix cache's hits and misses during it (both 0 when the cache is off)."""
    def counts():
        cache = call(server.url, "GET", "/health")[1].get("prefix_cache") or {}
        return cache.get("hits", 0), cache.get("misses", 0)

    hits, misses = counts()
    row = load()
    after = counts()
    return dict(row, prefix_hits=after[0] - hits, prefix_misses=after[1] - misses)


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
                    new_tokens: int, video_seconds: float, workers: int, abuse_rounds: int = 3,
                    max_batches: list[int] | None = None, heavy: bool = True,
                    heavy_model: Path | None = None, prefix_cache_mb: float | None = None,
                    min_seconds: float = 0.0) -> dict:
    """Load rows for each --max-batch (built-in, then decode-heavy); live ages and abuse rounds against the
    last --max-batch's server. prefix_cache_mb: the servers' --prefix-cache-mb (None: their default; every
    request asks about the same clip, so with the cache on each server ingests it once, in the warm-up).
    min_seconds: each load row sends requests until it has sent `requests` and this long has passed."""
    from streamvlm.bench.abuse import run_abuse
    from streamvlm.bench.common import bench_model_dir, bench_video
    from streamvlm.world.builtin import default_model_dir
    from streamvlm.serve.process import ServerProcess

    max_batches = max_batches or [1, 8]
    if not clients or any(c < 1 for c in clients) or requests < 1 or workers < 1 or any(b < 1 for b in max_batches):
        raise StreamVLMError("--clients, --requests, --workers and --max-batch must be positive")
    model = Path(model_dir) if model_dir else default_model_dir()
    load: list[dict] = []
    live: list[dict] = []
    abuse = None
    # Measured first, while this process has run nothing else (see examples/openmp_teams.py).
    parts = {}
    if 1 in max_batches and max(max_batches) > 1:
        parts["built-in"] = batching_parts(model, 8, max(max_batches))
    if heavy and parts:
        parts["decode-heavy"] = batching_parts(heavy_model or bench_model_dir(), HEAVY_FRAMES, max(max_batches))
    with tempfile.TemporaryDirectory(prefix="streamvlm-bench-serve-") as tmp:
        media = Path(tmp)
        shutil.copy(bench_video(video_seconds, fps=8.0, size=128), media / "clip.mp4")

        def start(checkpoint: Path, batch: int) -> ServerProcess:
            cache = [] if prefix_cache_mb is None else ["--prefix-cache-mb", f"{prefix_cache_mb:g}"]
            return ServerProcess(["--model", str(checkpoint), "--model-name", "bench", "--workers", str(workers),
                                  "--max-batch", str(batch), "--max-sessions", "2", *cache],
                                 log_path=media / f"server-{batch}.log", media_dir=media)

        for batch in max_batches:
            server = start(model, batch)
            try:
                rss_start = server.rss_bytes()
                run_load(server.url, "bench", 1, 2, new_tokens)  # warm-up: first-call paths, worker threads
                load += [dict(_with_prefix(server, lambda c=c: run_load(server.url, "bench", c, max(requests, c),
                                                                        new_tokens, min_seconds=min_seconds)),
                              workload="built-in", max_batch=batch) for c in clients]
                if batch == max_batches[-1]:
                    live = [run_live_age(server.url, media, age, stream_fps, new_tokens) for age in ages]
                    rss_end = server.rss_bytes()
                    abuse = run_abuse(server, "bench", media, abuse_rounds) if abuse_rounds else None
            finally:
                server.stop()
            if not heavy:
                continue
            server = start(heavy_model or bench_model_dir(), batch)
            try:
                run_load(server.url, "bench", 1, 1, HEAVY_TOKENS, HEAVY_FRAMES, ignore_eos=True)  # warm-up
                load += [dict(_with_prefix(server, lambda c=c: run_load(server.url, "bench", c, max(requests, c),
                                                                        HEAVY_TOKENS, HEAVY_FRAMES, ignore_eos=True,
                                                                        min_seconds=min_seconds)),
                              workload="decode-heavy", max_batch=batch) for c in clients]
            finally:
                server.stop()
    ratios = _batching_ratios(load, max_batches)
    for ratio in ratios:  # what batching can gain at most on each workload, with the answers' mean length
        rows = [r for r in load if r["workload"] == ratio["workload"] and r["max_batch"] == 1]
        tokens = sum(r["mean_completion_tokens"] for r in rows) / len(rows)
        kept = all(r["prefix_hits"] and not r["prefix_misses"] for r in rows)  # each request forked the kept clip
        ratio["bound"] = batching_bound(parts[ratio["workload"]], tokens, kept)
    return {"suite": "serve", "model": str(model), "workers": workers, "prefix_cache_mb": prefix_cache_mb,
            "video_seconds": video_seconds, "min_seconds": min_seconds,
            "frames_per_request": 8, "new_tokens": new_tokens, "max_batches": max_batches, "load": load,
            "batching": ratios, "live": live,
            "server_rss_start_bytes": rss_start, "server_rss_end_bytes": rss_end, "abuse": abuse}


def batching_parts(model_dir: Path, frames: int, batch: int, repeats: int = 5) -> dict:
    """What batching's bound (`batching_bound`) is made of, measured in this process: the seconds of a request's
    ingest and prefill (a 1-token answer), and the ms of a decode step alone and of one step of `batch`."""
    import torch

    from streamvlm.decoder import Work, forward_batch
    from streamvlm.runtime import StreamVLM
    from streamvlm.sequence import TextPiece

    vlm = StreamVLM.from_pretrained(model_dir)
    size = vlm.adapter.preprocess_config
    clip = torch.randint(0, 256, (frames, size.height, size.width, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))

    def answered():
        session = vlm.session()
        session.append_frames(clip)
        session.ask(QUESTION, max_new_tokens=1, ignore_stop=True)
        return session

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    prefill_s = timed(answered)
    kept = vlm.session()
    kept.append_frames(clip)
    # what a request costs whose video a kept session holds (the server's prefix cache): a fork and its question
    question_s = timed(lambda: kept.fork().ask(QUESTION, max_new_tokens=1, ignore_stop=True))
    sessions = [answered() for _ in range(batch)]

    def work(session) -> Work:
        return Work(session._decoder, session._seq.place([TextPiece((5,))]), session.cache, session.flops, "last")

    question = tuple(vlm.tokenizer(QUESTION, add_special_tokens=False)["input_ids"])

    def asked(session) -> Work:  # a question's prefill
        return Work(session._decoder, session._seq.place([TextPiece(question)]), session.cache, session.flops, "last")

    with torch.inference_mode():
        alone_ms = timed(lambda: forward_batch([work(sessions[0])])) * 1e3
        step_ms = timed(lambda: forward_batch([work(s) for s in sessions])) * 1e3
        question_alone_ms = timed(lambda: forward_batch([asked(sessions[0])])) * 1e3
        question_step_ms = timed(lambda: forward_batch([asked(s) for s in sessions])) * 1e3
    return {"frames": frames, "batch": batch, "prefill_s": prefill_s, "question_s": question_s,
            "question_ms_alone": question_alone_ms, "question_ms_batched_step": question_step_ms,
            "decode_ms_alone": alone_ms,
            "decode_ms_batched_step": step_ms, "decode_step_gain": batch * alone_ms / step_ms}


def batching_bound(parts: dict, tokens: float, kept: bool = False) -> dict:
    """What batching can gain at most on a workload of `tokens`-token answers (Amdahl). A request alone costs
    its ingest and prefill (with `kept`, the server's prefix cache holds the video, and a request costs a fork
    and its question instead), then tokens - 1 decode steps. In full batches its question's prefill and each
    decode step cost 1/batch of a batched step, and the rest (the video's ingest, the fork) as much as alone: a
    batch makes the frames' compute-bound prefill no cheaper. bound = alone / batched: what sharing the model's
    steps can gain. Video decoding and HTTP are left out; they get no cheaper either, but the batched server
    overlaps one request's with another's model work, which a one-worker server does not, so where they are a
    large share of a request (the built-in model's) the server can pass this bound."""
    steps = max(0.0, tokens - 1)
    fixed = parts["question_s"] if kept else parts["prefill_s"]
    shared_fixed = fixed + (parts["question_ms_batched_step"] / parts["batch"] - parts["question_ms_alone"]) / 1e3
    alone = fixed + steps * parts["decode_ms_alone"] / 1e3
    batched = max(0.0, shared_fixed) + steps * parts["decode_ms_batched_step"] / parts["batch"] / 1e3
    return dict(parts, tokens=tokens, kept=kept, bound=alone / batched)


def _batching_ratios(load: list[dict], max_batches: list[int]) -> list[dict]:
    """Per workload, the largest --max-batch against 1, measured in this run: tokens/s and requests/s at
    the most clients, p50 latency at the fewest."""
    if 1 not in max_batches or max(max_batches) == 1:
        return []
    top = max(max_batches)
    ratios = []
    for workload in dict.fromkeys(row["workload"] for row in load):
        rows = {(r["max_batch"], r["clients"]): r for r in load if r["workload"] == workload}
        most, fewest = max(c for _, c in rows), min(c for _, c in rows)
        one, many = rows[(1, most)], rows[(top, most)]
        ratios.append({"workload": workload, "max_batch": top, "clients": most,
                       "tokens_per_second": many["tokens_per_second"] / one["tokens_per_second"],
                       "requests_per_second": many["requests_per_second"] / one["requests_per_second"],
                       "p50_at_clients": fewest,
                       "latency_p50": rows[(top, fewest)]["latency_p50_s"] / rows[(1, fewest)]["latency_p50_s"]})
    return ratios


def format_serve(result: dict) -> str:
    lines = [(f"server: {result['model']} ({result['workers']} worker(s)); built-in: "
              f"{result['video_seconds']:g} s clip, {result['frames_per_request']} frames, "
              f"up to {result['new_tokens']} answer tokens; decode-heavy: real-small-shaped random checkpoint, "
              f"{HEAVY_FRAMES} frames, {HEAVY_TOKENS} tokens, end token ignored"), "",
             "| workload | max batch | clients | requests | req/s | tokens/s | p50 s | p90 s | p99 s | failed | "
             "prefix hits/misses |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["load"]:
        lines.append(f"| {r.get('workload', 'built-in')} | {r.get('max_batch', 1)} | {r['clients']} | "
                     f"{r['completed']} | {r['requests_per_second']:.2f} | {r['tokens_per_second']:.1f} | "
                     f"{r['latency_p50_s']:.3f} | {r['latency_p90_s']:.3f} | {r['latency_p99_s']:.3f} | "
                     f"{r['failed']} | {r.get('prefix_hits', 0)}/{r.get('prefix_misses', 0)} |")
    if result.get("batching"):
        lines += ["", "| workload | batched vs --max-batch 1 | tokens/s | req/s | p50 latency | at most (Amdahl) |",
                  "|---|---|---|---|---|---|"]
        for r in result["batching"]:
            bound = r.get("bound")
            lines.append(f"| {r['workload']} | {r['max_batch']} vs 1 at {r['clients']} clients (p50 at "
                         f"{r['p50_at_clients']}) | {r['tokens_per_second']:.2f}x | {r['requests_per_second']:.2f}x "
                         f"| {r['latency_p50']:.2f}x | " + (f"{bound['bound']:.2f}x" if bound else "") + " |")
        for r in result["batching"]:
            if r.get("bound"):
                b = r["bound"]
                fixed = (f"{b['question_s']:.3f} s of a kept video's fork and the question" if b.get("kept") else
                         f"{b['prefill_s']:.3f} s of ingest and prefill")
                lines.append(f"{r['workload']}: a request alone is {fixed} and "
                             f"{b['tokens'] - 1:.1f} decode steps of {b['decode_ms_alone']:.1f} ms; a step of "
                             f"{b['batch']} takes {b['decode_ms_batched_step']:.1f} ms ({b['decode_step_gain']:.2f}x "
                             f"the tokens per second), and {b['batch']} questions' prefill "
                             f"{b['question_ms_batched_step']:.1f} ms against {b['question_ms_alone']:.1f} ms for "
                             f"one, so sharing steps gains at most {b['bound']:.2f}x")
    lines += ["", "| stream age | frames ingested | ingest fps | TTFT (client) s | answer s | KV MiB |",
              "|---|---|---|---|---|---|"]
    for r in result["live"]:
        lines.append(f"| {r['age_minutes']:g} min | {r['frames_ingested']} | {r['ingest_fps']:.1f} | "
                     f"{r['ttft_s']:.3f} | {r['answer_s']:.3f} | {r['kv_bytes'] / 2**20:.2f} |")
    if result.get("abuse"):
        from streamvlm.bench.abuse import format_abuse

        lines += ["", format_abuse(result["abuse"])]
    return "\n".join(lines)
