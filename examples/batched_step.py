"""What one batched step costs against its sequences' steps one at a time (`streamvlm.decoder.forward_batch`).

    python examples/batched_step.py [--model DIR] [--batch 8] [--frames 4] [--steps 100] [--rounds 3]

B sessions, each with its own frames and one answered question (so their caches differ in length), take
steps of two kinds: `decode`, one answer token each; `question`, a question's prefill each on a fresh fork
of its session (as every server request about a kept clip does). Each round times `--steps` steps of each
kind both ways: the B chunks in one `forward_batch`, and B chunks as B forwards of one, alternated step by
step, so a drift of the machine lands on both; the figures are medians of each round's steps. Without
--model it uses the built-in model, whose steps are mostly per-op overhead (what batching shares), not
arithmetic. Nothing is generated: the tokens fed are fixed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from streamvlm import StreamVLM
from streamvlm.decoder import Work, forward_batch
from streamvlm.sequence import TextPiece
from streamvlm.world.builtin import default_model_dir

QUESTION = "What is happening in the video?"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--batch", type=int, default=8, help="sequences in a step (default 8)")
    parser.add_argument("--frames", type=int, default=4, help="frames the first session holds; the i-th holds "
                        "i more (default 4)")
    parser.add_argument("--steps", type=int, default=100, help="steps of each kind a round (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args(argv)
    if min(args.batch, args.frames, args.steps, args.rounds) < 1:
        parser.error("--batch, --frames, --steps and --rounds must be at least 1")
    return args


def _sessions(vlm: StreamVLM, batch: int, frames: int) -> list:
    g = torch.Generator().manual_seed(0)
    sessions = []
    for i in range(batch):
        count = frames + i
        session = vlm.session()
        session.append_frames(torch.randint(0, 256, (count, 64, 64, 3), dtype=torch.uint8, generator=g),
                              [0.5 * j for j in range(count)])
        session.ask("What moved?", max_new_tokens=2, ignore_stop=True)
        sessions.append(session)
    return sessions


def _chunks(sessions: list, kind: str) -> list[Work]:
    """One step's work: a token for each session, or a question on a fork of each."""
    if kind == "question":
        forks = [s.fork() for s in sessions]
        return [Work(f._decoder, f._seq.place(list(f._open_question(QUESTION, extra_tokens=1).pieces)), f.cache,
                     f.flops) for f in forks]
    return [Work(s._decoder, s._seq.place([TextPiece((5,))]), s.cache, s.flops) for s in sessions]


def _timed(sessions: list, kind: str, steps: int) -> tuple[float, float]:
    """Median seconds of a step (every session's chunk once) as B forwards of one and as one of B, over `steps`
    steps of each, alternated step by step (a decode step grows every cache by one: both ways see the same
    lengths)."""
    alone, together = [], []
    with torch.inference_mode():
        for _ in range(steps):
            work = _chunks(sessions, kind)
            start = time.perf_counter()
            for item in work:
                forward_batch([item])
            alone.append(time.perf_counter() - start)
            work = _chunks(sessions, kind)
            start = time.perf_counter()
            forward_batch(work)
            together.append(time.perf_counter() - start)
    return statistics.median(alone), statistics.median(together)


def main(argv=None) -> None:
    args = parse_args(argv)
    vlm = StreamVLM.from_pretrained(args.model or default_model_dir())
    print(f"{args.batch} sequences a step, median ms a step of {args.steps}, {torch.get_num_threads()} threads")
    print(f"{'round':<6} {'kind':<9} {'alone':>8} {'together':>9} {'speed-up':>9}")
    ratios: dict[str, list[float]] = {"decode": [], "question": []}
    for round_ in range(1, args.rounds + 1):
        for kind in ratios:
            # decode steps grow the caches: fresh sessions for each kind and round
            sessions = _sessions(vlm, args.batch, args.frames)
            _timed(sessions, kind, 3)  # warm-up
            alone, together = _timed(sessions, kind, args.steps)
            ratios[kind].append(alone / together)
            print(f"{round_:<6} {kind:<9} {alone * 1e3:8.2f} {together * 1e3:9.2f} {alone / together:8.2f}x")
    for kind, values in ratios.items():
        print(f"{kind}: one step of {args.batch} takes {statistics.median(values):.2f}x less time than "
              f"{args.batch} steps of one (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
