"""One attention probe: a layer's attention probabilities from chosen queries to chosen keys, computed with
the layer's own weights, and one router that records what layers read, for probing afterwards.

Everything that ranks tokens by attention asks the same question: given the hidden states a layer read at
some query tokens (its input), and keys (a cache layer's post-RoPE keys, or the keys the layer makes from
hidden states of a chunk), what is softmax(q k^T / sqrt(head_dim)) per head? fastv, pdrop and schedule rank
a frame's tokens by the attention of the frame's last token, cls_knee ranks cached vision entries by the
question's attention, head calibration measures each head's attention to vision, and the training's ranking
loss distils the dense model's attention into the router's scores.

Shapes, unbatched: hidden (m, d), rope ids (1, m) or (3, 1, m) (as `Chunk.rope_ids()` gives them), keys
(KV, L, hd) -> probabilities (H, m, L). Batched (one probe per row, e.g. per frame): hidden (B, m, d), ids
(B, m) or (3, B, m) (as `Chunk.rope_ids(index)` gives them for an index (B, m)), keys (B, KV, L, hd) ->
(B, H, m, L).

The queries and keys are made as the decoder makes them (input norm, projection, the family's per-head q/k
norm where it has one, RoPE at the given ids), so `layer_keys` of a layer's input equals what the decoder
caches at that layer. The probe's FLOPs are not charged to any counter.
"""

from __future__ import annotations

import torch
from torch import nn

from streamvlm.parts import DecoderParts
from streamvlm.rope import apply_rope
from streamvlm.routers.base import DenseRouter, RouteDecision
from streamvlm.types import Chunk


def _project(parts: DecoderParts, hidden: torch.Tensor, rope_ids: torch.Tensor, norm: nn.Module,
             proj: nn.Module, head_norm: nn.Module | None, heads: int) -> torch.Tensor:
    """hidden (..., m, d) -> (..., heads, m, hd): normed, projected, head-normed, rotated."""
    h = norm(hidden)
    x = proj(h)
    x = x.view(*x.shape[:-1], heads, parts.head_dim).transpose(-3, -2)
    if head_norm is not None:  # per-head RMSNorm before RoPE (Qwen3)
        x = head_norm(x)
    cos, sin = parts.rotary(h, rope_ids)  # (B, m, hd)
    if hidden.dim() == 2:
        cos, sin = cos[0], sin[0]  # (m, hd) for (heads, m, hd)
    else:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, m, hd) for (B, heads, m, hd)
    return apply_rope(x, cos, sin)


def layer_queries(parts: DecoderParts, layer: int, hidden: torch.Tensor, rope_ids: torch.Tensor) -> torch.Tensor:
    """The queries `layer` makes from its input `hidden` (..., m, d) at `rope_ids`: (..., H, m, hd), post-RoPE."""
    lp = parts.layers[layer]
    return _project(parts, hidden, rope_ids, lp.input_norm, lp.q_proj, lp.q_norm, parts.num_heads)


def layer_keys(parts: DecoderParts, layer: int, hidden: torch.Tensor, rope_ids: torch.Tensor) -> torch.Tensor:
    """The keys `layer` makes from its input `hidden` (..., n, d) at `rope_ids`: (..., KV, n, hd), post-RoPE,
    as the decoder caches them."""
    lp = parts.layers[layer]
    return _project(parts, hidden, rope_ids, lp.input_norm, lp.k_proj, lp.k_norm, parts.num_kv_heads)


def attention_probs(parts: DecoderParts, layer: int, hidden: torch.Tensor, rope_ids: torch.Tensor,
                    keys: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                    mean_heads: bool = False) -> torch.Tensor:
    """Attention probabilities of `layer` from the queries it makes of `hidden` (..., m, d) at `rope_ids` to
    `keys` (..., KV, L, hd) (post-RoPE: a cache layer's, or `layer_keys`): (..., H, m, L), or (..., m, L)
    averaged over heads.

    mask: bool, broadcastable to (..., m, L), True where a query may attend. causal: the queries are the last
    m of the L keys, each seeing the keys up to itself (as in the decoder). Each query must see some key.
    """
    q = layer_queries(parts, layer, hidden, rope_ids)  # (..., H, m, hd)
    keys = keys.repeat_interleave(parts.num_heads // parts.num_kv_heads, dim=-3)  # (..., H, L, hd)
    scores = (q @ keys.transpose(-1, -2)) * parts.head_dim ** -0.5  # (..., H, m, L)
    if causal:
        m, length = scores.shape[-2], scores.shape[-1]
        seen = torch.ones(m, length, dtype=torch.bool, device=scores.device).tril_(length - m)
        mask = seen if mask is None else mask & seen
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    return probs.mean(dim=-3) if mean_heads else probs


class HiddenRecorder(DenseRouter):
    """A dense router that keeps, for each chosen layer, the input hidden states (n, d) and the chunk of
    the last chunk that reached it (`hidden[layer]`, `chunks[layer]`), for probing after the forward.

    layers: the layers to record (None: every layer). every_chunk: also keep every chunk each layer read since
    the last `clear()`, in order, as (hidden, chunk) pairs in `seen[layer]`, for probing a chunk other than the
    last (a scored question and answer, before the text that closed the turn). Off by default: over a stream
    it would hold every frame's hidden states. Tensors are kept as the decoder hands them (under no_grad or
    inference mode they carry no graph).
    """

    def __init__(self, layers=None, every_chunk: bool = False):
        super().__init__()
        self.layers = None if layers is None else {int(layer) for layer in layers}
        self.every_chunk = every_chunk
        self.hidden: dict[int, torch.Tensor] = {}
        self.chunks: dict[int, Chunk] = {}
        self.seen: dict[int, list[tuple[torch.Tensor, Chunk]]] = {}

    def clear(self) -> None:
        """Forget what was recorded."""
        self.hidden, self.chunks, self.seen = {}, {}, {}

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        if self.layers is None or layer in self.layers:
            self.hidden[layer] = hidden
            self.chunks[layer] = chunk
            if self.every_chunk:
                self.seen.setdefault(layer, []).append((hidden, chunk))
        return None
