"""Watch a live source and ask questions while it plays, from Python.

    python examples/live_camera.py [SOURCE] [--model DIR] [--fps 1] [--every 5] [--seconds 20]

SOURCE is anything `streamvlm live --source` takes: rtsp://..., udp://..., /dev/video0, a file played as
live, lavfi:testsrc=size=320x240:rate=25, or sample (the default). Without --model it uses the built-in
model (random weights: the answers are noise, the mechanics are real).
"""

import argparse
import time

from streamvlm import StreamVLM
from streamvlm.world.builtin import default_model_dir
from streamvlm.live import LiveSession
from streamvlm.video.live import Reconnect, open_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", default="sample")
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--fps", type=float, default=1.0, help="frames per second fed to the model")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between questions")
    parser.add_argument("--seconds", type=float, default=12.0, help="how long to watch")
    args = parser.parse_args()

    vlm = StreamVLM.from_pretrained(args.model or default_model_dir())
    source = open_source(args.source, fps=args.fps, reconnect=Reconnect(read_timeout=5, retries=None))

    def on_event(event):
        if event["type"] in ("reconnect", "dropped", "error"):
            print(f"  [{event['type']}] {event.get('message', event)}")

    with LiveSession(vlm, source, memory_budget="256MB", on_event=on_event, max_new_tokens=24) as live:
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline and not live.done:
            live.wait(args.every)
            answer = live.ask("What is happening right now?")
            print(f"[{answer.t or 0:6.1f} s, {answer.frames} frames] {answer.text!r} "
                  f"(first token after {answer.first_token_s or 0:.3f} s)")
        stats = live.stats()
    print(f"{stats['ingested']} frames in, {stats['dropped']} dropped, {stats['reconnects']} reconnects, "
          f"cache {stats['session']['kv_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
