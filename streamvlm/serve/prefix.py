"""Sessions kept after a request's media were ingested, so the next request about the same media starts from a
copy of that cache instead of decoding, encoding and prefilling the video again.

Evaluation harnesses ask many questions about one video, and chat clients send the whole conversation, video
included, with every turn. The video's ingest is the compute-bound part of such a request (on the 2-core
CPU, 0.7 s of a real-small-shaped request's 2.4 s), and batching does not make it cheaper; not doing it
twice does.

    request -> key (system prompt, media and their file identities, video options, routing, cache salt)
            -> hit:  fork the kept session (`Session.fork`: its cache copied, the request's sampling)
            -> miss: one request ingests while the others with the same key wait for it (single flight),
                     the session is kept, and every one of them forks it

A kept session is never run: it is only copied. Entries are dropped least recently used first to stay
within `max_bytes` (the kept caches' buffers); a session larger than that is not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from streamvlm.session import Session


@dataclass
class Kept:
    session: Session
    """The session as the media left it; only ever forked."""
    info: Any
    """What the builder returned with it (for the server: the video seconds and the frames taken)."""
    nbytes: int


class PrefixCache:
    """Kept sessions by key, within `max_bytes`, least recently used dropped first. Thread-safe."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._kept: OrderedDict[Hashable, Kept] = OrderedDict()
        self._building: dict[Hashable, threading.Event] = {}
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable, build: Callable[[], tuple[Session, Any]],
            fork: Callable[[Session], Session]) -> tuple[Session, Any, bool]:
        """(a session of its own for the caller, the info, whether it was a hit). On a miss `build()` makes the
        session (it runs on the calling thread, and nothing else with this key builds meanwhile: those wait
        and then fork what it made); the caller gets `fork(kept)` either way, never the kept session itself.
        A build that raises keeps nothing, and the next waiter builds."""
        while True:
            with self._lock:
                kept = self._kept.get(key)
                if kept is not None:
                    self._kept.move_to_end(key)
                    self.hits += 1
                    break
                building = self._building.get(key)
                if building is None:
                    self._building[key] = threading.Event()
                    self.misses += 1
            if building is None:
                return self._build(key, build, fork)
            building.wait()
        return fork(kept.session), kept.info, True

    def _build(self, key, build, fork) -> tuple[Session, Any, bool]:
        try:
            session, info = build()
            mine = fork(session)
            self._keep(key, Kept(session, info, session.nbytes))
        finally:
            with self._lock:
                self._building.pop(key).set()
        return mine, info, False

    def _keep(self, key: Hashable, kept: Kept) -> None:
        if kept.nbytes > self.max_bytes:
            return
        with self._lock:
            self._kept[key] = kept
            while sum(k.nbytes for k in self._kept.values()) > self.max_bytes:
                self._kept.popitem(last=False)
                self.evictions += 1

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._kept), "bytes": sum(k.nbytes for k in self._kept.values()),
                    "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions}

