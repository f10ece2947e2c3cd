"""The loaded model and the threads that run it for the server.

Model work never runs on the event loop. A request's work (decode the video, ingest it, answer) runs on
one of `workers` threads; while they are busy, requests wait their turn in order. One worker is the
default: torch already spreads a request's operations over the cores, and two workers on two cores
oversubscribe them (measured: 11.0 vs 8.2 requests/s on the built-in model at 1 to 16 clients).

Each worker thread keeps its own router per routing spec (the model's weights are shared): some
training-free routers keep per-call state, so one router instance must never serve two threads at once.
Live streams get their own router too.

`stream_in_thread` runs a blocking generator on a worker and hands its items to the event loop as they
come; when the consumer goes away (a client disconnects), the generator is closed on its own thread at the
next item, which for an answer ends the turn cleanly ("cancelled").
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from streamvlm.runtime import StreamVLM

T = TypeVar("T")
_END = object()


class Engine:
    def __init__(self, vlm: StreamVLM, model_id: str, workers: int = 1):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.vlm = vlm
        self.model_id = model_id
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="streamvlm-worker")
        self._local = threading.local()

    @property
    def default_routing(self) -> str:
        return self.vlm.router.spec()

    def fresh(self, routing: str | None = None) -> StreamVLM:
        """The model with a router of its own (`routing` None: a copy of the server's --routing router)."""
        if routing is None:
            return StreamVLM(self.vlm.adapter, copy.deepcopy(self.vlm.router), self.vlm.sampling,
                             self.vlm.max_chunk_frames)
        return self.vlm.with_routing(routing)

    def model(self, routing: str | None = None) -> StreamVLM:
        """This worker thread's model for a routing spec (made on first use, then kept)."""
        models = getattr(self._local, "models", None)
        if models is None:
            models = self._local.models = {}
        if routing not in models:
            models[routing] = self.fresh(routing)
        return models[routing]

    async def stream_in_thread(self, make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """Iterate `make()` on a worker thread, yielding its items on the event loop."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                gen = make()
                try:
                    for item in gen:
                        loop.call_soon_threadsafe(items.put_nowait, item)
                        if cancel.is_set():
                            break
                finally:
                    gen.close()
                loop.call_soon_threadsafe(items.put_nowait, _END)
            except BaseException as e:  # noqa: BLE001 - raised again on the event loop
                loop.call_soon_threadsafe(items.put_nowait, _Failed(e))

        loop.run_in_executor(self.pool, work)
        try:
            while True:
                item = await items.get()
                if item is _END:
                    break
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            cancel.set()  # the worker stops after its current step (and closes the turn)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error
