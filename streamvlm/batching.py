"""Continuous batching: the decoder work of many sessions, each driven by its own thread, in shared forwards.

A session does not know it is batched. Its decoder is a `BatchedDecoder`, whose `forward` hands the chunk
to the `Batcher` and waits for the step that runs it (`decoder.forward_batch`) with whatever the other
sessions have handed in. So whatever a session does (ingest frames, a question's prefill, one answer token,
a memory budget's eviction, a question-time selection) shares forwards with whatever the others are doing,
and sessions join and leave at any token boundary:

    thread of request A:  ...ingest chunk -> [step: A ingest, B question] | token 1 -> wait | token 2 -> [step: A 2, B 2]
    thread of request B:        question -> wait                        | token 1 -> [step: A 1, B 1] | token 2 -> wait

The steps run on a thread of the batcher's own (the step thread), which alone has the batcher's intra-op
threads; the threads that hand work in run their own torch ops (video decoding, the vision tower, sampling)
on one core each (`streamvlm.cores`), side by side with the steps. On a CPU this is what keeps a batched
server fast: every thread that runs a parallel op keeps an OpenMP team, and once a process has more team
threads than cores, each parallel op pays to wake its team (a step of 8 measured about 1.3x slower). A lone
session pays a hand-off per forward (two thread wake-ups), against an unbatched session on its own thread.
(The vision tower on the step thread instead, between steps, was tried: four live streams then ran 1.14x
the frames/s of one at a time against 1.47x with it beside the steps, since it no longer overlapped them.)

A step takes waiting chunks in arrival order, up to `max_batch` of them and `max_step_tokens` tokens: the
first always, then each that fits beside those taken (first fit: one that does not keeps its place in line for
the next step, and the smaller ones behind it go on). A longer chunk (a long prompt, many frames of many
tokens) is handed in as pieces of at most `piece_tokens` (`max_step_tokens - (max_batch - 1)`), one step each
(`Chunk.split`, which never cuts a frame). So a piece and an answer token of every other sequence fit one
step: the answers being generated go on in every step of a long prefill, however many prefills wait, and an
answer token waits behind the step running, never behind a queue of prefills. Before a step the batcher waits,
up to `gather_s`, for the threads the last step gave logits to (they are generating: they sample a token and
hand it in at once) and for those with more pieces of a chunk to hand in, so a batch does not fall apart into
singles. Threads whose chunk wanted no logits (frames ingested, a turn closed) are not waited for: they go on
to other work (decoding the next frames, waiting for a camera).

A step that fails runs again one sequence at a time, each from where it was before the step (its cache
rewound, `KVCache.rewind`), so one sequence's error (its router, its own cache's growth) fails it alone and the
others go on as if they had run alone.

Cancelling a sequence is its thread stopping: it closes its turn (one chunk) and hands in nothing more. A
session's last question (`ask_stream(..., last=True)`) closes its turn without a chunk: its thread says so
(`finished`), and the next step does not wait for it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from streamvlm.cores import one_core, use_cores
from streamvlm.decoder import Decoder, Work, forward_batch


@dataclass
class _Ticket:
    work: Work
    thread: int
    more: bool = False
    """Its thread hands in the next piece of the same chunk as soon as this one has run."""
    wake: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


class Batcher:
    """Runs the forwards of every `BatchedDecoder` made from it, several per step, on a thread of its own.

    max_batch: sequences in one step. max_step_tokens: tokens in one step (a longer chunk runs in pieces of
    `piece_tokens`, a step each; only a frame longer than that runs whole, alone). gather_s: how long a step
    waits for the threads of the last step to hand in their next chunk.
    threads: intra-op threads the step thread runs with (default: torch's count where the batcher is made).
    The step thread starts with the first chunk handed in and ends at `close`.
    """

    def __init__(self, max_batch: int = 8, max_step_tokens: int = 2048, gather_s: float = 0.02,
                 threads: int | None = None):
        if max_batch < 1 or max_step_tokens < 1 or (threads is not None and threads < 1):
            raise ValueError("max_batch, max_step_tokens and threads must be at least 1")
        self.max_batch = max_batch
        self.max_step_tokens = max_step_tokens
        self.piece_tokens = max(1, max_step_tokens // 2, max_step_tokens - (max_batch - 1))
        """A longer chunk is handed in as pieces of at most this many tokens: room is left beside a piece for an
        answer token of each other sequence of the step."""
        self.gather_s = gather_s
        self.threads = threads or torch.get_num_threads()
        self._queue: deque[_Ticket] = deque()
        self._expected: set[int] = set()  # threads generating in the last step and not yet back
        self._lock = threading.Condition()  # its waiter is the step thread, waiting for work or gathering a step
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0
        """Steps run so far."""
        self.batched = 0
        """Chunks run so far (batched / steps: the mean batch)."""

    def decoder(self, decoder: Decoder) -> BatchedDecoder:
        """`decoder` (a router over this batcher's model) with its forwards run by this batcher."""
        return BatchedDecoder(decoder, self)

    def run(self, work: Work, more: bool = False) -> torch.Tensor | None:
        """Hand in one chunk and wait for its step: what `Decoder.forward` returns. more: the calling thread
        hands in another piece of the same chunk right after (the next step waits for it as for a generating
        thread). The calling thread runs its own torch ops on one core from then on (`streamvlm.cores.one_core`)."""
        ticket = _Ticket(work, threading.get_ident(), more)
        one_core()  # this thread only feeds the step thread: no OpenMP team of its own
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="streamvlm-step", daemon=True)
                self._thread.start()
            self._queue.append(ticket)
            self._expected.discard(ticket.thread)
            self._lock.notify()
        ticket.wake.wait()  # set when its step has run, or when close() fails it
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def finished(self) -> None:
        """The calling thread hands in nothing more for now, though its last step gave it logits: the next step
        does not wait for it."""
        with self._lock:
            if threading.get_ident() in self._expected:
                self._expected.discard(threading.get_ident())
                self._lock.notify()

    def _loop(self) -> None:
        use_cores(self.threads)  # the one thread with every core
        while (taken := self._take()) is not None:
            self._step(taken)

    def _take(self) -> list[_Ticket] | None:
        """The next step's tickets, once the threads of the last step are back (or gather_s has passed); None
        once closed."""
        with self._lock:
            while not self._queue and not self._closed:
                self._lock.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.gather_s
            while self._expected and len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            if self._closed:  # closed while gathering: close() failed every chunk
                return None
            taken = [self._queue.popleft()]
            tokens = len(taken[0].work.chunk)
            # First fit in arrival order: a chunk that does not fit beside those taken keeps its place in line,
            # and the smaller ones behind it (other sequences' answer tokens) still run in this step.
            waiting: deque[_Ticket] = deque()
            while self._queue and len(taken) < self.max_batch:
                ticket = self._queue.popleft()
                size = len(ticket.work.chunk)
                if tokens + size > self.max_step_tokens:
                    waiting.append(ticket)
                else:
                    taken.append(ticket)
                    tokens += size
            waiting.extend(self._queue)
            self._queue = waiting
            self._expected = {ticket.thread for ticket in taken if ticket.work.logits == "last" or ticket.more}
            return taken

    def _step(self, taken: list[_Ticket]) -> None:
        """Run one step and wake its threads. A step that fails runs again one sequence at a time, from where
        each was before it, so that one sequence's error (its router, its cache's growth) fails it alone. (FLOPs
        are charged once every layer has run: a failed step charged none.)"""
        before = [ticket.work.cache.entries_per_layer for ticket in taken] if len(taken) > 1 else None
        try:
            with torch.inference_mode():
                results = forward_batch([ticket.work for ticket in taken])
            for ticket, result in zip(taken, results):
                ticket.result = result
        except Exception as e:  # noqa: BLE001 - raised by the waiting thread (or each, run alone)
            if before is None:
                taken[0].error = e
            else:
                for ticket, lengths in zip(taken, before):
                    ticket.work.cache.rewind(lengths)
                    try:
                        with torch.inference_mode():
                            ticket.result = forward_batch([ticket.work])[0]
                    except Exception as alone:  # noqa: BLE001 - raised by its waiting thread
                        ticket.error = alone
                        ticket.work.cache.rewind(lengths)
        except BaseException as e:  # noqa: BLE001 - each waiting thread raises it
            for ticket in taken:
                ticket.error = e
        with self._lock:
            self.steps += 1
            self.batched += len(taken)
        for ticket in taken:
            ticket.wake.set()

    def close(self) -> None:
        """Refuse further work, fail what waits and end the step thread (a step running now ends first)."""
        with self._lock:
            self._closed = True
            for ticket in self._queue:
                ticket.error = RuntimeError("the batcher was closed")
                ticket.wake.set()
            self._queue.clear()
            self._lock.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


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
        pieces = chunk.split(self.batcher.piece_tokens)
        if len(pieces) == 1:
            return self.batcher.run(Work(self.inner, chunk, cache, flops, logits))
        # A long prefill, a step per piece: logits of the last piece's last token, or of every piece's tokens.
        outs = [self.batcher.run(Work(self.inner, piece, cache, flops, logits if logits == "all" else "none"),
                                 more=True) for piece in pieces[:-1]]
        out = self.batcher.run(Work(self.inner, pieces[-1], cache, flops, logits))
        return torch.cat([*outs, out]) if logits == "all" else out

    def finished(self) -> None:
        self.batcher.finished()
