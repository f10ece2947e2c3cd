"""What oneDNN's linear layers give on this CPU: sessions with them against the same sessions with F.linear.

streamvlm runs a CPU model's linear layers through oneDNN (streamvlm.kernels); `stock_linears()` puts F.linear
(MKL's sgemm) back for a block. On one loaded model (default: the `streamvlm bench dense` checkpoint, real-small
shape) this times, in interleaved rounds, each phase with oneDNN and with F.linear back to back:

    prefill     8 frames in one call, then one answer token
    streamed    the 8 frames appended one at a time, then one answer token
    answer      prefill, then --new-tokens greedy tokens; decode ms/token = (answer - prefill) / (tokens - 1)

and before that, F.linear against oneDNN alone on a few weight shapes (out x in) and row counts, with the
same weights and inputs (--no-shapes skips it). It prints the median of each, the speed-ups, streamed
prefill against one-shot under each, and whether the answers are the same text (docs/performance.md,
"Linear layers through oneDNN").

    python examples/cpu_linear.py [--model DIR] [--frames 8] [--new-tokens 16] [--rounds 3] [--no-shapes]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from streamvlm import StreamVLM
from streamvlm.bench.common import bench_model_dir, timed_rounds
from streamvlm.kernels import stock_linears

QUESTION = "What happens in the video?"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="DIR", help="checkpoint (default: the bench dense one, real-small shape)")
    parser.add_argument("--frames", type=int, default=8, help="frames per session (default 8)")
    parser.add_argument("--new-tokens", type=int, default=16, help="answer tokens of the answer phase (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--no-shapes", action="store_true", help="skip timing single linear layers")
    args = parser.parse_args(argv)
    if args.frames < 2 or args.new_tokens < 2 or args.rounds < 1:
        parser.error("--frames and --new-tokens must be at least 2, --rounds at least 1")
    return args


SHAPES = ((128, 128), (512, 512), (640, 640), (1024, 1024), (2560, 640))
ROWS = (1, 8, 36, 196)


@torch.inference_mode()
def time_shapes(rounds: int) -> None:
    """F.linear (MKL) against oneDNN on one weight at a time, microseconds a call."""
    print(f"one linear layer, us a call (F.linear / oneDNN), median of {rounds} rounds:")
    print(f"{'weight':<11}" + "".join(f"{f'{m} rows':>22}" for m in ROWS))
    for out, inp in SHAPES:
        w, cells = torch.randn(out, inp), []
        for m in ROWS:
            x = torch.randn(m, inp)
            calls = max(10, int(2e7 / (out * inp * m + 1e5)))

            def many(fn):
                return lambda: [fn(x, w) for _ in range(calls)]
            times = timed_rounds({"mkl": many(F.linear), "onednn": many(onednn)}, rounds)
            mkl, dnn = (statistics.median(times[k]) / calls * 1e6 for k in ("mkl", "onednn"))
            cells.append(f"{mkl:.0f}/{dnn:.0f} ({mkl / dnn:.2f}x)")
        print(f"{f'{out}x{inp}':<11}" + "".join(f"{c:>22}" for c in cells))


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.no_shapes:
        time_shapes(args.rounds)
    vlm = StreamVLM.from_pretrained(Path(args.model) if args.model else bench_model_dir())
    size = vlm.adapter.preprocess_config
    frames = torch.randint(0, 256, (args.frames, size.height, size.width, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))

    def prefill(tokens: int = 1):
        session = vlm.session()
        session.append_frames(frames)
        return session.ask(QUESTION, max_new_tokens=tokens, ignore_stop=True)

    def streamed():
        session = vlm.session()
        for i in range(args.frames):
            session.append_frames(frames[i:i + 1])
        session.ask(QUESTION, max_new_tokens=1, ignore_stop=True)

    def answer():
        return prefill(args.new_tokens)

    def stock(fn):
        def run():
            with stock_linears():
                return fn()
        return run

    phases = {"prefill": prefill, "streamed": streamed, "answer": answer}
    rounds = timed_rounds({f"{name} {kind}": fn if kind == "onednn" else stock(fn)
                           for name, fn in phases.items() for kind in ("onednn", "F.linear")}, args.rounds)
    t = {name: statistics.median(times) for name, times in rounds.items()}
    print(f"median of {args.rounds} interleaved rounds, {args.frames} frames, {torch.get_num_threads()} threads:")
    print(f"{'phase':<12}{'oneDNN s':>10}{'F.linear s':>12}{'speed-up':>10}")
    for name in phases:
        fast, slow = t[f"{name} onednn"], t[f"{name} F.linear"]
        print(f"{name:<12}{fast:>10.3f}{slow:>12.3f}{slow / fast:>9.2f}x")
    decode = {kind: (t[f"answer {kind}"] - t[f"prefill {kind}"]) / (args.new_tokens - 1) * 1e3
              for kind in ("onednn", "F.linear")}
    print(f"decode ms/token: oneDNN {decode['onednn']:.2f}, F.linear {decode['F.linear']:.2f} "
          f"({decode['F.linear'] / decode['onednn']:.2f}x)")
    print("streamed prefill against one-shot: " + ", ".join(
        f"{kind} {t[f'prefill {kind}'] / t[f'streamed {kind}']:.2f}x" for kind in ("onednn", "F.linear")))
    same = answer() == stock(answer)()
    print(f"the same answer: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
