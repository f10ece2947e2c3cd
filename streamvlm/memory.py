"""A memory budget for unbounded streams, and the policy that keeps a session's cache inside it.

When a session's cache would pass the budget, it keeps the prefix (attention sinks: the first tokens,
which every later token attends to heavily) and a recent window, and evicts the oldest vision entries in
between, layer by layer (under routing each layer holds different entries). Old text (questions and
answers) goes only when evicting vision is not enough. Then the survivors are renumbered: each distinct position still held at any layer gets
its rank as its new position, and cached keys are re-rotated by the difference (RoPE rotations compose),
so positions stay inside the model's context however long the stream runs.

A budget is an upper bound: the effective bound is the smaller of it and what the model's context holds,
so a budget larger than the context is clamped, never fatal. "auto" is half the context; "none" (or None)
keeps everything. Every edge (the CLI, `live`, `caption`, the server) passes the user's string through
`MemoryBudget.parse`; nothing else resolves these words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from streamvlm.cache import KVCache
from streamvlm.errors import StreamVLMError
from streamvlm.rope import shift_rope
from streamvlm.types import VISION

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


@dataclass(frozen=True)
class MemoryBudget:
    """Bounds a session's KV cache."""

    max_tokens: int | None = None
    """Entries per layer the cache may hold."""
    context_fraction: float | None = None
    """Entries per layer as a fraction of the model's context ("auto": 0.5)."""
    max_bytes: int | None = None
    """K/V bytes the whole cache may hold (converted to entries per layer for the model)."""
    sink_tokens: int = 16
    """The first positions are never evicted (attention sinks, the system prompt)."""
    recent_tokens: int | None = None
    """The newest positions are never evicted; default half the budget."""
    headroom: float = 0.1
    """Evict down to (1 - headroom) of the budget, so eviction (a copy of the cache) runs rarely."""

    def __post_init__(self):
        given = [v for v in (self.max_tokens, self.max_bytes, self.context_fraction) if v is not None]
        if len(given) != 1:
            raise StreamVLMError("a memory budget needs exactly one of max_tokens, max_bytes or context_fraction")
        if given[0] <= 0 or (self.context_fraction is not None and self.context_fraction > 1):
            raise StreamVLMError("a memory budget must be positive (and a context fraction at most 1)")
        if not 0.0 <= self.headroom < 1.0:
            raise StreamVLMError(f"headroom must be in [0, 1), got {self.headroom}")
        if self.sink_tokens < 0 or (self.recent_tokens is not None and self.recent_tokens < 0):
            raise StreamVLMError("sink_tokens and recent_tokens must be >= 0")

    @classmethod
    def parse(cls, spec: str | int | MemoryBudget | None) -> MemoryBudget | None:
        """"20000" or 20000 -> tokens per layer; "64MB", "2GiB", "512KiB" -> bytes of K/V; "auto" -> half the
        model's context; "none" or None -> no budget."""
        if spec is None or isinstance(spec, MemoryBudget):
            return spec
        if isinstance(spec, bool):
            raise StreamVLMError(f"memory budget {spec!r}: use a token count, a size, 'auto' or 'none'")
        if isinstance(spec, int):
            return cls(max_tokens=spec)
        if str(spec).strip().lower() == "none":
            return None
        if str(spec).strip().lower() == "auto":
            return cls(context_fraction=0.5)
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(spec))
        if not m:
            raise StreamVLMError(f"memory budget {spec!r}: use a token count (20000), a size (64MB, 2GiB), "
                                 "auto (half the model's context) or none")
        number, unit = float(m.group(1)), m.group(2).upper()
        if unit in ("", "T", "TOK", "TOKENS"):
            return cls(max_tokens=int(number))
        if unit not in _UNITS:
            raise StreamVLMError(f"memory budget {spec!r}: unknown unit {m.group(2)!r} (use KB, MB, GB, KiB, MiB, GiB)")
        return cls(max_bytes=int(number * _UNITS[unit]))

    def entries_per_layer(self, num_layers: int, bytes_per_entry: int, context: int) -> int:
        """Entries per layer for a model with `num_layers` layers and a `context`-token window: the budget,
        clamped to the context."""
        if self.context_fraction is not None:
            entries = int(context * self.context_fraction)
        elif self.max_tokens is not None:
            entries = self.max_tokens
        else:
            entries = self.max_bytes // (num_layers * bytes_per_entry)
        return min(entries, context)

    def recent(self, limit: int) -> int:
        return limit // 2 if self.recent_tokens is None else self.recent_tokens


class MemoryPolicy:
    """Keeps one session's cache inside a budget: evicts, then renumbers what is left (see the module
    docstring). Owned by the session; it reads and rewrites the session's cache and nothing else."""

    def __init__(self, budget: MemoryBudget, cache: KVCache, context: int, inv_freq: torch.Tensor):
        self.budget = budget
        self.cache = cache
        self.context = context
        self.inv_freq = inv_freq
        self.limit = budget.entries_per_layer(cache.num_layers, cache.bytes_per_entry, context)
        """Entries per layer the cache may hold."""
        self.evicted = 0

    @property
    def chunk_frames_cap(self) -> int:
        """Tokens a chunk may bring at most (a quarter of the budget), so eviction always has room to work."""
        return self.limit // 4

    @torch.inference_mode()
    def make_room(self, incoming: int, next_pos: int) -> int | None:
        """Evict so that every layer can take `incoming` more entries within the budget, and the sequence
        `incoming` more positions within the context. Returns the number of positions still held once
        renumbered (the new next position), or None when nothing moved."""
        cache, budget = self.cache, self.budget
        over_context = next_pos + incoming > self.context
        if max(cache.entries_per_layer) + incoming <= self.limit and not over_context:
            return None
        target = int(self.limit * (1 - budget.headroom)) - incoming
        # The recent window shrinks when the budget is tight, so prefix + window + incoming still fit.
        window = min(budget.recent(self.limit), max(target - budget.sink_tokens, 0))
        recent_from = next_pos - window
        for layer in range(cache.num_layers):
            length = cache.length(layer)
            if length <= target:
                continue
            pos, kinds = cache.positions(layer), cache.kinds(layer)
            middle = (pos >= budget.sink_tokens) & (pos < recent_from)
            # Oldest vision entries go first; old dialogue text only when vision alone is not enough.
            order = torch.cat([torch.nonzero(middle & (kinds == VISION)).squeeze(1),
                               torch.nonzero(middle & (kinds != VISION)).squeeze(1)])
            self._drop(layer, order[: length - max(target, 0)])
            if cache.length(layer) + incoming > self.limit:
                raise StreamVLMError(
                    f"the memory budget of {self.limit} entries per layer cannot hold {incoming} new tokens "
                    f"next to the {cache.length(layer)} it must keep (prefix and recent window); raise "
                    "the budget or lower max_new_tokens")
        held = self._held()
        if held.numel() + incoming > self.context:
            # Under routing, layers keep different positions: their union may still pass the context. Drop the
            # oldest middle positions from every layer until it fits.
            middle = held[(held >= budget.sink_tokens) & (held < recent_from)]
            gone = middle[: held.numel() + incoming - self.context]
            for layer in range(cache.num_layers):
                self._drop(layer, torch.nonzero(torch.isin(cache.positions(layer), gone)).squeeze(1))
            held = self._held()
        return self._renumber(held, next_pos)

    def _held(self) -> torch.Tensor:
        """Sorted distinct positions held at any layer."""
        return torch.cat([self.cache.positions(layer) for layer in range(self.cache.num_layers)]).unique()

    def _drop(self, layer: int, drop: torch.Tensor) -> None:
        if drop.numel() == 0:
            return
        keep = torch.ones(self.cache.length(layer), dtype=torch.bool, device=drop.device)
        keep[drop] = False
        self.cache.keep(layer, torch.nonzero(keep).squeeze(1))
        self.evicted += drop.numel()

    def _renumber(self, held: torch.Tensor, next_pos: int) -> int | None:
        """Give the positions still held (at any layer) consecutive numbers, re-rotating cached keys.

        With M-RoPE every entry moves by its scalar shift on all three axes (exact: each rotary frequency
        reads one axis, and all three move alike)."""
        if held.numel() == next_pos and (held.numel() == 0 or int(held[-1]) == held.numel() - 1):
            return None
        for layer in range(self.cache.num_layers):
            old = self.cache.positions(layer)
            new = torch.searchsorted(held, old)
            self.cache.set_positions(layer, new, shift_rope(self.cache.keys(layer), new - old, self.inv_freq))
        return held.numel()
