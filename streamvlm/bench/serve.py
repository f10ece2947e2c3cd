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
    # decode forwards after the prompt's: one per token, the last one's run to see the end token (finish
    # "stop"); a request cut at max_tokens never feeds its last token, so it runs one fewer
    steps: list[int] = []
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
                    count = reply["usage"]["completion_tokens"]
                    tokens.append(count)
                    stopped = reply.get("choices", [{}])[0].get("finish_reason") == "stop"
                    steps.append(count if stopped else max(0, count - 1))
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
           "mean_completion_tokens": statistics.fmean(tokens) if tokens else 0.0,
           "mean_decode_steps": statistics.fmean(steps) if steps else 0.0}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        row[f"latency_{name}_s"] = _percentile(latencies, q) if latencies else None
    logger.info("%d clients: %.2f req/s, p50 %.3f s", clients, row["requests_per_second"], row["latency_p50_s"] or 0)
    return row


def _with_server_counts(server, load) -> dict:
    """`load()`'s row with what the server counted during it: the prefix cache's hits and misses (both 0 when the
    cache is off), the mean chunks per batched step (None unbatched) and the server process's CPU time per
    completed request, in ms, on every core (None where /proc is missing)."""
    def counts():
        health = call(server.url, "GET", "/health")[1]
        cache = health.get("prefix_cache") or {}
        batching = health.get("batching") or {}
        return cache.get("hits", 0), cache.get("misses", 0), batching.get("steps", 0), batching.get("chunks", 0)

    def cpu():
        try:
            return server.cpu_seconds()
        except OSError:
            return None

    before, cpu_before = counts(), cpu()
    row = load()
    after, cpu_after = counts(), cpu()
    hits, misses, steps, chunks = (a - b for a, b in zip(after, before))
    return dict(row, prefix_hits=hits, prefix_misses=misses, mean_batch=chunks / steps if steps else None,
                server_cpu_ms_per_request=(cpu_after - cpu_before) * 1e3 / row["completed"]
                if cpu_before is not None and cpu_after is not None and row["completed"] else None)


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
                    min_seconds: float = 0.0, rounds: int = 1) -> dict:
    """Load rows for each --max-batch (built-in, then decode-heavy); live ages and abuse rounds against the
    last --max-batch's built-in server. prefix_cache_mb: the servers' --prefix-cache-mb (None: their default;
    every request asks about the same clip, so with the cache on each server ingests it once, in the warm-up).
    min_seconds: each load row sends requests until it has sent `requests` and this long has passed.

    A workload's servers (one per --max-batch) run side by side, and each of `rounds` rounds sends every client
    count's row to each in turn: the rows a ratio compares are timed one right after the other, not one server's
    whole run after the other's, so the machine's drift (on a shared 2-core VM, a quarter either way over
    minutes) falls on both. The idle servers' threads sleep meanwhile."""
    from streamvlm.bench.abuse import run_abuse
    from streamvlm.bench.common import bench_model_dir, bench_video
    from streamvlm.world.builtin import default_model_dir
    from streamvlm.serve.process import ServerProcess

    max_batches = max_batches or [1, 8]
    if (not clients or any(c < 1 for c in clients) or requests < 1 or workers < 1 or rounds < 1
            or any(b < 1 for b in max_batches)):
        raise StreamVLMError("--clients, --requests, --workers, --rounds and --max-batch must be positive")
    model = Path(model_dir) if model_dir else default_model_dir()
    load: list[dict] = []
    # Measured first, while this process has run nothing else (see examples/openmp_teams.py).
    parts = {}
    if 1 in max_batches and max(max_batches) > 1:
        parts["built-in"] = batching_parts(model, 8, max(max_batches))
    if heavy and parts:
        parts["decode-heavy"] = batching_parts(heavy_model or bench_model_dir(), HEAVY_FRAMES, max(max_batches))
    # (name, checkpoint, what each request asks for, warm-up requests)
    workloads = [("built-in", model, dict(new_tokens=new_tokens), 2)]
    if heavy:
        workloads.append(("decode-heavy", heavy_model or bench_model_dir(),
                          dict(new_tokens=HEAVY_TOKENS, frames=HEAVY_FRAMES, ignore_eos=True), 1))
    with tempfile.TemporaryDirectory(prefix="streamvlm-bench-serve-") as tmp:
        media = Path(tmp)
        shutil.copy(bench_video(video_seconds, fps=8.0, size=128), media / "clip.mp4")
        cache = [] if prefix_cache_mb is None else ["--prefix-cache-mb", f"{prefix_cache_mb:g}"]
        for workload, checkpoint, asked, warm_up in workloads:
            servers: dict[int, ServerProcess] = {}
            try:
                for batch in max_batches:
                    servers[batch] = ServerProcess(
                        ["--model", str(checkpoint), "--model-name", "bench", "--workers", str(workers),
                         "--max-batch", str(batch), "--max-sessions", "2", *cache],
                        log_path=media / f"server-{workload}-{batch}.log", media_dir=media)
                    # warm-up: first-call paths, worker threads, and the clip into the prefix cache
                    run_load(servers[batch].url, "bench", 1, warm_up, **asked)
                if workload == "built-in":
                    rss_start = servers[max_batches[-1]].rss_bytes()
                for round_ in range(rounds):
                    for c in clients:
                        for batch, server in servers.items():
                            row = _with_server_counts(server, lambda: run_load(
                                server.url, "bench", c, max(requests, c), min_seconds=min_seconds, **asked))
                            load.append(dict(row, workload=workload, max_batch=batch, round=round_))
                if workload == "built-in":
                    last = servers[max_batches[-1]]
                    live = [run_live_age(last.url, media, age, stream_fps, new_tokens) for age in ages]
                    rss_end = last.rss_bytes()
                    abuse = run_abuse(last, "bench", media, abuse_rounds) if abuse_rounds else None
            finally:
                for server in servers.values():
                    server.stop()
    ratios = _batching_ratios(load, max_batches)
    for ratio in ratios:  # what batching can gain at most on each workload, with the answers' mean decode steps
        rows = [r for r in load if r["workload"] == ratio["workload"] and r["max_batch"] == 1]
        steps = sum(r["mean_decode_steps"] for r in rows) / len(rows)
        kept = all(r["prefix_hits"] and not r["prefix_misses"] for r in rows)  # each request forked the kept clip
        ratio["bound"] = batching_bound(parts[ratio["workload"]], steps, kept)
    return {"suite": "serve", "model": str(model), "workers": workers, "prefix_cache_mb": prefix_cache_mb,
            "video_seconds": video_seconds, "min_seconds": min_seconds, "rounds": rounds,
            "frames_per_request": 8, "new_tokens": new_tokens, "max_batches": max_batches, "load": load,
            "batching": ratios, "live": live,
            "server_rss_start_bytes": rss_start, "server_rss_end_bytes": rss_end, "abuse": abuse}


def batching_parts(model_dir: Path, frames: int, batch: int, repeats: int = 5) -> dict:
    """What batching's bound (`batching_bound`) is made of, measured in this process: the seconds of a request's
    ingest and prefill up to its first token, as the server runs one (its session's last question: the turn's end
    is not fed), and the ms of a decode step alone and of one step of `batch`."""
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

    def first_token(session) -> None:  # a server request's prompt (`run_chat`): its first token, nothing fed after
        "".join(session.ask_stream(QUESTION, last=True, max_new_tokens=1, ignore_stop=True))

    def ingested():
        session = vlm.session()
        session.append_frames(clip)
        first_token(session)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    prefill_s = timed(ingested)
    kept = vlm.session()
    kept.append_frames(clip)
    # what a request costs whose video a kept session holds (the server's prefix cache): a fork and its question
    question_s = timed(lambda: first_token(kept.fork()))
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


def batching_bound(parts: dict, steps: float, kept: bool = False) -> dict:
    """What batching can gain at most on a workload whose answers take `steps` decode forwards after the
    prompt's (Amdahl; a load row's mean_decode_steps). A request alone costs its ingest and prefill up to its
    first token (with `kept`, the server's prefix cache holds the video, and a request costs a fork and its
    question instead), then its decode steps. In full batches its question's prefill and each decode step cost
    1/batch of a batched step, and the rest (the video's ingest, the fork) as much as alone: a batch makes the
    frames' compute-bound prefill no cheaper. bound = alone / batched: what sharing the model's steps can gain.
    Video decoding, HTTP and a request's Python outside the model are left out. They get no cheaper in a
    batch; the batched server could hide some of them behind other requests' steps, but they hold Python's one
    lock as the steps do, so where they are a large share of a request (the built-in model's) they pull the
    measured ratio below this bound (docs/performance.md, "Rounds side by side, and the bound as a server runs a
    request")."""
    fixed = parts["question_s"] if kept else parts["prefill_s"]
    shared_fixed = fixed + (parts["question_ms_batched_step"] / parts["batch"] - parts["question_ms_alone"]) / 1e3
    alone = fixed + steps * parts["decode_ms_alone"] / 1e3
    batched = max(0.0, shared_fixed) + steps * parts["decode_ms_batched_step"] / parts["batch"] / 1e3
    return dict(parts, steps=steps, kept=kept, bound=alone / batched)


def _batching_ratios(load: list[dict], max_batches: list[int]) -> list[dict]:
    """Per workload, the largest --max-batch against 1, measured in this run: tokens/s and requests/s at the most
    clients, p50 latency at the fewest. Each round's rows give a ratio; the median over rounds is reported, and
    each round's in `per_round`."""
    if 1 not in max_batches or max(max_batches) == 1:
        return []
    top = max(max_batches)
    ratios = []
    for workload in dict.fromkeys(row["workload"] for row in load):
        rows = {(r["max_batch"], r["clients"], r.get("round", 0)): r for r in load if r["workload"] == workload}
        most, fewest = max(c for _, c, _ in rows), min(c for _, c, _ in rows)
        per_round = []
        for round_ in sorted({n for _, _, n in rows}):
            one, many = rows[(1, most, round_)], rows[(top, most, round_)]
            alone, batched = rows[(1, fewest, round_)], rows[(top, fewest, round_)]
            per_round.append({"tokens_per_second": many["tokens_per_second"] / one["tokens_per_second"],
                              "requests_per_second": many["requests_per_second"] / one["requests_per_second"],
                              "latency_p50": batched["latency_p50_s"] / alone["latency_p50_s"]})
        ratios.append({"workload": workload, "max_batch": top, "clients": most, "p50_at_clients": fewest,
                       **{key: statistics.median(r[key] for r in per_round) for key in per_round[0]},
                       "per_round": per_round})
    return ratios


def format_serve(result: dict) -> str:
    lines = [(f"server: {result['model']} ({result['workers']} worker(s)); built-in: "
              f"{result['video_seconds']:g} s clip, {result['frames_per_request']} frames, "
              f"up to {result['new_tokens']} answer tokens; decode-heavy: real-small-shaped random checkpoint, "
              f"{HEAVY_FRAMES} frames, {HEAVY_TOKENS} tokens, end token ignored"), "",
             "| workload | max batch | clients | requests | req/s | tokens/s | p50 s | p90 s | p99 s | failed | "
             "prefix hits/misses | mean batch | server CPU ms/request |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["load"]:
        mean_batch, cpu = r.get("mean_batch"), r.get("server_cpu_ms_per_request")
        lines.append(f"| {r.get('workload', 'built-in')} | {r.get('max_batch', 1)} | {r['clients']} | "
                     f"{r['completed']} | {r['requests_per_second']:.2f} | {r['tokens_per_second']:.1f} | "
                     f"{r['latency_p50_s']:.3f} | {r['latency_p90_s']:.3f} | {r['latency_p99_s']:.3f} | "
                     f"{r['failed']} | {r.get('prefix_hits', 0)}/{r.get('prefix_misses', 0)} | "
                     + (f"{mean_batch:.2f}" if mean_batch is not None else "") + " | "
                     + (f"{cpu:.1f}" if cpu is not None else "") + " |")
    if result.get("batching"):
        lines += ["", "| workload | batched vs --max-batch 1 | tokens/s | req/s | p50 latency | at most (Amdahl) |",
                  "|---|---|---|---|---|---|"]
        for r in result["batching"]:
            bound = r.get("bound")
            lines.append(f"| {r['workload']} | {r['max_batch']} vs 1 at {r['clients']} clients (p50 at "
                         f"{r['p50_at_clients']}) | {r['tokens_per_second']:.2f}x | {r['requests_per_second']:.2f}x "
                         f"| {r['latency_p50']:.2f}x | " + (f"{bound['bound']:.2f}x" if bound else "") + " |")
        for r in result["batching"]:
            if len(r.get("per_round", ())) > 1:
                lines.append(f"{r['workload']}, each round (the table gives their median): tokens/s "
                             + ", ".join(f"{x['tokens_per_second']:.2f}x" for x in r["per_round"]) + "; req/s "
                             + ", ".join(f"{x['requests_per_second']:.2f}x" for x in r["per_round"]) + "; p50 "
                             + ", ".join(f"{x['latency_p50']:.2f}x" for x in r["per_round"]))
        for r in result["batching"]:
            if r.get("bound"):
                b = r["bound"]
                fixed = (f"{b['question_s']:.3f} s of a kept video's fork and the question" if b.get("kept") else
                         f"{b['prefill_s']:.3f} s of ingest and prefill")
                lines.append(f"{r['workload']}: a request alone is {fixed} and "
                             f"{b['steps']:.1f} decode steps of {b['decode_ms_alone']:.1f} ms; a step of "
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
