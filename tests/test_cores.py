"""streamvlm.cores: a thread's torch thread count changes for that thread only."""

from __future__ import annotations

import threading

import pytest
import torch

from streamvlm.cores import one_core, single_core, use_cores


def _on_thread(fn):
    box = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join()
    return box[0]


def test_one_core_lowers_the_calling_threads_count_only():
    main = torch.get_num_threads()
    fresh = _on_thread(torch.get_num_threads)  # what a new thread starts with

    def feeder():
        one_core()
        return torch.get_num_threads(), _on_thread(torch.get_num_threads)

    # the feeder runs on one core; a thread it starts afterwards, and the main thread, keep their counts
    assert _on_thread(feeder) == (1, fresh)
    assert torch.get_num_threads() == main and _on_thread(torch.get_num_threads) == fresh


def test_use_cores_and_single_core_restore_what_new_threads_start_with():
    fresh = _on_thread(torch.get_num_threads)

    def computer():
        use_cores(fresh + 1)
        with single_core():
            inside = torch.get_num_threads()
        return inside, torch.get_num_threads()

    assert _on_thread(computer) == (1, fresh + 1)
    assert _on_thread(torch.get_num_threads) == fresh


def test_use_cores_refuses_fewer_than_one_and_changes_nothing():
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="at least one core"):
        use_cores(0)
    assert torch.get_num_threads() == before
