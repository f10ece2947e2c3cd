"""Watch a live source and ask questions while it plays, from Python.

    python examples/live_camera.py [SOURCE] [--model DIR] [--fps 1] [--every 3] [--seconds 12]

SOURCE is anything `streamvlm live --source` takes: rtsp://..., udp://..., /dev/video0, a file played as
live, lavfi:testsrc=size=320x240:rate=25, or sample (the default: the 8-second sample video, played in real
time). Every --every seconds it asks the question, until --seconds have passed or the source ends.

Without --model it uses the built-in model: a small model trained on a world of coloured shapes (the
sample is one of its scenes), which reads only that world's words, so it is asked "what is there now?".
About a camera it answers in those words too, which then mean little. A checkpoint given with --model is
asked "What happens in the video?".
"""

import argparse
import time

from streamvlm import StreamVLM
from streamvlm.live import LiveSession
from streamvlm.prompts import default_prompts
from streamvlm.video.live import Reconnect, open_source
from streamvlm.world.builtin import default_model_dir
from streamvlm.world.sample import source_spec


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", default="sample", help="what to watch (default: sample)")
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--fps", type=float, default=1.0, help="frames per second fed to the model (default 1)")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between questions (default 3)")
    parser.add_argument("--seconds", type=float, default=12.0, help="how long to watch (default 12)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    question = default_prompts(args.model).question
    vlm = StreamVLM.from_pretrained(args.model or default_model_dir())
    # source_spec turns `sample` into the sample video's file (written on first use)
    source = open_source(source_spec(args.source), fps=args.fps, reconnect=Reconnect(read_timeout=5, retries=None))

    def on_event(event):
        if event["type"] in ("reconnect", "dropped", "error"):
            print(f"  [{event['type']}] {event.get('message', event)}")

    with LiveSession(vlm, source, memory_budget="256MB", on_event=on_event, max_new_tokens=24) as live:
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline and not live.done:
            live.wait(args.every)
            answer = live.ask(question)
            print(f"[{answer.t or 0:6.1f} s, {answer.frames} frames] {question} -> {answer.text!r} "
                  f"(first token after {answer.first_token_s or 0:.3f} s)")
        stats = live.stats()
    print(f"{stats['ingested']} frames in, {stats['dropped']} dropped, {stats['reconnects']} reconnects, "
          f"cache {stats['session']['kv_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
