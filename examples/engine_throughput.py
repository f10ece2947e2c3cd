"""The server's engine without HTTP: tokens per second of N chat requests at once, unbatched and batched.

    python examples/engine_throughput.py [--model DIR] [--requests 16] [--new-tokens 64] [--rounds 2]

Each request is `bench serve`'s decode-heavy one (2 frames of a 4 s clip, the end token ignored), sent straight
to an `Engine` through `run_chat`; all N are submitted at once, after one warm-up request whose clip the prefix
cache keeps. Rounds alternate `--max-batch 1` and `--max-batch 8` in one process, so run it once per checkout
to compare two versions (docs/performance.md, the step thread before and after). Without --model it uses
`bench serve`'s random real-small-shaped checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from streamvlm import StreamVLM
from streamvlm.bench.common import bench_model_dir, bench_video
from streamvlm.serve import Engine, MediaPolicy
from streamvlm.serve.completions import ChatRequest, parse_request, run_chat


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: bench serve's real-small-shaped one)")
    parser.add_argument("--requests", type=int, default=16, help="requests submitted at once (default 16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="answer tokens a request (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of unbatched then batched (default 2)")
    args = parser.parse_args(argv)
    if min(args.requests, args.new_tokens, args.rounds) < 1:
        parser.error("--requests, --new-tokens and --rounds must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    vlm = StreamVLM.from_pretrained(args.model or bench_model_dir())
    media = Path(tempfile.mkdtemp(prefix="streamvlm-engine-"))
    try:
        shutil.copy(bench_video(4.0, fps=8.0, size=128), media / "clip.mp4")
        policy = MediaPolicy(media)
        body = {"model": "m", "max_tokens": args.new_tokens, "ignore_eos": True, "video": {"num_frames": 2},
                "messages": [{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": "clip.mp4"}},
                    {"type": "text", "text": "What is happening in the video?"}]}]}

        def request(engine: Engine) -> None:
            for _ in run_chat(engine, policy, parse_request(ChatRequest.model_validate(body), "m")):
                pass

        print(f"{args.requests} requests at once, {args.new_tokens} tokens each")
        for round_ in range(1, args.rounds + 1):
            for batch in (1, 8):
                engine = Engine(vlm, "m", max_batch=batch)
                try:
                    engine.pool.submit(request, engine).result()  # warm-up; its clip is kept
                    start = time.perf_counter()
                    for future in [engine.pool.submit(request, engine) for _ in range(args.requests)]:
                        future.result()
                    seconds = time.perf_counter() - start
                finally:
                    engine.close()
                rate = args.requests * args.new_tokens / seconds
                print(f"round {round_}  --max-batch {batch}  {rate:8.1f} tokens/s")
    finally:
        shutil.rmtree(media, ignore_errors=True)


if __name__ == "__main__":
    main()
