"""`streamvlm` command line.

    streamvlm ask [VIDEO] [-q QUESTION ...]     answer questions about a video file (default: the sample)
    streamvlm live --source URL|FILE|sample     watch a stream, answer questions while it plays
    streamvlm caption INPUT... --out F.jsonl    caption long videos, resumable, shardable
    streamvlm serve [--port 8000]               OpenAI-style HTTP API, live streams over WebSocket, a web page
    streamvlm init-tiny DIR                     write a small random checkpoint, offline
    streamvlm bench dense [--json]              ours vs transformers, timed in one run

Results go to stdout; logs (with -v) and errors go to stderr. A mistake of the user's exits with status 2
and a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import time
from pathlib import Path

from streamvlm.errors import StreamVLMError

logger = logging.getLogger("streamvlm")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `streamvlm ask: error: argument --top-p: ...`, exit 2, no usage dump
    (subparsers are made with the parser's own class, so this covers every subcommand)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, low=None, high=None, low_open=False, what=""):
    """An argparse `type=` that parses `kind` and holds it to [low, high] (low excluded when low_open); argparse
    names the flag in the message."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if value != value or (low is not None and (value <= low if low_open else value < low)) or \
                (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {what}")
        return value

    return parse


_positive_int = _number(int, 1, what="at least 1")
_non_negative_int = _number(int, 0, what="0 or more")
_positive_float = _number(float, 0.0, low_open=True, what="above 0")
_non_negative_float = _number(float, 0.0, what="0 or more")
_probability = _number(float, 0.0, 1.0, low_open=True, what="above 0 and at most 1")
_port = _number(int, 0, 65535, what="0 to 65535")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR",
                   help="local Hugging Face checkpoint folder (default: the built-in model, made on first use)")
    from streamvlm.routers.registry import routing_help

    g.add_argument("--routing", default="dense", metavar="POLICY", help=routing_help())
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("answers")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N", help="longest answer (default 64)")
    g.add_argument("--temperature", type=_non_negative_float, default=0.0,
                   help="0 answers greedily (default); above 0 samples")
    g.add_argument("--top-k", type=_non_negative_int, default=0, metavar="K", help="sample among the K likeliest tokens")
    g.add_argument("--top-p", type=_probability, default=1.0, metavar="P", help="nucleus sampling threshold")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")


def _load(args) -> tuple:
    from streamvlm.world.builtin import BUILTIN_NOTICE, default_model_dir, is_builtin
    from streamvlm.runtime import StreamVLM

    model_dir = Path(args.model) if args.model else default_model_dir()
    if is_builtin(model_dir):
        print(BUILTIN_NOTICE, file=sys.stderr)
    vlm = StreamVLM.from_pretrained(model_dir, routing=args.routing, device=args.device, dtype=args.dtype)
    return vlm, model_dir


def cmd_ask(args) -> int:
    from streamvlm.video.files import probe_video
    from streamvlm.world.sample import sample_video

    video = Path(args.video) if args.video else sample_video()
    if args.num_frames is not None and args.fps is not None:
        raise StreamVLMError("give --num-frames or --fps, not both")
    num_frames = None if args.fps is not None else (8 if args.num_frames is None else args.num_frames)
    probe_video(video)  # a bad file fails before the model loads
    vlm, model_dir = _load(args)
    asked = sum(len(vlm.tokenizer(q, add_special_tokens=False)["input_ids"]) for q in args.question)
    clip = vlm.read_video(video, num_frames=num_frames, fps=args.fps, max_frames=args.max_frames,
                          reserve_tokens=asked)
    session = vlm.session(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed)
    start = time.perf_counter()
    session.append_frames(clip.frames, clip.timestamps.tolist())
    ingest_s = time.perf_counter() - start
    logger.info("ingested %d frames in %.2f s", clip.frames.shape[0], ingest_s)
    for question in args.question:
        if args.json:
            answer = session.ask(question)
            turn = session.turns[-1]
            print(json.dumps({"type": "answer", "t": turn.stream_time, "question": question, "text": answer,
                              "stop_reason": turn.stop_reason}), flush=True)
        else:
            print(f"Q: {question}\nA: ", end="", flush=True)
            for piece in session.ask_stream(question):
                print(piece, end="", flush=True)
            print()
    stats = session.stats()
    if args.json:
        print(json.dumps({"type": "stats", "video": str(video), "model": str(model_dir), "routing": args.routing,
                          "ingest_seconds": ingest_s, **stats}), flush=True)
    else:
        print(f"[{stats['frames']} frames of {video.name} ({clip.duration:.1f} s), {stats['tokens']} tokens, "
              f"KV cache {stats['kv_bytes'] / 2**20:.2f} MiB, ingest {ingest_s:.2f} s]", file=sys.stderr)
    return 0


def cmd_live(args) -> int:
    from streamvlm.live import Console, ConsolePlan, LiveSession
    from streamvlm.video.live import Reconnect, StreamSource, open_source

    options = {}
    for item in args.source_option or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StreamVLMError(f"--source-option {item!r}: use KEY=VALUE (an FFmpeg option, e.g. video_size=640x480)")
        options[key] = value
    policy = Reconnect(open_timeout=args.open_timeout, read_timeout=args.read_timeout,
                       retries=None if args.retries < 0 else args.retries)
    from streamvlm.world.sample import source_spec

    source = open_source(source_spec(args.source), fps=args.fps, speed=args.speed, loop=args.loop, reconnect=policy,
                         options=options)
    # a network stream or webcam that has not connected within --open-timeout ends the run (exit 2), whatever
    # --retries says; the retries are for reconnecting once it has played
    plan = ConsolePlan(questions=tuple(args.ask or ()), ask_every=args.ask_every, duration=args.duration,
                       status_every=args.status_every, json=args.json,
                       open_timeout=args.open_timeout if isinstance(source, StreamSource) else None)
    vlm, _ = _load(args)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    console = Console(lambda on_event: LiveSession(vlm, source, memory_budget=args.memory_budget, buffer_frames=args.buffer_frames,
                                                   on_event=on_event, **sampling),
                      plan, sys.stdout, sys.stderr)
    if not args.no_stdin:
        console.read_lines(sys.stdin)
    return console.run()


def cmd_caption(args) -> int:
    from streamvlm.caption import CaptionConfig, run
    from streamvlm.prompts import default_prompts

    prompts = default_prompts(args.model)
    cfg = CaptionConfig(fps=args.fps, segment=args.segment,
                        prompt=prompts.caption if args.prompt is None else args.prompt,
                        summary_prompt=prompts.summary if args.summary_prompt is None else args.summary_prompt,
                        max_new_tokens=args.max_new_tokens,
                        memory_budget=args.memory_budget)
    model_name = args.model or "builtin"
    loaded = {}

    def load():
        loaded["vlm"], _ = _load(args)
        return loaded["vlm"]

    summary = run(args.inputs, Path(args.out), load, cfg, model_name=model_name, routing=args.routing,
                  num_shards=args.num_shards, shard_index=args.shard_index,
                  progress=None if not args.no_progress else False, batch=args.batch)
    if int(os.environ.get("RANK", 0)) == 0:
        print(summary.line(), file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_compare(args) -> int:
    from streamvlm.compare import compare, default_policies, format_rows
    from streamvlm.prompts import default_prompts
    from streamvlm.routers.registry import split_policy_specs
    from streamvlm.video.files import probe_video
    from streamvlm.world.sample import sample_video

    policies = split_policy_specs(args.policies)
    if args.policies and not policies:
        raise StreamVLMError("--policies: give --routing specs separated by ';', e.g. 'dense;mod:0.2'")
    video = Path(args.video) if args.video else sample_video()
    probe_video(video)  # a bad file fails before the model loads
    vlm, _ = _load(args)
    clip = vlm.read_video(video, num_frames=args.num_frames)
    question = default_prompts(args.model).question if args.question is None else args.question
    solved = None
    if args.budget is not None:
        from streamvlm.budget import budget_policies
        from streamvlm.compare import solve_budget

        solved = solve_budget(vlm, clip.frames, question, policies or budget_policies(), args.budget,
                              args.max_new_tokens)
        policies = [s.routing for s in solved]
    policies = policies or default_policies(vlm, clip.frames, question)
    rows = compare(vlm, clip.frames, question, policies, args.max_new_tokens, args.repeats)
    for row, s in zip(rows, solved or ()):
        row.update(budget=args.budget, knob=s.knob, knob_value=s.value, reached=s.reached, note=s.note)
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


def cmd_calibrate(args) -> int:
    from streamvlm.calibrate import (calibrate_vtw, save_heads, save_schedule, save_vtw, save_yopo, search_greedy,
                                     search_sigmoid, yopo_spec)
    from streamvlm.prompts import default_prompts
    from streamvlm.routers.head_prune import calibrate_heads
    from streamvlm.video.files import probe_video
    from streamvlm.world.sample import sample_video

    yopo = yopo_spec(args.spec) if args.method == "yopo" else None  # a bad spec fails before anything loads
    videos = args.videos or [str(sample_video())]
    for video in videos:
        probe_video(video)  # a bad file fails before the model loads
    vlm, _ = _load(args)
    clips = [vlm.read_video(v, num_frames=args.num_frames).frames for v in videos]
    questions = args.question or list(default_prompts(args.model).calibrate)
    if args.method == "schedule":
        if args.search == "greedy":
            result = search_greedy(vlm, clips, questions, args.threshold, args.max_new_tokens)
        else:
            result = search_sigmoid(vlm, clips, questions, args.flops_budget, args.trials, args.max_new_tokens,
                                    sampler=args.sampler)
        out = save_schedule(vlm, result, args.out)
        print(json.dumps({**result, "out": str(out)}, indent=2) if args.json else
              f"{result['method']} schedule {[round(r, 3) for r in result['keep']]}: KL {result['kl']:.5f}, "
              f"LLM FLOPs {result['flops_fraction']:.2f} of dense; wrote {out} (--routing {out})")
        return 0
    if args.method == "yopo":
        from streamvlm.routers.yopo import calibrate_yopo

        result = calibrate_yopo(vlm, clips, questions, yopo, args.tau, args.min_fraction, args.max_new_tokens)
        out = save_yopo(vlm, result, args.out)
        config = result.pop("config")
        heads = sum(len(layer) for layer in result["active"]) if "active" in result else 0
        print(json.dumps({**result, "spec": config.spec(), "out": str(out)}, indent=2) if args.json else
              f"{config.spec()}: pruned {config.pruned_heads()} of {heads} heads (kept the most often active, "
              f"r > tau {args.tau}, after the first two layers; {result['samples']} samples); wrote {out} "
              f"(--routing {out})")
        return 0
    if args.method == "heads":
        result = calibrate_heads(vlm, clips, questions, args.tau, args.min_fraction,
                                 max_new_tokens=args.max_new_tokens)
        out = save_heads(vlm, result, args.out)
        pruned = sum(map(sum, result["pruned"]))
        total = sum(map(len, result["pruned"]))
        print(json.dumps({**result, "out": str(out)}, indent=2) if args.json else
              f"pruned {pruned} of {total} heads (tau {args.tau}, active in > {args.min_fraction:.0%} of "
              f"{result['samples']} samples); wrote {out} (--routing {out})")
        return 0
    result = calibrate_vtw(vlm, clips, questions, args.threshold, args.max_new_tokens)
    layers = vlm.adapter.decoder.num_layers
    if result["layer"] >= layers:  # layer_drop:<num_layers> drops nothing: a router that only looks calibrated
        best = min(result["kl_per_layer"], key=result["kl_per_layer"].get, default=None)
        closest = "" if best is None else f" (the lowest KL, {result['kl_per_layer'][best]:.5f}, is at layer {best})"
        if not args.write_anyway:
            raise StreamVLMError(f"calibrate vtw: no layer met --threshold {args.threshold}{closest}, so the router "
                                 "would drop nothing; raise --threshold, or pass --write-anyway to write it")
        print(f"streamvlm: no layer met --threshold {args.threshold}{closest}; writing layer_drop:{layers}, "
              "which drops nothing (--write-anyway)", file=sys.stderr)
    out = save_vtw(vlm, result, args.out)
    if args.json:
        print(json.dumps({**result, "out": str(out)}, indent=2))
    else:
        for layer, kl in result["kl_per_layer"].items():
            print(f"layer_drop:{layer:<4} KL {kl:.5f}{'  <- chosen' if layer == result['layer'] else ''}")
        print(f"wrote {out} (--routing {out}); threshold {args.threshold}, {result['samples']} samples")
    return 0


def cmd_init_tiny(args) -> int:
    from streamvlm.tiny import TinySpec, write_tiny_checkpoint

    out = Path(args.dir)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise StreamVLMError(f"{out} exists and is not empty; pass --force to write into it")
    if args.family != "llava_onevision":
        return _init_tiny_family(args, out)
    if args.real_small:
        spec = TinySpec.real_small(num_layers=args.layers or 12, hidden_size=args.hidden or 640, seed=args.seed)
    else:
        spec = TinySpec(**{k: v for k, v in (("num_layers", args.layers), ("hidden_size", args.hidden)) if v},
                        seed=args.seed)
    write_tiny_checkpoint(out, spec)
    print(f"wrote a random (untrained) LLaVA-OneVision checkpoint to {out}: {spec.num_layers} layers, "
          f"hidden {spec.hidden_size}, {spec.tokens_per_frame} tokens per frame; try it: streamvlm ask --model {out}")
    return 0


def _init_tiny_family(args, out: Path) -> int:
    """init-tiny for the families other than LLaVA-OneVision (one fixed tiny shape each, --layers/--hidden
    for the Qwen2-VL ones)."""
    sizes = {k: v for k, v in (("num_layers", args.layers), ("hidden_size", args.hidden)) if v}
    if args.real_small:
        raise StreamVLMError(f"--real-small is only for llava_onevision, not {args.family}")
    if sizes and args.family not in ("qwen2_vl", "qwen2_5_vl"):
        raise StreamVLMError(f"--layers and --hidden are not supported for {args.family}")
    from streamvlm.tiny.families import write_tiny_family

    write_tiny_family(out, args.family, seed=args.seed, **sizes)
    print(f"wrote a random (untrained) {args.family} checkpoint to {out}; try it: streamvlm ask --model {out}")
    return 0


def cmd_bench(args) -> int:
    from streamvlm import bench

    result = bench.run(args)
    if args.json:
        # quality prints its rows, one per policy, each self-contained (seed, counts and chance included)
        print(json.dumps(result["rows"] if result["suite"] == "quality" else result, indent=2))
    else:
        print(bench.format_table(result))
    return 0


def cmd_serve(args) -> int:
    from streamvlm.world.builtin import is_builtin
    from streamvlm.serve import Engine, MediaPolicy, ServeConfig, serve

    media_dir = None
    if args.allowed_media_dir is not None:
        media_dir = Path(args.allowed_media_dir).expanduser()
        if not media_dir.is_dir():
            raise StreamVLMError(f"--allowed-media-dir {media_dir}: not a folder")
    # The numbers' own ranges are argparse's (`_positive_int` and friends); what is left is how two relate.
    if args.max_body_mb < args.max_data_mb:
        raise StreamVLMError("--max-body-mb must be at least as large as --max-data-mb "
                             "(base64 makes an inline video a third larger than the file)")
    api_key = args.api_key or os.environ.get("STREAMVLM_API_KEY") or None
    vlm, model_dir = _load(args)
    model_id = args.model_name or ("streamvlm-builtin" if is_builtin(model_dir) else Path(model_dir).resolve().name)
    config = ServeConfig(api_key=api_key, max_sessions=args.max_sessions,
                         media=MediaPolicy(media_dir, max_data_bytes=int(args.max_data_mb * 2**20),
                                           allow_devices=not args.no_devices),
                         max_body_bytes=int(args.max_body_mb * 2**20), ended_grace_s=args.ended_grace_s,
                         header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s,
                         keep_alive_s=args.keep_alive_s, max_connections=args.max_connections,
                         max_asks_per_connection=args.max_asks_per_connection,
                         max_asks_per_stream=args.max_asks_per_stream)
    engine = Engine(vlm, model_id, workers=args.workers, max_batch=args.max_batch,
                    max_step_tokens=args.max_step_tokens, prefix_cache_bytes=int(args.prefix_cache_mb * 2**20))
    serve(engine, config, host=args.host,
          port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from streamvlm.prompts import default_help

    parser = _Parser(
        prog="streamvlm",
        description="Stream video into a video language model's KV cache and ask about it. Everything runs "
                    "offline on local checkpoints.",
        epilog="Examples:\n"
               "  streamvlm ask -q 'how many objects are there now?'     built-in model and sample video\n"
               "  streamvlm ask clip.mp4 --model ./llava-ov --fps 1 -q 'What is on the table?' -q 'And after?'\n"
               "  streamvlm live --source rtsp://cam/stream --ask 'Anyone there?' --ask-every 30\n"
               "  streamvlm caption videos/ --out captions.jsonl --fps 1 --segment 30\n"
               "  streamvlm init-tiny ./tiny && streamvlm ask --model ./tiny -q 'Hi?'\n"
               "  streamvlm bench dense --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ask", help="answer questions about a video file",
                       description="Decode a video, stream its frames into one session, then ask each question "
                                   "in turn; later questions see the earlier answers.")
    p.add_argument("video", nargs="?", help="video file (default: the built-in sample video)")
    p.add_argument("-q", "--question", action="append", default=None,
                   help="a question (repeat for several; " + default_help(lambda d: d.ask) + ")")
    g = p.add_argument_group("frames")
    g.add_argument("--num-frames", type=_positive_int, default=None, metavar="N",
                   help="N frames spread evenly over the video (default 8 when --fps is not given)")
    g.add_argument("--fps", type=_positive_float, default=None, help="take frames at this rate instead")
    g.add_argument("--max-frames", type=_positive_int, default=None, metavar="N", help="cap on frames taken with --fps")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer, then the stats")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("live", help="watch a live stream (or a file played as live) and answer questions",
                       description="Capture a source on one thread, stream its frames into the model's cache on "
                                   "another, and answer questions while it plays: from --ask (every --ask-every "
                                   "seconds of stream time, or once at the end of the run), or typed on stdin, one "
                                   "per line. Each answer is printed with the stream time it refers to. When the "
                                   "model is slower than the source, old frames are dropped (and counted), never "
                                   "queued. Network streams reconnect with backoff when they end or stall. The "
                                   "cache has a memory budget, so it stays flat for hours. Exit status 0 when the "
                                   "source ends or --duration passes, 1 if the source failed part way, 2 if it "
                                   "never opened.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Sources:\n"
                              "  sample                     the built-in sample video, played as live\n"
                              "  clip.mp4                   a file played at its own rate (--speed, --loop)\n"
                              "  rtsp://host:8554/cam       RTSP (over TCP)\n"
                              "  udp://127.0.0.1:5000       MPEG-TS over UDP (also http://, tcp://, srt://, rtmp://)\n"
                              "  /dev/video0                a V4L2 webcam (--source-option video_size=640x480)\n"
                              "  lavfi:testsrc=size=320x240:rate=25   an FFmpeg test source\n"
                              "Examples:\n"
                              "  streamvlm live --source sample --ask 'which way is the red square moving?'\n"
                              "  streamvlm live --source rtsp://cam/stream --fps 1 --ask 'Is anyone at the door?' "
                              "--ask-every 30 --json\n"
                              "  streamvlm live --source /dev/video0 --duration 600 --memory-budget 256MB")
    p.add_argument("--source", default="sample", help="what to watch (see below; default: sample)")
    p.add_argument("--fps", type=_positive_float, default=1.0, help="frames per second fed to the model (default 1)")
    p.add_argument("--ask", action="append", metavar="QUESTION",
                   help="a question (repeat for several); also type questions on stdin while it runs")
    p.add_argument("--ask-every", type=_positive_float, default=None, metavar="SECONDS",
                   help="ask the --ask questions every SECONDS of stream time (default: once, at the end)")
    p.add_argument("--duration", type=_positive_float, default=None, metavar="SECONDS",
                   help="stop cleanly after this many seconds (default: when the source ends, or Ctrl-C)")
    p.add_argument("--memory-budget", default="auto",
                   help="KV cache bound: auto (half the model's context), N tokens per layer, a size such as "
                        "256MB, or none")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line per event on stdout: answer, status, reconnect, dropped, "
                        "error, ..., each with 'type' and 't' (stream seconds)")
    p.add_argument("--status-every", type=_non_negative_float, default=5.0, metavar="SECONDS",
                   help="seconds between status lines (default 5; 0: only the final one)")
    p.add_argument("--no-stdin", action="store_true", help="do not read questions from stdin")
    g = p.add_argument_group("source")
    g.add_argument("--speed", type=_non_negative_float, default=1.0,
                   help="files and lavfi: playback speed (default 1 = real time; 0 = as fast as it decodes)")
    g.add_argument("--loop", action="store_true", help="files: start over at the end")
    g.add_argument("--open-timeout", type=_positive_float, default=10.0, metavar="SECONDS",
                   help="network and webcams: seconds to open the stream; one that has not connected by then "
                        "(retries included) ends the run with exit status 2 (default 10)")
    g.add_argument("--read-timeout", type=_positive_float, default=5.0, metavar="SECONDS",
                   help="network and webcams: seconds without data before reconnecting (default 5)")
    g.add_argument("--retries", type=int, default=5,
                   help="failed attempts in a row before giving up (default 5; -1: never give up)")
    g.add_argument("--buffer-frames", type=_positive_int, default=8, metavar="N",
                   help="frames held between capture and the model; older ones are dropped (default 8)")
    g.add_argument("--source-option", action="append", metavar="KEY=VALUE",
                   help="an FFmpeg option for the source (repeat), e.g. video_size=640x480 for a webcam")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_live)

    p = sub.add_parser("caption", help="caption long videos to JSON Lines, resumable and shardable",
                       description="Stream each video through one session, caption every segment as it goes, "
                                   "then summarize the whole video. One JSON line per video (written whole; a "
                                   "re-run skips videos already in the output). Exit status 1 if any video "
                                   "failed. Scale out with `accelerate launch -m streamvlm caption ...` or "
                                   "torchrun (each rank takes a share; rank 0 merges), or split a job array "
                                   "with --num-shards/--shard-index.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Example:\n  streamvlm caption videos/ more/*.mkv list.txt --out captions.jsonl "
                              "--fps 1 --segment 30 --routing mod:0.2:interleaved")
    p.add_argument("inputs", nargs="+", help="video files, folders (recursive), globs, or .txt files listing paths")
    p.add_argument("--out", required=True, help="JSON Lines output file (appended to; resumable)")
    p.add_argument("--fps", type=_positive_float, default=1.0, help="frames per second fed to the model (default 1)")
    p.add_argument("--segment", type=_positive_float, default=10.0, help="seconds of video per caption (default 10)")
    p.add_argument("--prompt", default=None,
                   help="asked at the end of every segment (" + default_help(lambda d: d.caption) + ")")
    p.add_argument("--summary-prompt", default=None,
                   help="asked once at the end of each video (" + default_help(lambda d: d.summary) + ")")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="longest caption (default 64)")
    p.add_argument("--memory-budget", default="auto",
                   help="KV cache bound per video: auto (half the model's context), N tokens per layer, a size "
                        "such as 256MB, or none")
    p.add_argument("--batch", type=_positive_int, default=1, metavar="N",
                   help="videos captioned at once, their language-model steps run together in one forward (the "
                        "weights read once a step for all N; the same captions as one at a time); default 1")
    p.add_argument("--num-shards", type=_positive_int, default=1, help="split the inputs into this many job shards")
    p.add_argument("--shard-index", type=_non_negative_int, default=0, help="which shard this job takes (0-based); its "
                   "output gets a .shard-I-of-N suffix")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_model_args(p)
    p.set_defaults(func=cmd_caption)

    from streamvlm.routers.registry import describe_policies, quality_labels

    p = sub.add_parser("compare", help="routing policies side by side on one model, video and question",
                       description=textwrap.fill(
                           "For each policy: language-model FLOPs and KV bytes as fractions of dense, ingest time "
                           "relative to dense, and fidelity to dense on the dense model's own answer (KL of the "
                           "next-token distributions, top-1 agreement), all in one run.", 100),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Policies (--routing and --policies values; also a router folder from training or "
                              "calibrate):\n" + describe_policies())
    p.add_argument("--video", help="video file (default: the sample video)")
    p.add_argument("--question", default=None,
                   help="the question to answer (" + default_help(lambda d: d.question) + ")")
    p.add_argument("--policies", action="append", metavar="SPECS",
                   help="--routing values separated by ';' (quote them in a shell), or the flag repeated; a comma "
                        "never separates policies, so schedule:1,0.5,0.5 is one (default: every policy below at "
                        "the setting 'compare runs' names)")
    p.add_argument("--num-frames", type=_positive_int, default=8, help="frames spread over the video (default 8)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=16, help="length of the dense answer scored (default 16)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed ingests per policy, median (default 3)")
    p.add_argument("--budget", type=_probability, default=None, metavar="F",
                   help="set every policy to spend F of the language model's dense FLOPs on this clip (within 0.03) "
                        "by solving for its knob (keep ratio, drop layer, window, head count, knee floor, schedule "
                        "scale, ...); one that cannot reach F runs at its nearest point, with a note. Without "
                        "--policies: every policy that has a knob, and dense")
    p.add_argument("--json", action="store_true", help="JSON rows instead of a table")
    _add_model_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("calibrate", help="choose a policy's setting on calibration clips",
                       description="vtw: the first layer from which vision tokens can be dropped with the answer "
                                   "distribution within --threshold KL of dense (VTW), averaged over the clips "
                                   "and questions. heads: YOPO's head scores (attention on vision / on text) and "
                                   "the mask of inactive heads. schedule: per-layer keep ratios, greedy from "
                                   "shallow to deep (G-Search) or a sigmoid tuned by Bayesian optimisation "
                                   "(P-Sigmoid), the first layer always dense. yopo: YOPO's parts together "
                                   "(--spec), with the head mask that keeps its HEADS fraction of heads, the most "
                                   "often active (attention on "
                                   "vision / on text > --tau). Each writes a router folder for --routing.")
    p.add_argument("method", choices=["vtw", "heads", "schedule", "yopo"],
                   help="vtw: VTW's layer for layer_drop; heads: YOPO's inactive-head mask for head_prune; "
                        "schedule: a per-layer keep schedule (G-Search or P-Sigmoid); yopo: the combined yopo "
                        "policy of --spec with its head mask")
    p.add_argument("--spec", default="yopo",
                   help="yopo: the settings, yopo[:W[:HEADS[:FFN[:DROP]]]] (default yopo: YOPO's published "
                        "settings, window 5, half the heads, half the FFN, layer drop at half the depth)")
    p.add_argument("--search", choices=["greedy", "sigmoid"], default="greedy",
                   help="schedule: greedy (G-Search, holds --threshold KL) or sigmoid (P-Sigmoid, Bayesian "
                        "optimisation under --flops-budget)")
    p.add_argument("--flops-budget", type=_probability, default=0.5,
                   help="schedule, sigmoid: the most LLM FLOPs, as a fraction of dense (default 0.5)")
    p.add_argument("--trials", type=_positive_int, default=20, help="schedule, sigmoid: optimisation trials (default 20)")
    p.add_argument("--sampler", choices=["gp", "tpe"], default="gp",
                   help="schedule, sigmoid: the Bayesian optimiser: gp, a Gaussian process with expected "
                        "improvement (the paper's kind; optuna's GPSampler, needs scipy), or tpe, optuna's "
                        "tree-structured Parzen estimator (default gp)")
    p.add_argument("--videos", nargs="+", help="calibration videos (default: the sample video)")
    p.add_argument("--question", action="append",
                   help="calibration question (repeat; " + default_help(lambda d: d.calibrate) + ")")
    p.add_argument("--threshold", type=_non_negative_float, default=0.003,
                   help="vtw and greedy schedule: KL threshold (VTW: 0.003 for 7B models)")
    p.add_argument("--tau", type=_non_negative_float, default=0.07, help="heads and yopo: vision/text attention ratio a "
                   "head must pass to count as active in a sample (YOPO: ~0.07 for Qwen2-VL)")
    p.add_argument("--min-fraction", type=_number(float, 0.0, 1.0, what="0 to 1"), default=0.4,
                   help="heads: keep a head active in more than this fraction of samples (YOPO: 40%%; yopo keeps "
                        "its spec's HEADS fraction instead)")
    p.add_argument("--num-frames", type=_positive_int, default=8, help="frames per clip (default 8)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=16, help="answer tokens scored (default 16)")
    p.add_argument("--out", required=True, help="router folder to write")
    p.add_argument("--write-anyway", action="store_true",
                   help="vtw: write the router even when no layer meets --threshold (it then drops nothing; "
                        "without this flag that exits 2)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_model_args(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("init-tiny", help="write a small random checkpoint (offline)",
                       description="Write a randomly initialised checkpoint of a supported family in the Hugging "
                                   "Face layout (weights, tokenizer, chat template, preprocessor configs), made "
                                   "with transformers' own classes. It is untrained: use it to try the runtime "
                                   "and to test, not for answers.")
    p.add_argument("dir", help="output folder")
    p.add_argument("--family", default="llava_onevision",
                   choices=("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm"),
                   help="model family (default llava_onevision)")
    p.add_argument("--real-small", action="store_true",
                   help="the shape of a real small model (12 layers, hidden 640, 196 tokens per frame)")
    p.add_argument("--layers", type=_positive_int, default=None, help="decoder layers")
    p.add_argument("--hidden", type=_positive_int, default=None, help="decoder width")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=cmd_init_tiny)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API, live streams over WebSocket, and a web page",
                       description="Serve the model over HTTP. POST /v1/chat/completions takes OpenAI chat requests "
                                   "whose user message carries a video_url (a file in --allowed-media-dir, or a "
                                   "data: URI); POST /v1/streams opens a live source whose cache lives between "
                                   "questions, asked over the WebSocket /v1/streams/{id}/ws; the page at / does "
                                   "both in a browser; /docs describes the API.",
                       epilog="example: streamvlm serve --allowed-media-dir ~/videos --api-key $(openssl rand -hex 16)"
                              "   then: curl -H 'Authorization: Bearer KEY' localhost:8000/v1/models")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 for every interface: "
                        "then use --api-key)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one and prints it)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every /v1 endpoint (default: $STREAMVLM_API_KEY; "
                        "none: open to anyone who can connect). Use letters, digits and -._~ (e.g. openssl rand "
                        "-hex 16): browsers send the key on a WebSocket as a subprotocol name, which allows no "
                        "'/' or '='")
    p.add_argument("--allowed-media-dir", default=None, metavar="DIR",
                   help="video files requests may name (relative to DIR; nothing outside it, symlinks included); "
                        "default: none, videos come as data: URIs or live streams")
    p.add_argument("--max-sessions", type=_positive_int, default=4, metavar="N",
                   help="live streams running at once; one that ended or failed frees its slot (default 4)")
    p.add_argument("--ended-grace-s", type=_non_negative_float, default=300.0, metavar="S",
                   help="how long a stream that ended or failed stays readable before it is closed (default 300)")
    p.add_argument("--max-batch", type=_positive_int, default=8, metavar="N",
                   help="requests and live streams whose language-model steps run together in one forward "
                        "(continuous batching: a request joins the running batch at its next token and leaves "
                        "when done; default 8). 1: each request runs alone, one at a time")
    p.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                   help="requests worked on at once when --max-batch is 1 (default 1: torch already spreads one "
                        "request over the cores); with batching, max(N, --max-batch) are")
    p.add_argument("--max-step-tokens", type=_positive_int, default=2048, metavar="N",
                   help="tokens one batched forward runs at most (default 2048). A longer prefill (a long prompt, a "
                        "video chunk of many tokens) runs in pieces of at most N less one per other request of a "
                        "forward, one forward each, with the other requests' answer tokens beside it; a frame is "
                        "never cut. Lower: a smoother decode beside long prompts; higher: fewer, larger forwards")
    p.add_argument("--prefix-cache-mb", type=_non_negative_float, default=1024.0, metavar="MB",
                   help="keep the caches of ingested videos, up to MB (least recently used dropped first), so a "
                        "request about a video an earlier request sent (same file or data, video options, system "
                        "prompt, routing and cache_salt) skips decoding and ingesting it and answers from a copy "
                        "(default 1024; 0: off). On a GPU the kept caches are in GPU memory")
    p.add_argument("--max-data-mb", type=_positive_float, default=32.0, metavar="MB",
                   help="largest video sent inline as a data: URI (default 32)")
    p.add_argument("--max-body-mb", type=_positive_float, default=48.0, metavar="MB",
                   help="largest request body (default 48)")
    p.add_argument("--header-timeout-s", type=_positive_float, default=10.0, metavar="S",
                   help="seconds a connection may take to send a request's headers, then it is closed (default 10)")
    p.add_argument("--body-timeout-s", type=_positive_float, default=30.0, metavar="S",
                   help="seconds a request body may go without a byte arriving, then 408 (default 30)")
    p.add_argument("--keep-alive-s", type=_positive_float, default=5.0, metavar="S",
                   help="seconds an idle keep-alive connection stays open (default 5)")
    p.add_argument("--max-connections", type=_positive_int, default=256, metavar="N",
                   help="connections open at once, WebSockets included; more get 503 (default 256)")
    p.add_argument("--max-asks-per-connection", type=_positive_int, default=4, metavar="N",
                   help="questions one WebSocket may have answering or waiting; more get an error event (default 4)")
    p.add_argument("--max-asks-per-stream", type=_positive_int, default=16, metavar="N",
                   help="questions a live stream may have answering (one at a time) or waiting (default 16)")
    p.add_argument("--no-devices", action="store_true", help="refuse to open cameras (/dev/videoN) for clients")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the checkpoint folder's name, or streamvlm-builtin)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="performance figures, measured as ratios in one run",
                       description="Time our runtime against transformers on the same checkpoint in one run. "
                                   "Without --model, a random checkpoint with the shape of a real small model "
                                   "is made in the cache folder.")
    p.add_argument("suite", choices=["dense", "routing", "caption", "stream", "streams", "serve", "quality"],
                   help="dense: ingest and answer, ours vs transformers' forward; routing: ingest time dense vs "
                        "mod at keep 1.0/0.5/0.2, interleaved and all (first two layers dense), against the "
                        "speed-up the FLOPs predict; caption: hours of video captioned per hour of compute, "
                        "built-in tiny and small-shaped models, dense and mod:0.2:interleaved; stream: a long "
                        "stream from a file at full speed: sustained ingest rate, time to first token at each "
                        "--ages, peak memory, and transformers re-running on all frames so far for each question; streams: "
                        "--streams live streams from files at full speed, their steps batched, against the same "
                        "streams one at a time (aggregate frames/s; default: the built-in model); "
                        "serve: `streamvlm serve` in its own process under --clients concurrent clients asking "
                        "video questions (requests/s, tokens/s, latency percentiles; the built-in model and a decode-heavy "
                        "workload, for each --max-batch), and time to first token over "
                        "the WebSocket for live streams at --ages (default: the built-in model); quality: answer "
                        "accuracy per question kind on held-out procedural world videos for each --policies "
                        "routing, with LLM FLOPs and KV bytes as fractions of dense (default: the built-in model)")
    p.add_argument("--model", metavar="DIR", help="checkpoint to measure (default: random, real-small shape)")
    p.add_argument("--frames", type=_positive_int, default=8, help="frames to ingest (default 8)")
    p.add_argument("--new-tokens", type=_positive_int, default=32, help="answer tokens to generate (default 32)")
    p.add_argument("--video-seconds", type=_positive_int, default=60, help="length of the caption bench's video (default 60)")
    p.add_argument("--ages", default=None,
                   help="stream, serve: stream ages in minutes at which to ask (default 1,10,60; serve 1,30)")
    p.add_argument("--clients", default="1,4,16", help="serve: concurrent clients, comma-separated (default 1,4,16)")
    p.add_argument("--requests", type=_positive_int, default=32,
                   help="serve: requests per client count (at least one per client; default 32)")
    p.add_argument("--min-seconds", type=_non_negative_float, default=3.0, metavar="S",
                   help="serve: each client count's row goes on sending past --requests until S seconds have "
                        "passed, so that a row of short answers times more than a burst (default 3; 0: exactly "
                        "--requests)")
    p.add_argument("--rounds", type=_positive_int, default=3, metavar="N",
                   help="serve: rounds of load rows; a workload's servers (one per --max-batch) run side by side "
                        "and each round sends every client count's row to each in turn, so a ratio compares rows "
                        "timed close together; the ratios are the median over rounds (default 3)")
    p.add_argument("--clip-seconds", type=_positive_float, default=4.0,
                   help="serve: length of the clip each question is about (default 4)")
    p.add_argument("--workers", type=_positive_int, default=1, help="serve: the server's --workers (default 1)")
    p.add_argument("--max-batch", default=None, metavar="N,N",
                   help="serve: the server's --max-batch values, one server each, compared in one run (default "
                        "1,8: without and with batching); caption: the --batch values of `caption` on copies of "
                        "the video (default 1,4)")
    p.add_argument("--no-decode-heavy", action="store_true",
                   help="serve: skip the decode-heavy workload (64 tokens a request, end token ignored)")
    p.add_argument("--heavy-model", metavar="DIR", default=None,
                   help="serve: the decode-heavy workload's checkpoint (default: random, real-small shape)")
    p.add_argument("--prefix-cache-mb", type=_non_negative_float, default=None, metavar="MB",
                   help="serve: the servers' --prefix-cache-mb (default: theirs, 1024). Every request asks about "
                        "the same clip, so with the cache on a server ingests it once; 0 makes every request "
                        "ingest it")
    p.add_argument("--abuse-rounds", type=_non_negative_int, default=3, metavar="N",
                   help="serve: bursts of oversized video requests (4000x3000 and 1080p sources asked for more "
                        "frames than the context holds, and for the most it holds), with the server's RSS before, "
                        "at peak and after, and /health latency during them; 0 skips (default 3)")
    p.add_argument("--streams", type=_positive_int, default=4, metavar="N",
                   help="streams: live streams run together (default 4)")
    p.add_argument("--stream-fps", type=_positive_float, default=1.0, help="stream: frames per second sampled (default 1)")
    p.add_argument("--memory-budget", default="8192",
                   help="stream: our session's KV bound, tokens per layer or a size (default 8192)")
    p.add_argument("--no-baseline", action="store_true", help="stream: skip the transformers baseline")
    p.add_argument("--models", default="tiny",
                   help="stream: model sizes, tiny (the built-in shape, long context) and/or small (the real-small "
                        "shape), comma-separated (default tiny; --model DIR measures that checkpoint instead)")
    quality_default = ";".join(quality_labels()).replace("%", "%%")
    p.add_argument("--policies", action="append", metavar="SPECS",
                   help="quality: --routing values separated by ';' (quoted in a shell), or the flag repeated "
                        f"(default {quality_default}); random:KEEP and uniform:KEEP route the layers mod:KEEP routes "
                        "for the model (its own router's), so they spend the same budget")
    p.add_argument("--budget", type=_probability, default=None, metavar="F",
                   help="quality: set every policy to spend F of the language model's dense FLOPs (within 0.03) by "
                        "solving for its knob (keep ratio, drop layer, window, head count, knee floor, schedule "
                        "scale, ...) on 2 world videos of another seed; a policy that cannot reach F is reported at "
                        "its nearest point and marked *. Without --policies: dense and every registered method "
                        "(mod with the model's shipped router). A spec in --policies keeps its other arguments "
                        "(fastv:1 solves R with K=1; schedule:1,1,0.5,0.25 scales that shape)")
    p.add_argument("--sweep", default=None, metavar="F1,F2,...",
                   help="quality: --budget at each of these fractions, e.g. 0.2,0.3,0.5,0.7, for the accuracy-vs-FLOPs "
                        "picture (--plot)")
    p.add_argument("--calibration-videos", type=_positive_int, default=2, metavar="N",
                   help="quality with --budget or --sweep: world videos (of another seed than --seed) the knobs are "
                        "solved on (default 2)")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="quality with --sweep or --budget: draw accuracy against LLM FLOPs per method, with dense and "
                        "the random baseline on every panel, to FILE (.svg or .png; needs the plot extra: pip install "
                        "'streamvlm[plot]')")
    p.add_argument("--seed", type=int, default=None,
                   help="quality: seed of the held-out videos (default 1234; training used 0 and 1)")
    p.add_argument("--num-videos", type=_positive_int, default=100, help="quality: held-out videos (default 100)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed repeats; the median is reported (default 3 for dense, 5 for routing); dense times the "
                        "phases in rounds, each phase once a round; streams: rounds of one at a time then together "
                        "(default 1)")
    p.add_argument("--compile", action="store_true",
                   help="dense: also time decode steps compiled with torch.compile against eager (ms/token)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ask" and args.question is None:
        from streamvlm.prompts import default_prompts

        args.question = list(default_prompts(args.model).ask)
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except StreamVLMError as e:
        print(f"streamvlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("streamvlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
