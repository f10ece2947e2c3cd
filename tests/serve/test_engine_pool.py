"""The server's worker pool hands a task to the thread that became idle last (streamvlm.serve.engine)."""

from __future__ import annotations

import threading
import time

import pytest

from streamvlm.serve.engine import LastIdleFirst


def _started(pool: LastIdleFirst, count: int) -> list:
    """`count` tasks that run at once (each waits for the others), so the pool starts `count` threads."""
    barrier = threading.Barrier(count)
    return [pool.submit(lambda: (barrier.wait(5), threading.get_ident())[1]) for _ in range(count)]


def test_one_task_at_a_time_stays_on_the_thread_idle_last():
    pool = LastIdleFirst(3, "test")
    try:
        threads = {f.result(5) for f in _started(pool, 3)}
        assert len(threads) == 3
        ran = set()
        for _ in range(6):  # one after another, as one client's requests come (the thread is idle again)
            while len(pool._idle) < 3:
                time.sleep(0.01)
            ran.add(pool.submit(threading.get_ident).result(5))
        assert len(ran) == 1 and ran <= threads  # ThreadPoolExecutor would go round all three
    finally:
        pool.shutdown()


def test_at_most_max_workers_threads_and_the_rest_wait_in_order():
    pool = LastIdleFirst(2, "test")
    gate, order = threading.Event(), []
    try:
        blocked = [pool.submit(gate.wait, 5) for _ in range(2)]
        queued = [pool.submit(order.append, i) for i in range(4)]
        assert len(pool._threads) == 2 and not any(f.done() for f in queued)
        gate.set()
        assert all(f.result(5) for f in blocked) and [f.result(5) for f in queued] == [None] * 4
        assert order == [0, 1, 2, 3] and len(pool._threads) == 2
    finally:
        pool.shutdown()


def test_errors_reach_the_future_and_shutdown_cancels_the_backlog():
    pool = LastIdleFirst(1, "test")
    gate = threading.Event()
    failing = pool.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    while not pool._idle:  # the thread is back and idle (its future was set a moment before)
        time.sleep(0.01)
    running = pool.submit(gate.wait, 5)
    while pool._idle:  # it took the task
        time.sleep(0.01)
    waiting = pool.submit(lambda: "never")
    pool.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert running.result(5) is True and waiting.cancelled()
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(print)
    pool.shutdown()  # joins its thread
    assert not any(t.is_alive() for t in pool._threads)
