"""The server's engine without HTTP: tokens (or requests) per second of N chat requests at once, unbatched
and batched.

    python examples/engine_throughput.py [--workload decode-heavy] [--model DIR] [--requests 16] [--new-tokens 64] [--rounds 2]

With `--workload decode-heavy` each request is `bench serve`'s decode-heavy one (2 frames of a 4 s clip, the
end token ignored; without --model on `bench serve`'s random real-small-shaped checkpoint), and the figure is
tokens per second. With `--workload built-in` it is `bench serve`'s built-in one (8 frames of an 8 s clip, up
to --new-tokens tokens, stopping at the end token: the built-in model answers in a word), and the figure is
requests per second. Requests are sent straight to an `Engine` through `run_chat`; all N are submitted at
once, after one warm-up request whose clip the prefix cache keeps. Rounds alternate `--max-batch 1` and
`--max-batch 8` in one process, so run it once per checkout to compare two versions (docs/performance.md).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from streamvlm import StreamVLM
from streamvlm.bench.common import bench_model_dir, bench_video
from streamvlm.world.builtin import default_model_dir
from streamvlm.serve import Engine, MediaPolicy
from streamvlm.serve.completions import ChatRequest, parse_request, run_chat


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["decode-heavy", "built-in"], default="decode-heavy",
                        help="bench serve's decode-heavy requests (tokens/s) or its built-in ones (requests/s) "
                             "(default decode-heavy)")
    parser.add_argument("--model", help="checkpoint folder (default: bench serve's real-small-shaped one for "
                                        "decode-heavy, the built-in model for built-in)")
    parser.add_argument("--requests", type=int, default=16, help="requests submitted at once (default 16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="answer tokens a request (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of unbatched then batched (default 2)")
    args = parser.parse_args(argv)
    if min(args.requests, args.new_tokens, args.rounds) < 1:
        parser.error("--requests, --new-tokens and --rounds must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    heavy = args.workload == "decode-heavy"
    vlm = StreamVLM.from_pretrained(args.model or (bench_model_dir() if heavy else default_model_dir()))
    media = Path(tempfile.mkdtemp(prefix="streamvlm-engine-"))
    try:
        shutil.copy(bench_video(4.0 if heavy else 8.0, fps=8.0, size=128), media / "clip.mp4")
        policy = MediaPolicy(media)
        body = {"model": "m", "max_tokens": args.new_tokens, "ignore_eos": heavy,
                "video": {"num_frames": 2 if heavy else 8},
                "messages": [{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": "clip.mp4"}},
                    {"type": "text", "text": "What is happening in the video?"}]}]}

        def request(engine: Engine) -> int:
            *_, result = run_chat(engine, policy, parse_request(ChatRequest.model_validate(body), "m"))
            return result.completion_tokens

        print(f"{args.workload}: {args.requests} requests at once, " +
              (f"{args.new_tokens} tokens each" if heavy else f"up to {args.new_tokens} tokens each"))
        for round_ in range(1, args.rounds + 1):
            for batch in (1, 8):
                engine = Engine(vlm, "m", max_batch=batch)
                try:
                    engine.pool.submit(request, engine).result()  # warm-up; its clip is kept
                    start = time.perf_counter()
                    tokens = sum(f.result() for f in [engine.pool.submit(request, engine)
                                                      for _ in range(args.requests)])
                    seconds = time.perf_counter() - start
                finally:
                    engine.close()
                if heavy:
                    print(f"round {round_}  --max-batch {batch}  {tokens / seconds:8.1f} tokens/s")
                else:
                    print(f"round {round_}  --max-batch {batch}  {args.requests / seconds:8.1f} requests/s "
                          f"({tokens / args.requests:.1f} tokens a request)")
    finally:
        shutil.rmtree(media, ignore_errors=True)


if __name__ == "__main__":
    main()
