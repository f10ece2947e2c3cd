"""Small value types that cross subsystem boundaries."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

TEXT = 0
"""Token kind: text (and any other non-routed token, such as a video's closing newline)."""
VISION = 1
"""Token kind: a vision token of a frame; only these are routed."""


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive tokens fed through the decoder at once (text, frames, or both).

    Tokens are in sequence order. Frame tokens of one frame are contiguous and row-major on the frame's
    token grid, so routers can take top-k within each frame and reason about neighbours.
    """

    embeds: torch.Tensor
    """(n, d) input embeddings."""
    positions: torch.Tensor
    """(n,) int64 absolute positions in the session's token sequence; RoPE uses these."""
    kinds: torch.Tensor
    """(n,) uint8, TEXT or VISION."""
    frames: torch.Tensor
    """(n,) int32 session frame index of each vision token, -1 for text."""
    frame_spans: tuple[tuple[int, int], ...] = ()
    """(start, end) within the chunk of each frame's vision tokens, in order."""
    frame_grid: tuple[int, int] | None = None
    """(rows, cols) of a frame's tokens (row-major), for policies that look at spatial neighbours."""
    rope: torch.Tensor | None = None
    """(3, n) int64 multimodal RoPE positions (temporal, height, width) for families with M-RoPE (Qwen-VL);
    None when RoPE reads `positions`. `positions` stays the sequence order either way (causality, eviction)."""
    deepstack: torch.Tensor | None = None
    """(L, v, d) features added to the chunk's v vision tokens (in chunk order) after decoder layers 0..L-1
    (Qwen3-VL's DeepStack); None for other families."""

    def __post_init__(self):
        n = self.embeds.shape[0]
        if not (self.positions.shape == self.kinds.shape == self.frames.shape == (n,)):
            raise ValueError("chunk fields must all have one entry per token")
        if self.rope is not None and tuple(self.rope.shape) != (3, n):
            raise ValueError(f"chunk rope positions must be (3, {n}), got {tuple(self.rope.shape)}")

    def rope_ids(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Position ids for the decoder's rotary module: of every token as a batch of one ((1, n), or (3, 1, n)
        with M-RoPE), or of `index` (a 2-D tensor of chunk indices (B, m) -> (B, m), or (3, B, m))."""
        if index is None:
            return self.positions[None] if self.rope is None else self.rope[:, None]
        return self.positions[index] if self.rope is None else self.rope[:, index]

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def num_frames(self) -> int:
        return len(self.frame_spans)

    @cached_property
    def vision_index(self) -> torch.Tensor:
        """(num_frames, tokens_per_frame) int64 chunk indices of each frame's vision tokens."""
        device = self.embeds.device
        if not self.frame_spans:
            return torch.empty(0, 0, dtype=torch.long, device=device)
        sizes = {end - start for start, end in self.frame_spans}
        if len(sizes) != 1:
            raise ValueError(f"frames of one chunk must have the same token count, got {sorted(sizes)}")
        return torch.stack([torch.arange(start, end, device=device) for start, end in self.frame_spans])

    @cached_property
    def text_mask(self) -> torch.Tensor:
        """(n,) bool, True for tokens that are never routed."""
        return self.kinds == TEXT

    def split(self, max_tokens: int) -> list[Chunk]:
        """The chunk as consecutive pieces of at most `max_tokens` tokens, cut only between frames or inside
        text: a frame's tokens stay in one piece (so a piece is longer only where one frame alone is). Fed one
        after another, the pieces are the chunk fed in parts, as a session's frames in smaller chunks: the same
        positions, and routers see whole frames. A batched step runs a long prefill this way
        (`streamvlm.batching`)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        n = len(self)
        if n <= max_tokens:
            return [self]
        pieces = []
        start = 0
        while start < n:
            end = min(start + max_tokens, n)
            for first, last in self.frame_spans:
                if first < end < last:  # the cut falls inside this frame: cut before it, or after it if it starts here
                    end = first if first > start else last
                    break
            pieces.append(self._piece(start, end))
            start = end
        return pieces

    def _piece(self, start: int, end: int) -> Chunk:
        """Tokens start..end-1 as a chunk of their own; no frame may straddle start or end."""
        spans = tuple((first - start, last - start) for first, last in self.frame_spans if start <= first < end)
        deepstack = None
        if self.deepstack is not None:  # (L, v, d) rows of the chunk's vision tokens in order
            before = sum(last - first for first, last in self.frame_spans if last <= start)
            deepstack = self.deepstack[:, before:before + sum(last - first for first, last in spans)]
        return Chunk(self.embeds[start:end], self.positions[start:end], self.kinds[start:end],
                     self.frames[start:end], spans, self.frame_grid,
                     None if self.rope is None else self.rope[:, start:end], deepstack)


@dataclass(frozen=True)
class Turn:
    """One question and its answer in a session."""

    question: str
    answer: str
    answer_ids: tuple[int, ...]
    """Generated token ids, without the stop token."""
    frames_seen: int
    """Frames ingested when the question was asked; the answer refers to these."""
    stream_time: float | None
    """Timestamp (seconds) of the last frame seen, when frames carried timestamps."""
    stop_reason: str
    """"stop_token", "max_new_tokens", "context_full" (the model's context is used up), "cancelled" (the
    caller stopped reading the stream) or "scored" (the answer was given to `Session.score`)."""
    context_tokens: int = 0
    """Positions the model had read before the answer's first token: the system prompt, the video, earlier
    turns and this question (what an OpenAI-style API reports as prompt tokens)."""
