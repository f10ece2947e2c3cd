"""Ask many questions about one video: ingest it once, then fork the session for each question.

    python examples/many_questions.py [VIDEO] [--model DIR] [--num-frames 16] [--batch 4]

`Session.fork()` copies a session (its cache, timeline and turns) and answers exactly as the original would,
so the frames are encoded and prefilled once however many questions follow. With --batch N above 1 the
forks answer from N threads at once and their steps share forwards (`streamvlm.batching`). The script
times both ways against a fresh session per question, and checks that the answers are the same.

Without arguments it uses the sample video and the built-in model, asked the questions of its world (it
reads only that world's words); a checkpoint given with --model is asked a few general questions.
"""

from __future__ import annotations

import argparse
import threading
import time

from streamvlm import StreamVLM
from streamvlm.batching import Batcher
from streamvlm.cores import one_core
from streamvlm.video.files import read_video
from streamvlm.world.builtin import default_model_dir
from streamvlm.world.sample import sample_video

WORLD_QUESTIONS = ("what is there now ?", "how many objects are there now ?", "what colour is the square ?",
                   "what shape is the red object ?", "which way is the big red square moving ?",
                   "what colour was the first object that left ?", "what shape was the first object that left ?",
                   "what size is the red square ?")
GENERAL_QUESTIONS = ("What happens in the video?", "What colours do you see?", "How many objects are there?",
                     "What moves?")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", nargs="?", help="video file (default: the sample)")
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--num-frames", type=int, default=16, help="frames spread over the video (default 16)")
    parser.add_argument("--batch", type=int, default=4, help="questions answered at once (default 4)")
    args = parser.parse_args(argv)
    if args.num_frames < 1 or args.batch < 1:
        parser.error("--num-frames and --batch must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    vlm = StreamVLM.from_pretrained(args.model or default_model_dir())
    questions = GENERAL_QUESTIONS if args.model else WORLD_QUESTIONS
    clip = read_video(args.video or sample_video(), num_frames=args.num_frames)
    times = clip.timestamps.tolist()

    def fresh(question: str) -> str:
        session = vlm.session(max_new_tokens=12)
        session.append_frames(clip.frames, times)
        return session.ask(question)

    fresh(questions[0])  # warm-up: first-call paths are not timed
    start = time.perf_counter()
    want = [fresh(q) for q in questions]
    fresh_s = time.perf_counter() - start

    start = time.perf_counter()
    kept = vlm.session(max_new_tokens=12)
    kept.append_frames(clip.frames, times)  # the only time the frames are encoded and fed
    got = [kept.fork().ask(q) for q in questions]
    forked_s = time.perf_counter() - start

    start = time.perf_counter()
    batcher = Batcher(max_batch=args.batch)
    batched = vlm.batched(batcher)
    together: list = [None] * len(questions)

    def worker(offset: int) -> None:  # questions offset, offset + batch, ... on one thread
        one_core()  # the batcher's step thread computes; this thread only feeds it (streamvlm.cores)
        for i in range(offset, len(questions), args.batch):
            together[i] = kept.fork(batched.decoder).ask(questions[i])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(min(args.batch, len(questions)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    batched_s = time.perf_counter() - start

    for question, answer in zip(questions, want):
        print(f"{question} -> {answer}")
    same = got == want and together == want
    print(f"\n{len(questions)} questions about {len(clip)} frames: a fresh session each {fresh_s:.2f} s; forks of "
          f"one session {forked_s:.2f} s ({fresh_s / forked_s:.2f}x); forks in batches of {args.batch} "
          f"{batched_s:.2f} s ({fresh_s / batched_s:.2f}x); the same answers: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
