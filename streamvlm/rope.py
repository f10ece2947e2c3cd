"""Rotary position embedding helpers shared by the decoder, the memory budget and routers."""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., head_dim) rotated by cos/sin of each token's position, broadcast against it: x (heads, m, hd)
    with cos (m, hd), or x (m, heads, hd) with cos (m, 1, hd)."""
    return x * cos + _rotate_half(x) * sin


def shift_rope(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys (KV, n, hd) rotated at positions p -> the same keys rotated at p + delta (n,): RoPE rotations
    compose, so re-rotating by delta is exact (up to rounding) for plain RoPE."""
    freqs = delta.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]  # (n, hd / 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return apply_rope(keys, emb.cos().to(keys.dtype), emb.sin().to(keys.dtype))
