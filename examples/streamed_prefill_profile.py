"""Where streamed prefill spends more than one-shot prefill: the profiler's CPU time per op for both.

On the real-small shape (the `streamvlm bench dense` checkpoint), one session ingests 8 frames in one call
and another appends them one at a time; each then answers one token. Prints the ops whose time differs most
(docs/performance.md, `bench dense --compile`).

    python examples/streamed_prefill_profile.py [--frames 8] [--top 8]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from streamvlm import StreamVLM
from streamvlm.bench.common import bench_model_dir

QUESTION = "What happens in the video?"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8, help="frames ingested (default 8)")
    parser.add_argument("--top", type=int, default=8, help="ops listed (default 8)")
    args = parser.parse_args(argv)
    if args.frames < 2 or args.top < 1:
        parser.error("--frames must be at least 2 and --top at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    vlm = StreamVLM.from_pretrained(bench_model_dir())
    size = vlm.adapter.preprocess_config
    frames = torch.randint(0, 256, (args.frames, size.height, size.width, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))

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
