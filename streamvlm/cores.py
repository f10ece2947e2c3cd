"""One thread per process runs torch's CPU ops on several cores; every other thread runs them on one.

Torch runs the parallel parts of its CPU ops on an OpenMP team that belongs to the calling thread and lives as
long as that thread. libgomp lets a team spin between parallel ops (about 3 ms) only while it manages no more
threads than the machine has cores; past that it spins 100 times and sleeps, so every parallel op then pays
for waking its team. On the 2-core CPU one idle thread that once ran a parallel op made a parallel add 7-9x
slower (5 -> 37-46 us) and a batched step of 8 real-small sequences about 1.3x slower
(`python examples/openmp_teams.py`, docs/performance.md#one-openmp-team).

So a process keeps one team: the thread that runs the forwards (a session's own thread, or a `Batcher`'s step
thread) has every core, a thread that only feeds it (request threads, capture threads, caption workers) calls
`one_core()` before its first op, and a model loads on one core (`single_core()`), so the loading thread
keeps no team.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def one_core() -> None:
    """Run this thread's torch ops on one core from now on (it never makes an OpenMP team).

    torch.set_num_threads also sets the count threads that have not run an op yet start with, so this first
    settles this thread's own count (`get_num_threads` does), then lowers it."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def use_cores(n: int) -> None:
    """Run this thread's torch ops on `n` cores (the thread that computes)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


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
