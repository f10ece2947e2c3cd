"""The KV cache: per-layer lengths, metadata, growth, exact bytes."""

from __future__ import annotations

import pytest
import torch

from streamvlm.cache import KVCache
from streamvlm.types import TEXT, VISION


def _append(cache, layer, n, start_pos, kind=VISION, frame=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(cache.num_kv_heads, n, cache.head_dim, generator=g)
    v = torch.randn(cache.num_kv_heads, n, cache.head_dim, generator=g)
    pos = torch.arange(start_pos, start_pos + n)
    keys, values = cache.append(layer, k, v, pos, torch.full((n,), kind, dtype=torch.uint8),
                                torch.full((n,), frame, dtype=torch.int32))
    return k, v, keys, values


def test_layers_grow_independently_and_keep_their_entries():
    cache = KVCache(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float32, initial_capacity=4)
    k0, v0, _, _ = _append(cache, 0, 3, 0, kind=TEXT, frame=-1, seed=1)
    k1, v1, keys, values = _append(cache, 0, 10, 3, frame=0, seed=2)  # forces two growths
    _append(cache, 2, 5, 7, frame=1, seed=3)
    assert cache.entries_per_layer == [13, 0, 5]
    assert torch.equal(keys, torch.cat([k0, k1], dim=1)) and torch.equal(values, torch.cat([v0, v1], dim=1))
    assert torch.equal(cache.keys(0), keys)
    assert cache.positions(0).tolist() == list(range(13))
    assert cache.positions(2).tolist() == list(range(7, 12))  # sparse layers keep original positions
    assert cache.kinds(0).tolist() == [TEXT] * 3 + [VISION] * 10
    assert cache.frames(0).tolist() == [-1] * 3 + [0] * 10


def test_bytes_are_exact():
    cache = KVCache(num_layers=2, num_kv_heads=3, head_dim=4, dtype=torch.bfloat16)
    _append(cache, 0, 5, 0)
    _append(cache, 1, 2, 0)
    # 7 entries x (K + V) x 3 heads x 4 dims x 2 bytes
    assert cache.kv_bytes == 7 * 2 * 3 * 4 * 2
    assert cache.kv_bytes == sum(cache.keys(l).nbytes + cache.values(l).nbytes for l in range(2))
    assert cache.reserved_bytes > cache.kv_bytes


def test_a_copy_keeps_the_entries_and_room_for_more_without_growing():
    cache = KVCache(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32, initial_capacity=4)
    k, v, _, _ = _append(cache, 0, 9, 0, seed=4)
    twin = cache.copy(room=5)
    before = twin.keys(0).data_ptr()
    k2, v2, keys, values = _append(twin, 0, 5, 9, seed=5)  # fits the room: the same buffer
    assert keys.data_ptr() == before and twin.entries_per_layer == [14, 0]
    assert torch.equal(keys, torch.cat([k, k2], dim=1)) and torch.equal(values, torch.cat([v, v2], dim=1))
    assert cache.entries_per_layer == [9, 0] and torch.equal(cache.keys(0), k)  # the original is untouched
    _append(twin, 0, 1, 14, seed=6)  # one past the room grows, keeping every entry
    assert twin.keys(0).data_ptr() != before and twin.positions(0).tolist() == list(range(15))
    assert cache.copy().reserved_bytes < twin.reserved_bytes


def test_rewind_drops_what_was_appended_since_and_refuses_to_grow():
    cache = KVCache(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, initial_capacity=4)
    k, v, _, _ = _append(cache, 0, 3, 0, seed=1)
    _append(cache, 1, 2, 0, seed=2)
    before = cache.entries_per_layer
    _append(cache, 0, 6, 3, seed=3)  # grows layer 0's buffers
    cache.rewind(before)
    assert cache.entries_per_layer == [3, 2]
    assert torch.equal(cache.keys(0), k) and torch.equal(cache.values(0), v)
    assert cache.positions(0).tolist() == [0, 1, 2]
    for bad in ([4, 2], [3], [-1, 0]):
        with pytest.raises(ValueError, match="rewind"):
            cache.rewind(bad)
