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
        for _ in range(6):  # one after another, each as soon as the one before is done, as one client's come
            ran.add(pool.submit(threading.get_ident).result(5))
            assert len(pool._threads) == 3  # a thread is idle again before its future is done: none is added
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
    assert pool._idle  # the thread was idle before its future was done
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


@pytest.mark.parametrize("stream", [False, True])
def test_one_clients_requests_stay_on_one_worker_of_the_server(tiny_dir, tmp_path, stream):
    """The reply goes once its worker is idle again, so the next request, sent at once, finds that worker."""
    from fastapi.testclient import TestClient

    from streamvlm import StreamVLM
    from streamvlm.serve import Engine, MediaPolicy, ServeConfig, create_app
    from support import encode, indexed_frames

    encode(tmp_path / "clip.mp4", indexed_frames(8))
    engine = Engine(StreamVLM.from_pretrained(tiny_dir, device="cpu"), "tiny", max_batch=4)
    body = {"model": "tiny", "max_tokens": 2, "stream": stream, "video": {"num_frames": 2},
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}},
                                                      {"type": "text", "text": "What is it?"}]}]}
    with TestClient(create_app(engine, ServeConfig(media=MediaPolicy(tmp_path)))) as http:
        for _ in range(12):
            reply = http.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200
    assert len(engine.pool._threads) == 1
