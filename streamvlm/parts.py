"""The language model's modules and shape, as the decoder, the routers and the FLOP counter read them.

Family adapters (`streamvlm.models`) build these from a checkpoint; nothing here knows a family.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerParts:
    """One decoder layer's modules, as the checkpoint holds them (pre-norm attention then MLP)."""

    input_norm: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    post_attention_norm: nn.Module
    mlp: nn.Module
    """Called as mlp(x) on normed hidden states: (n, d) -> (n, d)."""
    q_norm: nn.Module | None = None
    """Per-head norm of queries, (..., head_dim) -> same, applied before RoPE (Qwen3); None if absent."""
    k_norm: nn.Module | None = None
    """Per-head norm of keys, as q_norm."""


@dataclass(frozen=True)
class DecoderParts:
    """The language model's weights and shape, for `streamvlm.decoder.Decoder`."""

    embed_tokens: nn.Embedding
    layers: tuple[LayerParts, ...]
    rotary: nn.Module
    """rotary(x, position_ids) -> (cos, sin) in x's dtype: ids (B, n) -> (B, n, head_dim) each; families with
    M-RoPE also take (3, B, n) (temporal, height, width), see Chunk.rope_ids."""
    norm: nn.Module
    lm_head: nn.Linear
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)
