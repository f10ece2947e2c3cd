"""Feed a video into a session frame by frame, as a live source would, and ask questions along the way.

    python examples/stream_and_ask.py [VIDEO] [--model DIR] [--routing dense] [--fps 2]

    python examples/stream_and_ask.py --routing mod:0.2     the built-in model's trained router, keep 0.2

Without arguments it uses the sample video and the built-in model: a small model trained on a world of
coloured shapes that move, appear and leave, of which the sample is one scene. It reads only that world's
words, so it is asked "what is there now?" half-way and at the end, and its answer changes as the shapes
come and go; a checkpoint given with --model is asked "What happens in the video?".
"""

import argparse

from streamvlm import StreamVLM
from streamvlm.prompts import default_prompts
from streamvlm.video.files import read_video
from streamvlm.world.builtin import default_model_dir
from streamvlm.world.sample import sample_video


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", nargs="?", help="video file (default: the sample)")
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--routing", default="dense",
                        help="dense, mod:KEEP[:SCHEDULE] or a router folder (default dense)")
    parser.add_argument("--fps", type=float, default=2.0, help="frames per second to feed (default 2)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    question = default_prompts(args.model).question
    vlm = StreamVLM.from_pretrained(args.model or default_model_dir(), routing=args.routing)
    clip = read_video(args.video or sample_video(), fps=args.fps)
    session = vlm.session(max_new_tokens=24)
    half = len(clip) // 2
    for i in range(len(clip)):
        session.append_frames(clip.frames[i:i + 1], [float(clip.timestamps[i])])
        if i == half:  # a question mid-stream sees only what has arrived so far
            print(f"[t={clip.timestamps[i]:.1f}s] {question} -> {session.ask(question)}")
    print(f"[t={clip.timestamps[-1]:.1f}s] {question} -> {session.ask(question)}")
    stats = session.stats()
    print(f"{stats['frames']} frames, KV cache {stats['kv_bytes'] / 1024:.0f} KiB "
          f"({stats['kv_bytes'] / stats['kv_bytes_dense']:.0%} of dense), "
          f"LLM FLOPs {stats['flops']['llm'] / stats['flops']['llm_dense']:.0%} of dense")


if __name__ == "__main__":
    main()
