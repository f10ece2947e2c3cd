"""`streamvlm bench`: performance figures as ratios measured in one run.

`dense`: our runtime vs transformers' own forward/generate on the same loaded checkpoint (the very same
module objects, so the weights match), same frames, same prompt. On CPU our linear layers run through oneDNN
(streamvlm.kernels) and theirs through F.linear, as transformers runs them; STREAMVLM_CPU_LINEAR=torch gives
both F.linear:

    prefill    N frames + the question -> logits of the first answer token
               ours: session.append_frames + ask(max_new_tokens=1); theirs: model(...) with logits_to_keep=1
    answer     the same, then M answer tokens (greedy, no early stop)
               ours: append_frames + ask(M); theirs: model.generate(M)
    streamed   frames appended one at a time as they arrive, then the first token (ours only has this mode;
               compared against theirs' prefill, which needs all frames at once)
    warm ask   a question to a session that already holds the frames (ours) vs generate on the whole
               prompt again (what transformers users do for each new question)

With --compile, decode ms/token of ours eager vs ours with `compile=True` (the decode step through
torch.compile), both as (answer - prefill) / (M - 1) on the same weights, timed in this run after a warm-up
that compiles.

Each figure is the median of --repeats timed rounds after one untimed warm-up; a round times every phase once,
in turn, so phases meet the same machine. `speedup` = theirs / ours. `streamed_vs_one_shot` = our one-shot
prefill's time / our streamed prefill's, per round (the two run back to back) and their median.
Achieved FLOP/s is reported against a float matmul measured in the same run.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch

from streamvlm.bench.common import (_timed, bench_model_dir, bench_video, matmul_flops_per_second, require_llava,
                                    stream_tiny_dir, timed_rounds)
from streamvlm.errors import StreamVLMError
from streamvlm.kernels import linear_backend, stock_linears

logger = logging.getLogger(__name__)

QUESTION = "What happens in the video?"


def run_dense(model_dir: Path, frames_count: int, new_tokens: int, repeats: int, device, dtype,
              compile: bool = False) -> dict:
    from streamvlm.runtime import StreamVLM

    vlm = StreamVLM.from_pretrained(model_dir, device=device, dtype=dtype)
    require_llava(vlm, "dense")
    hf = vlm.adapter.model
    size = vlm.adapter.preprocess_config
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (frames_count, size.height, size.width, 3), dtype=torch.uint8, generator=g)
    pixels = vlm.preprocess(frames)

    # transformers' input as its processor builds it: the chat template's text with the video placeholder
    # expanded to frames x tokens + 1 (the parity tests prove our session feeds the same ids).
    text = vlm.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
        tokenize=False, add_generation_prompt=True)
    video_token = vlm.adapter.video_token
    text = text.replace(video_token, video_token * (frames_count * vlm.tokens_per_frame + 1))
    input_ids = vlm.tokenizer(text, return_tensors="pt")["input_ids"].to(vlm.adapter.device)
    hf_inputs = {"input_ids": input_ids, "pixel_values_videos": pixels[None]}

    def ours_prefill():
        s = vlm.session()
        s.append_frames(frames)
        s.ask(QUESTION, max_new_tokens=1, ignore_stop=True)
        return s

    def ours_streamed():
        s = vlm.session()
        for i in range(frames_count):
            s.append_frames(frames[i:i + 1])
        s.ask(QUESTION, max_new_tokens=1, ignore_stop=True)

    def ours_answer():
        s = vlm.session()
        s.append_frames(frames)
        s.ask(QUESTION, max_new_tokens=new_tokens, ignore_stop=True)

    warm = vlm.session()
    warm.append_frames(frames)

    def ours_warm_ask():
        # A follow-up question on a session that holds the frames; the cache grows a little each time.
        warm.ask(QUESTION, max_new_tokens=new_tokens, ignore_stop=True)

    # theirs as transformers runs: its linear layers through F.linear (ours go through oneDNN, streamvlm.kernels)
    @torch.inference_mode()
    def theirs_prefill():
        with stock_linears():
            hf(**hf_inputs, use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def theirs_answer():
        with stock_linears():
            hf.generate(**hf_inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        eos_token_id=None)

    logger.info("timing %d rounds of every phase", repeats)
    rounds = timed_rounds({"ours_prefill": ours_prefill, "theirs_prefill": theirs_prefill,
                           "ours_streamed": ours_streamed, "ours_answer": ours_answer,
                           "theirs_answer": theirs_answer, "ours_warm_ask": ours_warm_ask}, repeats)
    t = {name: statistics.median(times) for name, times in rounds.items()}
    # streamed against our own one-shot prefill, round by round (the two ran back to back)
    streamed = [one / many for one, many in zip(rounds["ours_prefill"], rounds["ours_streamed"])]
    decode = _decode_ms_per_token(vlm, frames, new_tokens, repeats) if compile else None
    stats = ours_prefill().stats()
    peak = matmul_flops_per_second(vlm.adapter.device, vlm.adapter.dtype)
    prefill_flops = stats["flops"]["vision"] + stats["flops"]["llm"]
    rows = [
        {"phase": "prefill", "ours_s": t["ours_prefill"], "transformers_s": t["theirs_prefill"]},
        {"phase": "streamed_prefill", "ours_s": t["ours_streamed"], "transformers_s": t["theirs_prefill"]},
        {"phase": "answer", "ours_s": t["ours_answer"], "transformers_s": t["theirs_answer"]},
        {"phase": "warm_ask", "ours_s": t["ours_warm_ask"], "transformers_s": t["theirs_answer"]},
    ]
    for row in rows:
        row["speedup"] = row["transformers_s"] / row["ours_s"]
    parts = vlm.adapter.decoder
    result = {
        "suite": "dense",
        "device": str(vlm.adapter.device), "dtype": str(vlm.adapter.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "linear": linear_backend(vlm.adapter.device),
        "model": {"dir": str(model_dir), "layers": parts.num_layers, "hidden": parts.hidden_size,
                  "heads": parts.num_heads, "kv_heads": parts.num_kv_heads,
                  "tokens_per_frame": vlm.tokens_per_frame},
        "frames": frames_count, "new_tokens": new_tokens, "repeats": repeats,
        "prompt_tokens": int(input_ids.shape[1]),
        "rows": rows,
        "streamed_vs_one_shot": {"per_round": streamed, "median": statistics.median(streamed)},
        "prefill_flops": prefill_flops,
        "prefill_flops_per_s": prefill_flops / t["ours_prefill"],
        "matmul_flops_per_s": peak,
        "prefill_fraction_of_matmul": prefill_flops / t["ours_prefill"] / peak,
    }
    if decode is not None:
        result["decode_ms_per_token"] = decode
    return result


def _decode_ms_per_token(vlm, frames: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """{"eager", "compiled"}: ms per decode step of `vlm` as loaded and of the same weights with compile=True,
    as (time of an M-token answer - time of a 1-token answer) / (M - 1), each from a fresh session;
    "compile_s": what the compiled model's first answer costs over its later ones, less the same for eager (the
    compile), and "break_even_tokens": the answer tokens after which compiling has paid for itself."""
    from streamvlm.runtime import StreamVLM

    if new_tokens < 2:
        raise StreamVLMError("--compile times decode steps: give --new-tokens 2 or more")
    compiled = StreamVLM(vlm.adapter, vlm.router, vlm.sampling, vlm.max_chunk_frames, compile=True)

    def answer(model, tokens: int):
        s = model.session()
        s.append_frames(frames)
        s.ask(QUESTION, max_new_tokens=tokens, ignore_stop=True)

    out, extra = {}, {}
    for name, model in (("eager", vlm), ("compiled", compiled)):
        start = time.perf_counter()
        answer(model, new_tokens)  # the compiled model compiles at its first decode step
        first = time.perf_counter() - start
        one = _timed(lambda: answer(model, 1), repeats)
        many = _timed(lambda: answer(model, new_tokens), repeats)
        out[name] = (many - one) / (new_tokens - 1) * 1e3
        extra[name] = first - many  # what the first answer cost over a later one
    # 0 where this process had compiled the step already
    out["compile_s"] = max(0.0, extra["compiled"] - extra["eager"])
    gain_ms = out["eager"] - out["compiled"]
    out["break_even_tokens"] = round(out["compile_s"] * 1e3 / gain_ms) if gain_ms > 0 else None
    out.update(_decode_kernel_share(vlm, frames, new_tokens))
    logger.info("decode: eager %.2f ms/token, compiled %.2f; kernels %.0f%% of an eager step", out["eager"],
                out["compiled"], 100 * out["kernel_share"])
    return out


# The compute kernels of a decode step on CPU: a compiled step calls the same ones (it fuses what lies between).
_KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise",
            "aten::_scaled_dot_product_flash_attention_for_cpu")


def _decode_kernel_share(vlm, frames: torch.Tensor, steps: int) -> dict:
    """How much of an eager decode step the matmul and attention kernels take, measured with the profiler:
    compiling can only shrink the rest, so 1 / kernel_share bounds its speed-up. {"step_ms": an unprofiled
    step, "kernel_ms": the kernels' own time a step, "kernel_share", "compile_bound"}."""
    from torch.profiler import ProfilerActivity, profile

    from streamvlm.sequence import TextPiece

    session = vlm.session()
    session.append_frames(frames)
    session.ask(QUESTION, max_new_tokens=1)

    @torch.inference_mode()
    def step() -> None:
        session._decoder.forward(session._seq.place([TextPiece((5,))]), session.cache, session.flops, "last")

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_ms = (time.perf_counter() - start) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    kernel_ms = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in _KERNELS) / 1e3 / steps
    share = min(1.0, kernel_ms / step_ms)
    return {"step_ms": step_ms, "kernel_ms": kernel_ms, "kernel_share": share, "compile_bound": 1 / share}


def run_routing(model_dir: Path, frames_count: int, repeats: int, device, dtype,
                keep_ratios=(1.0, 0.5, 0.2), schedules=("interleaved", "all:2"), seed: int = 0) -> dict:
    """Ingest the same encoded frames dense and routed, alternating, and compare time with FLOPs.

    Vision encoding is done once up front and left out of both timings: it does not change with routing,
    and leaving it in would hide the decoder's gather/scatter overhead. The routers get random scorer
    weights (seeded) so kept tokens are scattered over each frame, as a trained router's are.
    """
    from streamvlm.routers import RoutingConfig, build_router
    from streamvlm.routers.base import DenseRouter
    from streamvlm.runtime import StreamVLM

    base = StreamVLM.from_pretrained(model_dir, device=device, dtype=dtype)
    adapter, parts = base.adapter, base.adapter.decoder
    size = adapter.preprocess_config
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (frames_count, size.height, size.width, 3), dtype=torch.uint8, generator=g)
    features = base.encode(frames)

    def ingest(vlm):
        session = vlm.session()
        session.append_encoded(features)
        return session

    dense_vlm = StreamVLM(adapter, DenseRouter())
    dense_stats = ingest(dense_vlm).stats()
    rows = []
    for schedule in schedules:
        name, _, dense_layers = schedule.partition(":")
        for keep in keep_ratios:
            config = RoutingConfig(policy="mod", keep_ratio=keep, schedule=name, dense_layers=int(dense_layers or 0))
            router = build_router(config, parts.num_layers, parts.hidden_size)
            gen = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for p in router.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) / parts.hidden_size**0.5)
            routed_vlm = StreamVLM(adapter, router)
            # Alternate dense and routed runs so drift in the machine's speed hits both alike.
            times = {"dense": [], "routed": []}
            for vlm in (dense_vlm, routed_vlm):
                ingest(vlm)  # warm-up
            for _ in range(repeats):
                for key, vlm in (("dense", dense_vlm), ("routed", routed_vlm)):
                    start = time.perf_counter()
                    ingest(vlm)
                    times[key].append(time.perf_counter() - start)
            dense_s, routed_s = statistics.median(times["dense"]), statistics.median(times["routed"])
            stats = ingest(routed_vlm).stats()
            speedup = dense_s / routed_s
            flops_speedup = stats["flops"]["llm_dense"] / stats["flops"]["llm"]
            rows.append({
                "policy": config.spec(), "keep_ratio": keep, "schedule": schedule,
                "dense_s": dense_s, "routed_s": routed_s, "speedup": speedup, "flops_speedup": flops_speedup,
                "efficiency": speedup / flops_speedup,
                "flops_fraction": stats["flops"]["llm"] / stats["flops"]["llm_dense"],
                "kv_bytes_dense": dense_stats["kv_bytes"], "kv_bytes": stats["kv_bytes"],
                "kv_ratio": stats["kv_bytes"] / dense_stats["kv_bytes"],
            })
            logger.info("%s: speedup %.2f, FLOPs predict %.2f", config.spec(), speedup, flops_speedup)
    return {
        "suite": "routing", "device": str(adapter.device), "dtype": str(adapter.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "linear": linear_backend(adapter.device),
        "model": {"dir": str(model_dir), "layers": parts.num_layers, "hidden": parts.hidden_size,
                  "heads": parts.num_heads, "kv_heads": parts.num_kv_heads,
                  "tokens_per_frame": adapter.vision.tokens_per_frame},
        "frames": frames_count, "tokens": dense_stats["tokens"], "repeats": repeats, "rows": rows,
    }


def run_caption_bench(model_dirs: dict[str, Path], routings: tuple[str, ...], seconds: int, device, dtype,
                      batches: tuple[int, ...] = (1, 4)) -> dict:
    """Caption one video per (model, routing) and report hours of video per hour of compute; then, on the
    last model, as many copies of the video as the largest batch, captioned by `caption.run` with each --batch
    in `batches`, decode-heavy (CAPTION_HEAVY_FPS, CAPTION_HEAVY_TOKENS tokens, every caption its full length)."""
    from streamvlm.caption import CaptionConfig, caption_video
    from streamvlm.runtime import StreamVLM

    video = bench_video(seconds)
    cfg = CaptionConfig(fps=1.0, segment=10.0, max_new_tokens=32, ignore_stop=True)
    rows = []
    for name, model_dir in model_dirs.items():
        for routing in routings:
            vlm = StreamVLM.from_pretrained(model_dir, routing=routing, device=device, dtype=dtype)
            caption_video(vlm, video, CaptionConfig(fps=1.0, segment=5.0, max_new_tokens=4))  # warm-up
            record = caption_video(vlm, video, cfg)
            stats = record["stats"]
            rows.append({
                "model": name, "routing": routing, "video_seconds": record["duration"],
                "compute_seconds": stats["seconds"],
                "video_hours_per_compute_hour": record["duration"] / stats["seconds"],
                "decode_share": stats["decode_seconds"] / stats["seconds"],
                "flops_fraction": stats["flops_fraction"], "captions": len(record["segments"]),
            })
            logger.info("%s %s: %.1f h of video per hour", name, routing, rows[-1]["video_hours_per_compute_hour"])
    heavy = CaptionConfig(fps=CAPTION_HEAVY_FPS, segment=cfg.segment, max_new_tokens=CAPTION_HEAVY_TOKENS,
                          ignore_stop=True)
    batching = _caption_batching(list(model_dirs.items())[-1], video, heavy, batches, device, dtype) if batches else []
    return {"suite": "caption", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "video_seconds": seconds, "fps": cfg.fps, "segment": cfg.segment, "max_new_tokens": cfg.max_new_tokens,
            "rows": rows, "batching": batching,
            "batching_setting": {"fps": heavy.fps, "segment": heavy.segment, "max_new_tokens": heavy.max_new_tokens}}


CAPTION_HEAVY_FPS = 0.2
CAPTION_HEAVY_TOKENS = 64
"""--batch rows' decode-heavy setting: 2 frames a 10 s segment and 64-token captions (at 1 fps and 32 tokens the
real-small shape spends most of its time ingesting frames, which a batch does no faster)."""


def _caption_batching(model: tuple[str, Path], video: Path, cfg, batches: tuple[int, ...], device, dtype) -> list[dict]:
    """Hours of video per hour of compute captioning max(batches) copies of `video` at each --batch, with `cfg`."""
    import shutil
    import tempfile

    from streamvlm.caption import run as caption_run
    from streamvlm.runtime import StreamVLM

    name, model_dir = model
    vlm = StreamVLM.from_pretrained(model_dir, device=device, dtype=dtype)
    rows = []
    with tempfile.TemporaryDirectory(prefix="streamvlm-bench-caption-") as tmp:
        copies = [Path(tmp) / f"copy-{i}{video.suffix}" for i in range(max(batches))]
        for path in copies:  # copies, not links: the inputs are deduplicated by their real path
            shutil.copy(video, path)
        for batch in batches:
            out = Path(tmp) / f"batch-{batch}.jsonl"
            summary = caption_run([str(p) for p in copies], out, lambda: vlm, cfg, model_name=name, routing="dense",
                                  progress=False, batch=batch)
            if summary.failed:
                raise StreamVLMError(f"bench caption: {summary.failed} videos failed at --batch {batch}")
            rows.append({"model": name, "batch": batch, "videos": len(copies), "video_seconds": summary.video_seconds,
                         "compute_seconds": summary.compute_seconds,
                         "video_hours_per_compute_hour": summary.video_seconds / summary.compute_seconds})
            logger.info("%s --batch %d: %.1f h of video per hour", name, batch, rows[-1]["video_hours_per_compute_hour"])
    for row in rows:
        row["vs_batch_1"] = row["video_hours_per_compute_hour"] / rows[0]["video_hours_per_compute_hour"]
    return rows


def run(args) -> dict:
    from streamvlm.runtime import resolve_device, resolve_dtype

    if args.repeats is None:
        args.repeats = {"routing": 5, "streams": 1}.get(args.suite, 3)
    if args.frames < 1 or args.new_tokens < 1 or args.repeats < 1:
        raise StreamVLMError("--frames, --new-tokens and --repeats must be at least 1")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.suite == "quality":
        from streamvlm.bench.quality import DEFAULT_SEED, run_quality_bench
        from streamvlm.routers.registry import split_policy_specs
        from streamvlm.world.builtin import default_model_dir

        if args.num_videos < 1:
            raise StreamVLMError("--num-videos must be at least 1")
        policies = tuple(split_policy_specs(args.policies)) or None  # None: the registry's defaults for the model
        if args.policies and not policies:
            raise StreamVLMError("--policies: give --routing specs separated by ';', e.g. 'dense;mod:0.2'")
        seed = DEFAULT_SEED if args.seed is None else args.seed
        if args.budget is not None and args.sweep is not None:
            raise StreamVLMError("give --budget F or --sweep F1,F2,..., not both")
        budgets = ((args.budget,) if args.budget is not None else
                   tuple(_numbers("--sweep", args.sweep, float)) if args.sweep is not None else ())
        if any(b > 1 for b in budgets):
            raise StreamVLMError(f"--sweep: fractions of dense FLOPs, each above 0 and at most 1; got {args.sweep!r}")
        if args.plot is not None and not budgets:
            raise StreamVLMError("--plot draws budgeted rows: add --sweep F1,F2,... (or --budget F)")
        result = run_quality_bench(Path(args.model) if args.model else default_model_dir(), policies, seed,
                                   args.num_videos, device, dtype, budgets=budgets,
                                   calibration_videos=args.calibration_videos)
        if args.plot is not None:
            from streamvlm.bench.plot import plot_pareto

            result["plot"] = str(plot_pareto(result, args.plot))
        return result
    if args.suite == "serve":
        from streamvlm.bench.serve import run_serve_bench

        clients = _numbers("--clients", args.clients, int)
        return run_serve_bench(Path(args.model) if args.model else None, clients, args.requests,
                               _numbers("--ages", args.ages or "1,30", float), args.stream_fps, args.new_tokens,
                               args.clip_seconds, args.workers, args.abuse_rounds,
                               _numbers("--max-batch", args.max_batch or "1,8", int), heavy=not args.no_decode_heavy,
                               heavy_model=Path(args.heavy_model) if args.heavy_model else None,
                               prefix_cache_mb=args.prefix_cache_mb, min_seconds=args.min_seconds,
                               rounds=args.rounds)
    if args.suite == "stream":
        from streamvlm.bench.stream import run_stream_bench

        ages = _numbers("--ages", args.ages or "1,10,60", float)
        known = {"tiny": stream_tiny_dir, "small": bench_model_dir}
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        if not names or any(n not in known for n in names):
            raise StreamVLMError(f"--models: choose among {', '.join(known)}, got {args.models!r}")
        models = {"given": Path(args.model)} if args.model else {n: known[n]() for n in names}
        return run_stream_bench(models, ages, args.stream_fps, args.memory_budget, args.new_tokens,
                                not args.no_baseline, device, dtype)
    model_dir = Path(args.model) if args.model else bench_model_dir()
    if args.suite == "dense":
        return run_dense(model_dir, args.frames, args.new_tokens, args.repeats, device, dtype, args.compile)
    if args.suite == "routing":
        return run_routing(model_dir, args.frames, args.repeats, device, dtype)
    if args.suite == "streams":
        from streamvlm.bench.streams import run_streams_bench
        from streamvlm.world.builtin import default_model_dir

        return run_streams_bench(Path(args.model) if args.model else default_model_dir(), args.streams,
                                 args.video_seconds, args.stream_fps, args.new_tokens, device, dtype,
                                 rounds=args.repeats)
    if args.suite == "caption":
        from streamvlm.world.builtin import default_model_dir

        models = {"tiny": default_model_dir(), "small": model_dir}
        return run_caption_bench(models, ("dense", "mod:0.2:interleaved"), args.video_seconds, device, dtype,
                                 tuple(_numbers("--max-batch", args.max_batch or "1,4", int)))
    raise StreamVLMError(f"unknown bench suite {args.suite!r}")


def _numbers(flag: str, text: str, kind) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise StreamVLMError(f"{flag}: positive numbers separated by commas, e.g. 1,4,16; got {text!r}")
    return values


def _model_line(result: dict) -> str:
    m = result["model"]
    return (f"bench {result['suite']}: {m['layers']} layers, hidden {m['hidden']}, {m['tokens_per_frame']} "
            f"tokens/frame, {result['frames']} frames, {result['device']} {result['dtype']}, "
            f"median of {result['repeats']}")


def format_table(result: dict) -> str:
    if result["suite"] == "quality":
        from streamvlm.bench.quality import format_quality

        return format_quality(result)
    if result["suite"] == "serve":
        from streamvlm.bench.serve import format_serve

        return format_serve(result)
    if result["suite"] == "stream":
        from streamvlm.bench.stream import format_stream

        return format_stream(result)
    if result["suite"] == "streams":
        from streamvlm.bench.streams import format_streams

        return format_streams(result)
    if result["suite"] == "caption":
        lines = [f"bench caption: a {result['video_seconds']} s video at {result['fps']} fps, a caption every "
                 f"{result['segment']} s, {result['device']} {result['dtype']}",
                 f"{'model':<8}{'routing':<22}{'video h / compute h':>21}{'decode share':>14}{'LLM FLOPs':>11}"]
        for r in result["rows"]:
            lines.append(f"{r['model']:<8}{r['routing']:<22}{r['video_hours_per_compute_hour']:>21.1f}"
                         f"{r['decode_share']:>14.1%}{r['flops_fraction']:>11.2f}")
        if result.get("batching"):
            first = result["batching"][0]
            h = result["batching_setting"]
            lines += ["", f"{first['videos']} copies captioned by `caption --batch N` ({first['model']}, dense, "
                          f"decode-heavy: {h['fps']:g} fps, {h['max_new_tokens']}-token captions):",
                      f"{'batch':<8}{'video h / compute h':>21}{'vs batch 1':>12}"]
            for r in result["batching"]:
                lines.append(f"{r['batch']:<8}{r['video_hours_per_compute_hour']:>21.1f}{r['vs_batch_1']:>11.2f}x")
        return "\n".join(lines)
    lines = [_model_line(result)]
    if result["suite"] == "routing":
        lines.append(f"{'policy':<22}{'dense s':>9}{'routed s':>10}{'speedup':>9}{'FLOPs say':>11}"
                     f"{'efficiency':>12}{'KV':>7}")
        for r in result["rows"]:
            lines.append(f"{r['policy']:<22}{r['dense_s']:>9.3f}{r['routed_s']:>10.3f}{r['speedup']:>8.2f}x"
                         f"{r['flops_speedup']:>10.2f}x{r['efficiency']:>12.2f}{r['kv_ratio']:>7.2f}")
        return "\n".join(lines)
    lines[0] += (f", {result['prompt_tokens']} prompt tokens, {result['new_tokens']} answer tokens, our linear "
                 f"layers through {'oneDNN' if result['linear'] == 'onednn' else 'F.linear'}")
    lines.append(f"{'phase':<18}{'ours s':>10}{'transformers s':>16}{'speedup':>9}")
    for row in result["rows"]:
        lines.append(f"{row['phase']:<18}{row['ours_s']:>10.3f}{row['transformers_s']:>16.3f}{row['speedup']:>8.2f}x")
    streamed = result["streamed_vs_one_shot"]
    lines.append(f"streamed prefill: {streamed['median']:.2f}x our one-shot prefill's speed (rounds: "
                 + ", ".join(f"{r:.2f}" for r in streamed["per_round"]) + ")")
    lines.append(f"prefill: {result['prefill_flops_per_s'] / 1e9:.1f} GFLOP/s = "
                 f"{result['prefill_fraction_of_matmul']:.0%} of a {result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s matmul")
    if "decode_ms_per_token" in result:
        d = result["decode_ms_per_token"]
        lines.append(f"decode: eager {d['eager']:.2f} ms/token, compiled {d['compiled']:.2f} ms/token "
                     f"({d['eager'] / d['compiled']:.2f}x); matmul and attention kernels take "
                     f"{d['kernel_share']:.0%} of an eager step, so compiling the rest can gain at most "
                     f"{d['compile_bound']:.2f}x")
        even = d.get("break_even_tokens")
        lines.append(f"compiling took {d['compile_s']:.1f} s (the first answer), paid back after "
                     + (f"{even} answer tokens" if even is not None else "no number of tokens (not faster)"))
    return "\n".join(lines)
