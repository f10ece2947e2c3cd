"""The loaded model and the threads that run it for the server.

Model work never runs on the event loop. A request's work (decode the video, ingest it, answer) runs on
one of max(workers, max_batch) threads; while they are busy, requests wait their turn in order.

With max_batch > 1 the language model's forwards of every request and live stream run in one `Batcher`
(continuous batching, `streamvlm.batching`): each request's thread drives its own session, and the batcher's
step thread runs what they have handed in as one step, up to max_batch sequences. A request joins the
running batch at its next forward and leaves it when it is done; the weights are read once a step for all of
them, and a prefill longer than max_step_tokens runs in pieces, a step each, between the others' tokens. The
request threads run their own torch ops (video decoding, the vision tower, sampling) on one core each: the
step thread alone has every core (`streamvlm.cores`). With max_batch 1 each request runs alone, one at a time
(workers 1), as before batching.

Requests about media an earlier request ingested (same media, system prompt, video options, routing and
cache salt) start from a copy of that request's session (`prefix`, `streamvlm.serve.prefix`), within
--prefix-cache-mb.

Each worker thread keeps its own router per routing spec (the model's weights are shared): some
training-free routers keep per-call state, so one router instance must never serve two threads at once.
Live streams get their own router too.

`stream_in_thread` runs a blocking generator on a worker and hands its items to the event loop as they
come; when the consumer goes away (a client disconnects), the generator is closed on its own thread at the
next item, which for an answer ends the turn cleanly ("cancelled"), and a session it drives raises
`streamvlm.cancel.Cancelled` before its next forward (a video's ingest or a prompt's prefill stops there,
not at the answer's first token).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from collections import deque
from concurrent.futures import Executor, Future
from typing import TypeVar

import torch

from streamvlm.batching import Batcher
from streamvlm.cancel import cancel_on, check_cancelled
from streamvlm.cores import one_core, use_cores
from streamvlm.runtime import StreamVLM
from streamvlm.serve.prefix import PrefixCache

T = TypeVar("T")
_END = object()


class Engine:
    def __init__(self, vlm: StreamVLM, model_id: str, workers: int = 1, max_batch: int = 1,
                 prefix_cache_bytes: int = 2**30, max_step_tokens: int = 2048):
        if workers < 1 or max_batch < 1 or max_step_tokens < 1:
            raise ValueError("workers, max_batch and max_step_tokens must be at least 1")
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        """Sessions kept after their media were ingested, for requests about the same media (None: off)."""
        self.vlm = vlm
        self.model_id = model_id
        self.workers = max(workers, max_batch)
        self.max_batch = max_batch
        self.batcher = Batcher(max_batch, max_step_tokens) if max_batch > 1 else None
        # Batched, the request threads only feed the step thread; unbatched, each worker computes.
        cores = torch.get_num_threads()
        self.pool = LastIdleFirst(self.workers, "streamvlm-worker",
                                  initializer=one_core if self.batcher is not None else lambda: use_cores(cores))
        self._local = threading.local()

    @property
    def default_routing(self) -> str:
        return self.vlm.router.spec()

    def fresh(self, routing: str | None = None) -> StreamVLM:
        """The model with a router of its own (`routing` None: a copy of the server's --routing router), its
        forwards batched with every other request's when batching is on."""
        vlm = self.vlm.fork() if routing is None else self.vlm.with_routing(routing)
        return vlm.batched(self.batcher) if self.batcher is not None else vlm

    def model(self, routing: str | None = None) -> StreamVLM:
        """This worker thread's model for a routing spec (made on first use, then kept)."""
        models = getattr(self._local, "models", None)
        if models is None:
            models = self._local.models = {}
        if routing not in models:
            models[routing] = self.fresh(routing)
        return models[routing]

    async def stream_in_thread(self, make: Callable[[], Iterator[T]],
                               cancel: threading.Event | None = None) -> AsyncIterator[T]:
        """Iterate `make()` on a worker thread, yielding its items on the event loop. `cancel` (set here when the
        consumer goes away; a caller may set it sooner) stops the work: at its next item, or before its
        session's next forward with `streamvlm.cancel.Cancelled`, which the iteration then raises."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event() if cancel is None else cancel

        def work() -> None:
            try:
                with cancel_on(cancel):  # once the consumer is gone, the session stops before its next forward
                    check_cancelled()  # gone while this waited for a worker: read no video for it
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

        done = loop.run_in_executor(self.pool, work)
        try:
            while True:
                item = await items.get()
                if item is _END:
                    # the reply goes once the worker is idle again: a client's next request then finds it
                    await done
                    break
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            cancel.set()  # the worker stops after its current step (and closes the turn)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.batcher is not None:
            self.batcher.close()


class LastIdleFirst(Executor):
    """A pool of up to `max_workers` threads whose next task goes to the thread that became idle last.

    ThreadPoolExecutor hands a task to the thread idle longest, so one client's requests, one after another,
    go round every thread it has started. Unbatched, each of those threads then keeps an OpenMP team of its
    own for torch's ops, and on a machine with few cores every extra team makes each op slower
    (`streamvlm.cores`). Here a light load stays on one thread. initializer: run first on each new thread.
    """

    def __init__(self, max_workers: int, name: str, initializer: Callable[[], None] | None = None):
        self.max_workers = max_workers
        self.name = name
        self.initializer = initializer
        self._lock = threading.Lock()
        self._idle: list[_Slot] = []  # a stack: the last to become idle is taken first
        self._backlog: deque = deque()
        self._threads: list[threading.Thread] = []
        self._shutdown = False

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        task = (future, fn, args, kwargs)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._idle:
                self._idle.pop().hand(task)
            elif len(self._threads) < self.max_workers:
                thread = threading.Thread(target=self._work, args=(task,), daemon=True,
                                          name=f"{self.name}-{len(self._threads)}")
                self._threads.append(thread)
                thread.start()
            else:
                self._backlog.append(task)
        return future

    def _work(self, task) -> None:
        if self.initializer is not None:
            self.initializer()
        while task is not None:
            future, fn, args, kwargs = task
            outcome = None  # (result, error) of a task that ran; None for one cancelled before it started
            if future.set_running_or_notify_cancel():
                try:
                    outcome = fn(*args, **kwargs), None
                except BaseException as e:  # noqa: BLE001 - the future carries it
                    outcome = None, e
            del fn, args, kwargs
            # This thread is idle (or has its next task) before anyone sees the future done: a caller that
            # submits again as soon as it is must find this thread, not start another.
            slot = self._next_slot()
            if outcome is not None:
                result, error = outcome
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)
            del future, outcome
            task = slot.take()

    def _next_slot(self) -> _Slot:
        """This thread's next task: a slot already handed the backlog's oldest (or None at shutdown), or an idle
        slot, on top of the idle stack, that the next submit hands its task to."""
        with self._lock:
            slot = _Slot()
            if self._backlog:
                slot.hand(self._backlog.popleft())
            elif self._shutdown:
                slot.hand(None)
            else:
                self._idle.append(slot)
        return slot

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                for future, *_ in self._backlog:
                    future.cancel()
                self._backlog.clear()
            for slot in self._idle:
                slot.hand(None)
            self._idle.clear()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()


class _Slot:
    """An idle worker's mailbox: the next task, or None to stop."""

    def __init__(self):
        self.ready = threading.Event()
        self.task = None

    def hand(self, task) -> None:
        self.task = task
        self.ready.set()

    def take(self):
        """Wait for the task handed in (None: stop)."""
        self.ready.wait()
        return self.task


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error
