"""One thread per process runs torch's CPU ops on several cores; every other thread runs them on one.

Torch runs the parallel parts of its CPU ops on an OpenMP team that belongs to the calling thread and lives as
long as that thread. libgomp lets a team spin between parallel ops (about 3 ms) only while it manages no more
threads than the machine has cores; past that it spins 100 times and sleeps, so every parallel op then pays
for waking its team. On the 2-core CPU one idle thread that once ran a parallel op made a parallel add 7-9x
slower (5 -> 37-46 us) and a request on the built-in model 1.24x-1.43x slower (`python examples/openmp_teams.py`,
docs/performance.md#one-openmp-team).

So a process keeps one team: the thread that runs the forwards (a session's own thread, or a `Batcher`'s step
thread) has every core, a thread that only feeds it (request threads, capture threads, caption workers) calls
`one_core()` before its first op, and a model loads on one core (`single_core()`), so the loading thread
keeps no team.

torch.set_num_threads sets two numbers: the calling thread's count and the count that threads which have not
run an op yet will start with. Here only the first changes: the second is put back, so a thread made later
(an unbatched worker that computes) still starts with every core.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_lock = threading.Lock()


def one_core() -> None:
    """Run this thread's torch ops on one core from now on (it never makes an OpenMP team)."""
    use_cores(1)


def use_cores(n: int) -> None:
    """Run this thread's torch ops on `n` cores from now on; other threads' counts are unchanged."""
    if n < 1:
        raise ValueError(f"a thread needs at least one core, got {n}")
    if torch.get_num_threads() == n:  # (this also settles the thread's own count, if it has run no op yet)
        return
    with _lock:
        default = _on_new_thread(torch.get_num_threads)
        torch.set_num_threads(n)
        if default != n:
            _on_new_thread(torch.set_num_threads, default)


@contextmanager
def single_core() -> Iterator[None]:
    """This thread's ops on one core inside the block, its count restored after: work done once on a thread
    that will not compute (loading a model) leaves it without a team."""
    before = torch.get_num_threads()
    one_core()
    try:
        yield
    finally:
        use_cores(before)


def _on_new_thread(fn, *args):
    """fn(*args) on a thread that has run no torch op (it reads or sets the count new threads start with, and
    runs no parallel op, so it makes no team)."""
    box = []
    thread = threading.Thread(target=lambda: box.append(fn(*args)), name="streamvlm-cores")
    thread.start()
    thread.join()
    return box[0]
