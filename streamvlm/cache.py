"""The KV cache of one session.

One object, one owner (the session). Per layer l it holds, for each of its `length(l)` entries:

    keys[l]    (num_kv_heads, capacity, head_dim)  post-RoPE keys; entry i is keys[l][:, i]
    values[l]  (num_kv_heads, capacity, head_dim)
    positions  (capacity,) int64  the token's absolute position in the session's sequence
    kinds      (capacity,) uint8  TEXT or VISION (streamvlm.types)
    frames     (capacity,) int32  session frame index of a vision token, -1 for text

Entries are in the order they were appended, which is sequence order. Layers hold different entries
under routing (a token skipped at layer l writes nothing there), so every length is per layer.

Writer: the decoder, once per layer per chunk, after RoPE: through `append`, or through `extend`, which
records the new entries' metadata and hands back views whose last m rows the decoder's layer step fills
(inside its compiled graph when the decoder is compiled: the step then sees tensors only, never this
object's Python lists). Reader: the decoder's attention at the same layer, through the views `append` and
`extend` return. Buffers grow by doubling (always leaving a free row), so appending a frame costs O(frame)
amortised rather than a copy of the whole cache.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", initial_capacity: int = 256):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self._initial_capacity = initial_capacity
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._positions: list[torch.Tensor | None] = [None] * num_layers
        self._kinds: list[torch.Tensor | None] = [None] * num_layers
        self._frames: list[torch.Tensor | None] = [None] * num_layers
        self._length = [0] * num_layers

    # -- writing ---------------------------------------------------------------------------------

    def _reserve(self, layer: int, needed: int) -> None:
        keys = self._keys[layer]
        capacity = 0 if keys is None else keys.shape[1]
        # Keep a free row past the entries: a view then never covers its whole buffer, so views of one
        # layer always have the same stride layout (one that covered its buffer would be contiguous, and a
        # compiled decode step, whose guards tell the two apart, would compile a second graph mid-answer).
        if needed < capacity:
            return
        new_cap = max(needed + 1, 2 * capacity, self._initial_capacity)
        n = self._length[layer]
        kv_shape = (self.num_kv_heads, new_cap, self.head_dim)

        def grow(old, shape, dtype):
            new = torch.empty(shape, dtype=dtype, device=self.device)
            if old is not None and n:
                if len(shape) == 3:
                    new[:, :n] = old[:, :n]
                else:
                    new[:n] = old[:n]
            return new

        self._keys[layer] = grow(self._keys[layer], kv_shape, self.dtype)
        self._values[layer] = grow(self._values[layer], kv_shape, self.dtype)
        self._positions[layer] = grow(self._positions[layer], (new_cap,), torch.int64)
        self._kinds[layer] = grow(self._kinds[layer], (new_cap,), torch.uint8)
        self._frames[layer] = grow(self._frames[layer], (new_cap,), torch.int32)

    def extend(self, layer: int, positions: torch.Tensor, kinds: torch.Tensor,
               frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add m = positions.numel() entries at the end of `layer` with their metadata (m,), and return views
        (num_kv_heads, length, head_dim) of all keys and values at this layer. The caller writes the new
        entries' keys and values into the views' last m rows before anything reads them."""
        m = positions.shape[0]
        start = self._length[layer]
        end = start + m
        self._reserve(layer, end)
        self._positions[layer][start:end] = positions
        self._kinds[layer][start:end] = kinds
        self._frames[layer][start:end] = frames
        self._length[layer] = end
        return self._keys[layer][:, :end], self._values[layer][:, :end]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               kinds: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append m entries to `layer`: keys/values (num_kv_heads, m, head_dim), metadata (m,).

        Returns views (num_kv_heads, length, head_dim) of all keys and values at this layer, new ones last.
        """
        all_keys, all_values = self.extend(layer, positions, kinds, frames)
        start = all_keys.shape[1] - keys.shape[1]
        all_keys[:, start:] = keys
        all_values[:, start:] = values
        return all_keys, all_values

    def rewind(self, lengths: list[int]) -> None:
        """Drop every entry appended since `entries_per_layer` was `lengths` (a batched step that failed part-way
        leaves some layers holding a chunk and others not; its sequences go on from before it)."""
        if len(lengths) != self.num_layers or any(not 0 <= n <= m for n, m in zip(lengths, self._length)):
            raise ValueError(f"cannot rewind entries per layer {self._length} to {lengths}")
        self._length = list(lengths)

    def keep(self, layer: int, index: torch.Tensor) -> None:
        """Keep only the entries at ascending `index` (int64) of `layer`, in order; the rest are dropped."""
        m = index.numel()
        for store in (self._keys, self._values):
            store[layer][:, :m] = store[layer][:, index]  # advanced indexing copies first: no overlap hazard
        for store in (self._positions, self._kinds, self._frames):
            store[layer][:m] = store[layer][index]
        self._length[layer] = m

    def copy(self, room: int = 0) -> KVCache:
        """An independent cache with the same entries, each layer's buffers trimmed to its length plus the free
        row and `room` more entries: what a forked session starts from (`Session.fork`, which leaves room for
        a question and its answer, so that its first forward does not grow, i.e. copy again, every layer)."""
        twin = KVCache(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device,
                       self._initial_capacity)
        for layer, n in enumerate(self._length):
            if self._keys[layer] is None:
                continue
            for store, copied in ((self._keys, twin._keys), (self._values, twin._values)):
                buffer = store[layer].new_empty((self.num_kv_heads, n + 1 + room, self.head_dim))
                buffer[:, :n] = store[layer][:, :n]
                copied[layer] = buffer
            for store, copied in ((self._positions, twin._positions), (self._kinds, twin._kinds),
                                  (self._frames, twin._frames)):
                buffer = store[layer].new_empty((n + 1 + room,))
                buffer[:n] = store[layer][:n]
                copied[layer] = buffer
        twin._length = list(self._length)
        return twin

    def __deepcopy__(self, memo) -> KVCache:
        return self.copy()

    def set_positions(self, layer: int, positions: torch.Tensor, keys: torch.Tensor) -> None:
        """Replace a layer's positions (length,) and its keys (num_kv_heads, length, head_dim), e.g. after
        renumbering (the keys then carry the matching rotation)."""
        n = self._length[layer]
        self._positions[layer][:n] = positions
        self._keys[layer][:, :n] = keys

    # -- reading ---------------------------------------------------------------------------------

    def length(self, layer: int) -> int:
        return self._length[layer]

    def _view(self, store: list, layer: int) -> torch.Tensor:
        t = store[layer]
        n = self._length[layer]
        if t is None:
            raise IndexError(f"layer {layer} of the cache is empty")
        return t[:, :n] if t.dim() == 3 else t[:n]

    def keys(self, layer: int) -> torch.Tensor:
        """(num_kv_heads, length, head_dim) view."""
        return self._view(self._keys, layer)

    def values(self, layer: int) -> torch.Tensor:
        return self._view(self._values, layer)

    def positions(self, layer: int) -> torch.Tensor:
        return self._view(self._positions, layer)

    def kinds(self, layer: int) -> torch.Tensor:
        return self._view(self._kinds, layer)

    def frames(self, layer: int) -> torch.Tensor:
        return self._view(self._frames, layer)

    @property
    def entries_per_layer(self) -> list[int]:
        return list(self._length)

    @property
    def bytes_per_entry(self) -> int:
        """K and V bytes of one entry at one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize  # read at every forward: no tensor made

    @property
    def kv_bytes(self) -> int:
        """Exact bytes of the keys and values held (entries in use, all layers)."""
        return sum(self._length) * self.bytes_per_entry

    @property
    def reserved_bytes(self) -> int:
        """Bytes allocated, including spare capacity and the per-entry metadata."""
        total = 0
        for store in (self._keys, self._values, self._positions, self._kinds, self._frames):
            total += sum(t.numel() * t.element_size() for t in store if t is not None)
        return total
