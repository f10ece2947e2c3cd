"""What a second thread's OpenMP team costs torch on a CPU, measured (docs/performance.md, batching).

Torch's CPU ops run their parallel parts on an OpenMP team that belongs to the calling thread. This times
one built-in model request (8 frames ingested, a 16-token answer) on the main thread:

    alone                     no other thread has ever run a torch op
    beside an idle team       another thread ran one parallel op and now sleeps: its team lives on
    beside a one-core thread  another thread ran the same op after streamvlm.cores.one_core(): no team
    after it exits            that thread has ended
    on a worker thread        the same request on a second thread (the main thread's team lives on)
    one intra-op thread       torch.set_num_threads(1) on the main thread (no team)

On the 2-core machine the request took 1.24x and 1.43x as long beside an idle team as alone (two runs;
1.64x in an earlier one), and no longer beside a one-core thread (0.85x, 0.74x). The cause is libgomp's: once it manages more threads than there are cores, a team
spins only briefly between parallel ops and then sleeps, so each parallel op pays for waking it. That is
why streamvlm keeps one team per process (`streamvlm.cores`): a Batcher's step thread computes, and the
threads that feed it run on one core.

    python examples/openmp_teams.py [--requests 10]
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from streamvlm import StreamVLM
from streamvlm.cores import one_core
from streamvlm.world.builtin import default_model_dir


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10, help="requests timed per row (default 10)")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    vlm = StreamVLM.from_pretrained(default_model_dir())
    frames = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def request() -> None:
        session = vlm.session()
        session.append_frames(frames)
        session.ask("What is happening?", max_new_tokens=16, ignore_stop=True)

    def ms_per_request() -> float:
        request()
        start = time.perf_counter()
        for _ in range(args.requests):
            request()
        return (time.perf_counter() - start) / args.requests * 1e3

    rows = {"alone": ms_per_request()}
    stop = threading.Event()

    def idle(setup) -> None:
        if setup is not None:
            setup()
        torch.randn(512, 512) @ torch.randn(512, 512)  # one parallel op: a team, unless on one core
        stop.wait()

    for name, setup in (("beside an idle team", None), ("beside a one-core thread", one_core)):
        stop.clear()
        other = threading.Thread(target=idle, args=(setup,))
        other.start()
        time.sleep(0.5)
        rows[name] = ms_per_request()
        stop.set()
        other.join()
    time.sleep(0.5)
    rows["after it exits"] = ms_per_request()
    result = []
    worker = threading.Thread(target=lambda: result.append(ms_per_request()))
    worker.start()
    worker.join()
    rows["on a worker thread"] = result[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows["one intra-op thread"] = ms_per_request()
    torch.set_num_threads(threads)
    print(f"built-in model, 8 frames and 16 answer tokens a request, {threads} intra-op threads, "
          f"{args.requests} requests a row")
    for name, ms in rows.items():
        print(f"{name:<26}{ms:>8.1f} ms  {ms / rows['alone']:.2f}x")


if __name__ == "__main__":
    main()
