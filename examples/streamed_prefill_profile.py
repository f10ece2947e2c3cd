"""Where streamed prefill spends more than one-shot prefill: the vision tower and the language model timed apart,
then the profiler's CPU time per op for both.

On the real-small shape (the `streamvlm bench dense` checkpoint), one session ingests 8 frames in one call
and another appends them one at a time.

1. Wall clock, in interleaved rounds: encoding the frames (all at once against one at a time) and the language
   model's ingest of the encoded frames (`append_encoded`, all at once against one at a time), each round timing
   every part once, back to back; the median of each and the ratio of the medians.
2. The profiler: whole sessions (frames, then one answer token), the ops whose time differs most.

With --only MODE, just the language model's ingest in that mode, 4 times and nothing else, for a sampling
profiler outside Python (`perf record -F 999 -- python examples/streamed_prefill_profile.py --only streamed`);
docs/performance.md, "Streamed prefill".

    python examples/streamed_prefill_profile.py [--model DIR] [--frames 8] [--top 8] [--rounds 5] [--only MODE]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from streamvlm import StreamVLM
from streamvlm.bench.common import bench_model_dir, timed_rounds

QUESTION = "What happens in the video?"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="DIR", help="checkpoint (default: the bench dense one, real-small shape)")
    parser.add_argument("--frames", type=int, default=8, help="frames ingested (default 8)")
    parser.add_argument("--top", type=int, default=8, help="ops listed (default 8)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the wall-clock parts (default 5)")
    parser.add_argument("--only", choices=["one-shot", "streamed"],
                        help="run only the language model's ingest in this mode, for an outside profiler")
    args = parser.parse_args(argv)
    if args.frames < 2 or args.top < 1 or args.rounds < 1:
        parser.error("--frames must be at least 2, --top and --rounds at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    vlm = StreamVLM.from_pretrained(Path(args.model) if args.model else bench_model_dir())
    size = vlm.adapter.preprocess_config
    frames = torch.randint(0, 256, (args.frames, size.height, size.width, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    features = vlm.encode(frames)

    def ingest(step: int):
        def run() -> None:
            session = vlm.session()
            for i in range(0, args.frames, step):
                session.append_encoded(features[i:i + step])
        return run

    if args.only:
        run = ingest(args.frames if args.only == "one-shot" else 1)
        for _ in range(4):
            run()
        return

    rounds = timed_rounds({
        "vision, all at once": lambda: vlm.encode(frames),
        "vision, one at a time": lambda: [vlm.encode(frames[i:i + 1]) for i in range(args.frames)],
        "language model, all at once": ingest(args.frames),
        "language model, one at a time": ingest(1),
    }, args.rounds)
    median = {name: statistics.median(times) for name, times in rounds.items()}
    print(f"wall clock, median of {args.rounds} interleaved rounds ({args.frames} frames):")
    for part in ("vision", "language model"):
        one, many = median[f"{part}, all at once"], median[f"{part}, one at a time"]
        print(f"  {part:<16} all at once {one:.3f} s, one at a time {many:.3f} s ({many / one:.2f}x)")

    def one_shot() -> None:
        session = vlm.session()
        session.append_frames(frames)
        session.ask(QUESTION, max_new_tokens=1, ignore_stop=True)

    def streamed() -> None:
        session = vlm.session()
        for i in range(args.frames):
            session.append_frames(frames[i:i + 1])
        session.ask(QUESTION, max_new_tokens=1, ignore_stop=True)

    ops = {}
    for name, run in (("one-shot", one_shot), ("streamed", streamed)):
        run()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        ops[name] = {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}
    total = {name: sum(t for t, _ in table.values()) for name, table in ops.items()}
    print(f"CPU time of every op: one-shot {total['one-shot']:.3f} s, streamed {total['streamed']:.3f} s "
          f"({total['streamed'] / total['one-shot']:.2f}x)")
    keys = set(ops["one-shot"]) | set(ops["streamed"])
    diff = sorted(keys, key=lambda k: ops["streamed"].get(k, (0, 0))[0] - ops["one-shot"].get(k, (0, 0))[0],
                  reverse=True)
    print(f"{'op':<52}{'one-shot s':>11}{'calls':>7}{'streamed s':>12}{'calls':>7}")
    for key in diff[:args.top]:
        (a, na), (b, nb) = ops["one-shot"].get(key, (0, 0)), ops["streamed"].get(key, (0, 0))
        print(f"{key[:51]:<52}{a:>11.3f}{na:>7}{b:>12.3f}{nb:>7}")


if __name__ == "__main__":
    main()
