"""Continuous batching: the decoder work of many sessions, each driven by its own thread, in shared forwards.

A session does not know it is batched. Its decoder is a `BatchedDecoder`, whose `forward` hands the chunk
to the `Batcher` and waits for the step that runs it (`decoder.forward_batch`) with whatever the other
sessions have handed in. So whatever a session does (ingest frames, a question's prefill, one answer token,
a memory budget's eviction, a question-time selection) shares forwards with whatever the others are doing,
and sessions join and leave at any token boundary:

    thread of request A:  ...ingest chunk -> [step: A ingest, B question] | token 1 -> wait | token 2 -> [step: A 2, B 2]
    thread of request B:        question -> wait                        | token 1 -> [step: A 1, B 1] | token 2 -> wait

There is no batcher thread: the step is run by one of the threads that handed work in (the *lead*; flat
combining). A thread that hands in a chunk while nobody leads becomes the lead; it gathers, runs steps
until one has its own chunk, then hands the lead to the oldest chunk still waiting (or lets it lapse). So a
lone session runs its forwards on its own thread, exactly as unbatched, with no hand-off between threads,
and under load one thread wakes per step instead of two per chunk.

A step takes waiting chunks in arrival order, up to `max_batch` of them and `max_step_tokens` tokens (the
first is always taken), so a long prefill never holds more than one step of everyone's decode, and nothing
waits behind more than one step of it. Before a step the lead waits, up to `gather_s`, for the threads the
last step gave logits to (they are generating: they sample a token and hand it in at once), so a batch does
not fall apart into singles. Threads whose chunk wanted no logits (frames ingested, a turn closed) are not
waited for: they go on to other work (encoding the next frames, waiting for a camera).

Cores (CPU): a step runs with all of the batcher's intra-op threads; after it, each of its threads goes on
with 1/batch of them (`threads // batch`) for its own work (sampling, video decoding, the vision tower), since
those threads now run at once; given every core each, they would take turns at each op instead.

Cancelling a sequence is its thread stopping: it closes its turn (one chunk) and hands in nothing more.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from streamvlm.decoder import Decoder, Work, forward_batch


@dataclass
class _Ticket:
    work: Work
    thread: int
    wake: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    batch: int = 1  # chunks in the step that ran it
    result: torch.Tensor | None = None
    error: BaseException | None = None


class Batcher:
    """Runs the forwards of every `BatchedDecoder` made from it, several per step.

    max_batch: sequences in one step. max_step_tokens: tokens in one step (a chunk larger than it runs
    alone). gather_s: how long a step waits for the threads of the last step to hand in their next chunk.
    threads: intra-op threads a step runs with (default: torch's count where the batcher is made).
    """

    def __init__(self, max_batch: int = 8, max_step_tokens: int = 2048, gather_s: float = 0.02,
                 threads: int | None = None):
        if max_batch < 1 or max_step_tokens < 1:
            raise ValueError("max_batch and max_step_tokens must be at least 1")
        self.max_batch = max_batch
        self.max_step_tokens = max_step_tokens
        self.gather_s = gather_s
        self.threads = threads or torch.get_num_threads()
        self._queue: deque[_Ticket] = deque()
        self._expected: set[int] = set()  # threads generating in the last step and not yet back
        self._lock = threading.Condition()  # its waiter is the lead, gathering a step
        self._leading = False  # a thread is running steps
        self._closed = False
        self.steps = 0
        """Steps run so far."""
        self.batched = 0
        """Chunks run so far (batched / steps: the mean batch)."""

    def decoder(self, decoder: Decoder) -> BatchedDecoder:
        """`decoder` (a router over this batcher's model) with its forwards run by this batcher."""
        return BatchedDecoder(decoder, self)

    def run(self, work: Work) -> torch.Tensor | None:
        """Hand in one chunk and wait for its step: what `Decoder.forward` returns."""
        ticket = _Ticket(work, threading.get_ident())
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(ticket)
            self._expected.discard(ticket.thread)
            lead = not self._leading
            self._leading = True
            self._lock.notify()
        if not lead:
            ticket.wake.wait()  # set when its step has run, or when it is handed the lead
        while not ticket.done:  # this thread leads: it runs steps until one has its own chunk
            self._step()
        # The threads of this step now go on with their own work at once (sampling, decoding and encoding
        # frames): each gets its share of the cores, so that they don't take turns at every op.
        _intra_op_threads(max(1, self.threads // ticket.batch))
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def _take(self) -> list[_Ticket]:
        """The next step's tickets, once the threads of the last step are back (or gather_s has passed)."""
        with self._lock:
            deadline = time.monotonic() + self.gather_s
            while self._expected and len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            if not self._queue:  # closed while gathering: close() failed every chunk
                return []
            taken = [self._queue.popleft()]
            tokens = len(taken[0].work.chunk)
            while self._queue and len(taken) < self.max_batch:
                size = len(self._queue[0].work.chunk)
                if tokens + size > self.max_step_tokens:
                    break
                taken.append(self._queue.popleft())
                tokens += size
            self._expected = {ticket.thread for ticket in taken if ticket.work.logits == "last"}
            return taken

    def _step(self) -> None:
        """One step, run by the leading thread; if its own chunk was in it, the lead passes to the oldest
        chunk waiting (or lapses)."""
        taken = self._take()
        if not taken:
            return
        me = threading.get_ident()
        _intra_op_threads(self.threads)  # the step itself has every core
        try:
            with torch.inference_mode():
                results = forward_batch([ticket.work for ticket in taken])
            for ticket, result in zip(taken, results):
                ticket.result = result
        except BaseException as e:  # noqa: BLE001 - each waiting thread raises it
            for ticket in taken:
                ticket.error = e
        with self._lock:
            self.steps += 1
            self.batched += len(taken)
            mine = False
            for ticket in taken:
                ticket.done = True
                ticket.batch = len(taken)
                if ticket.thread == me:
                    mine = True
                else:
                    ticket.wake.set()
            if mine:
                if self._queue:
                    self._queue[0].wake.set()  # its thread wakes with its chunk not done: it leads
                else:
                    self._leading = False

    def close(self) -> None:
        """Refuse further work and fail what waits; a step running now ends in its thread."""
        with self._lock:
            self._closed = True
            for ticket in self._queue:
                ticket.error = RuntimeError("the batcher was closed")
                ticket.done = True
                ticket.wake.set()
            self._queue.clear()
            self._lock.notify_all()


def _intra_op_threads(n: int) -> None:
    """Set the calling thread's intra-op threads (torch keeps the count per thread once a thread has run an op;
    the call also sets the default of threads that have not)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


class BatchedDecoder:
    """A decoder whose forwards run in a `Batcher`'s steps, batched with other sessions'. A session takes it
    where it takes a `Decoder`."""

    def __init__(self, decoder: Decoder, batcher: Batcher):
        self.inner = decoder
        self.batcher = batcher

    @property
    def router(self):
        return self.inner.router

    @property
    def parts(self):
        return self.inner.parts

    @property
    def compiled(self) -> bool:
        return self.inner.compiled

    def forward(self, chunk, cache, flops, logits: str = "last") -> torch.Tensor | None:
        return self.batcher.run(Work(self.inner, chunk, cache, flops, logits))
