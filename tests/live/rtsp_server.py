"""A GStreamer RTSP server for the live tests, run with Debian's python3 (which has the gi bindings).

    /usr/bin/python3 rtsp_server.py PORT [--fps N] [--size WxH]

Serves rtsp://127.0.0.1:PORT/test: a moving test pattern encoded with x264, live (is-live=true), one
shared media for all clients. Prints "ready" on stdout once it listens. Runs until killed.
"""

import argparse
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--size", default="64x48")
    args = parser.parse_args()
    width, height = args.size.split("x")
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},"
        f"framerate={args.fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.fps} "
        "! rtph264pay name=pay0 pt=96 config-interval=1 )")
    factory.set_shared(True)
    server.get_mount_points().add_factory("/test", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{args.port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
