"""A memory budget for unbounded streams.

When a session's cache would pass the budget, it keeps the prefix (attention sinks: the first tokens,
which every later token attends to heavily) and a recent window, and evicts the oldest vision entries in
between, layer by layer (under routing each layer holds different entries). Old text (questions and
answers) goes only when evicting vision is not enough. Then the survivors are renumbered: each distinct position still held at any layer gets
its rank as its new position, and cached keys are re-rotated by the difference (RoPE rotations compose),
so positions stay inside the model's context however long the stream runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from streamvlm.errors import StreamVLMError

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


@dataclass(frozen=True)
class MemoryBudget:
    """Bounds a session's KV cache."""

    max_tokens: int | None = None
    """Entries per layer the cache may hold."""
    max_bytes: int | None = None
    """K/V bytes the whole cache may hold (converted to entries per layer for the model)."""
    sink_tokens: int = 16
    """The first positions are never evicted (attention sinks, the system prompt)."""
    recent_tokens: int | None = None
    """The newest positions are never evicted; default half the budget."""
    headroom: float = 0.1
    """Evict down to (1 - headroom) of the budget, so eviction (a copy of the cache) runs rarely."""

    def __post_init__(self):
        if (self.max_tokens is None) == (self.max_bytes is None):
            raise StreamVLMError("a memory budget needs exactly one of max_tokens or max_bytes")
        if (self.max_tokens if self.max_tokens is not None else self.max_bytes) <= 0:
            raise StreamVLMError("a memory budget must be positive")
        if not 0.0 <= self.headroom < 1.0:
            raise StreamVLMError(f"headroom must be in [0, 1), got {self.headroom}")
        if self.sink_tokens < 0 or (self.recent_tokens is not None and self.recent_tokens < 0):
            raise StreamVLMError("sink_tokens and recent_tokens must be >= 0")

    @classmethod
    def parse(cls, spec: str | int | MemoryBudget | None) -> MemoryBudget | None:
        """"20000" or 20000 -> tokens per layer; "64MB", "2GiB", "512KiB" -> bytes of K/V."""
        if spec is None or isinstance(spec, MemoryBudget):
            return spec
        if isinstance(spec, int):
            return cls(max_tokens=spec)
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(spec))
        if not m:
            raise StreamVLMError(f"memory budget {spec!r}: use a token count (20000) or a size (64MB, 2GiB)")
        number, unit = float(m.group(1)), m.group(2).upper()
        if unit in ("", "T", "TOK", "TOKENS"):
            return cls(max_tokens=int(number))
        if unit not in _UNITS:
            raise StreamVLMError(f"memory budget {spec!r}: unknown unit {m.group(2)!r} (use KB, MB, GB, KiB, MiB, GiB)")
        return cls(max_bytes=int(number * _UNITS[unit]))

    def entries_per_layer(self, num_layers: int, bytes_per_entry: int) -> int:
        if self.max_tokens is not None:
            return self.max_tokens
        return self.max_bytes // (num_layers * bytes_per_entry)

    def recent(self, limit: int) -> int:
        return limit // 2 if self.recent_tokens is None else self.recent_tokens
