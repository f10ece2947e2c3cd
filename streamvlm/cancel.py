"""Stopping a thread's session work between two forwards, from another thread.

The server drives each request's session on a worker thread. When the client goes away, the event loop sets
the request's event, and the session raises `Cancelled` before its next forward (`Session._run` checks), so
no more than the forward running then (one step, batched) is spent on a reply nobody reads:

    with cancel_on(event):      # on the thread that drives the session
        session.ask(...)        # raises Cancelled before its next forward once `event` is set

A session stopped this way may be part-way through a chunk (its text laid out, not all of it in the cache):
throw it away. Threads outside such a block (a live stream's ingest, a script's session) are never stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_local = threading.local()


class Cancelled(Exception):
    """The work was cancelled (the client went away). Not a `StreamVLMError`: nobody made a mistake."""


@contextmanager
def cancel_on(event: threading.Event) -> Iterator[None]:
    """Within the block, this thread's sessions raise `Cancelled` before any forward once `event` is set."""
    before = getattr(_local, "event", None)
    _local.event = event
    try:
        yield
    finally:
        _local.event = before


def cancelled() -> bool:
    """Whether this thread's work was cancelled (inside a `cancel_on` block whose event is set)."""
    event = getattr(_local, "event", None)
    return event is not None and event.is_set()


def check_cancelled() -> None:
    """Raise `Cancelled` if this thread's work was cancelled."""
    if cancelled():
        raise Cancelled("cancelled: the client went away")
