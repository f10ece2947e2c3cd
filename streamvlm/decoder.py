"""Our decoder forward over a family's weights, with a router at every layer.

For each layer: the router picks which tokens of the chunk the layer processes (all text, some or all
vision tokens); those are gathered, normed, projected to q/k/v, rotated with their original positions,
appended to that layer's cache, attend to everything the layer has cached (causally inside the chunk),
go through the MLP, and their update (scaled by the router weight) is scattered back. Tokens left out
keep their hidden state for the next layer, where they may be picked again.

Pitfall: RoPE goes on before caching, at each token's absolute position, so a layer's cache can be
sparse (positions with gaps) and still be valid for any later query.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamvlm.cache import KVCache
from streamvlm.flops import FlopCounter
from streamvlm.models.base import DecoderParts, LayerParts
from streamvlm.routers.base import Router
from streamvlm.rope import apply_rope
from streamvlm.types import VISION, Chunk


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """q (H, m, hd) are the queries of the last m of `keys`/`values` (KV, L, hd): each sees every earlier
    entry and, inside the chunk, itself and the kept tokens before it. Returns (H, m, hd).

    Pitfall: SDPA needs 4-D (batch, heads, seq, dim) inputs to reach its fused CPU kernel; 3-D inputs
    fall back to the unfused path, which is 5-7x slower at a few thousand keys.
    """
    m, length = q.shape[1], keys.shape[1]
    gqa = q.shape[0] != keys.shape[0]
    q, keys, values = q[None], keys[None], values[None]
    if m == 1 or m == length:
        # One query sees everything; a chunk on an empty cache is plain causal attention.
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=m > 1, scale=scale, enable_gqa=gqa)
    else:
        mask = torch.ones(m, length, dtype=torch.bool, device=q.device)
        mask[:, length - m:] = torch.ones(m, m, dtype=torch.bool, device=q.device).tril_()
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0]


def _window_table(grid: tuple[int, int], window: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, w*w) row-major neighbour indices within a frame and a (T, w*w) mask of the valid ones (inside
    the grid and not after the query: attention stays causal)."""
    rows, cols = grid
    half = window // 2
    token = torch.arange(rows * cols, device=device)
    r, c = token // cols, token % cols
    dr, dc = torch.meshgrid(torch.arange(-half, half + 1, device=device), torch.arange(-half, half + 1, device=device),
                            indexing="ij")
    nr, nc = r[:, None] + dr.flatten()[None], c[:, None] + dc.flatten()[None]
    index = nr * cols + nc
    valid = (nr >= 0) & (nr < rows) & (nc >= 0) & (nc < cols) & (index <= token[:, None])
    return index.clamp(0, rows * cols - 1), valid


def _neighbour_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk: Chunk,
                      key_pos: torch.Tensor, key_kinds: torch.Tensor, window: int, scale: float) -> tuple[torch.Tensor, int]:
    """Attention for a chunk whose every token was just appended (the last n cache entries), with vision
    queries restricted to earlier text plus a w x w causal window of their frame. q: (H, n, hd); keys,
    values: (KV, L, hd). Returns (H, n, hd) and the number of query-key pairs scored."""
    heads, n, _ = q.shape
    group = heads // keys.shape[0]
    length = keys.shape[1]
    out = torch.empty_like(q)
    positions = chunk.positions
    text_rows = torch.nonzero(chunk.text_mask).squeeze(1)
    visits = 0
    if text_rows.numel():  # text queries: every earlier entry, as in the dense model
        mask = key_pos[None, :] <= positions[text_rows][:, None]  # (t, L)
        out[:, text_rows] = F.scaled_dot_product_attention(q[None, :, text_rows], keys[None], values[None],
                                                           attn_mask=mask, scale=scale, enable_gqa=group > 1)[0]
        visits += int(mask.sum())
    if chunk.num_frames:
        index, valid = _window_table(chunk.frame_grid, window, q.device)  # (T, w*w)
        k_all = keys.repeat_interleave(group, 0)  # (H, L, hd)
        v_all = values.repeat_interleave(group, 0)
        text_keys = key_kinds != VISION
        for start, end in chunk.frame_spans:
            rows = torch.arange(start, end, device=q.device)
            context = torch.nonzero(text_keys & (key_pos < positions[start])).squeeze(1)  # (c,)
            frame = length - n + rows  # the frame's own entries: the chunk sits at the end of the cache
            qf = q[:, rows]  # (H, T, hd)
            k_win, v_win = k_all[:, frame[index]], v_all[:, frame[index]]  # (H, T, w*w, hd)
            s_ctx = (qf @ k_all[:, context].transpose(1, 2)) * scale  # (H, T, c)
            s_win = (qf[:, :, None, :] * k_win).sum(-1) * scale  # (H, T, w*w)
            s_win = s_win.masked_fill(~valid, float("-inf"))
            p = torch.cat([s_ctx, s_win], dim=-1).softmax(-1)
            p_ctx, p_win = p[..., : context.numel()], p[..., context.numel():]
            out[:, rows] = p_ctx @ v_all[:, context] + (p_win[..., None] * v_win).sum(-2)
            visits += rows.numel() * context.numel() + int(valid.sum())
    return out, visits


def _head_pruned_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk: Chunk,
                        key_kinds: torch.Tensor, pruned: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
    """Attention for a chunk at the end of the cache where pruned heads neither read nor update vision
    tokens. Active heads run as usual; pruned heads skip vision queries and mask vision keys for text."""
    heads, n, hd = q.shape
    length = keys.shape[1]
    group = heads // keys.shape[0]
    out = torch.zeros_like(q)
    causal = torch.ones(n, length, dtype=torch.bool, device=q.device)
    causal[:, length - n:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril_()
    k_all, v_all = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    active = torch.nonzero(~pruned).squeeze(1)
    visits = 0
    if active.numel():
        out[active] = F.scaled_dot_product_attention(q[None, active], k_all[None, active], v_all[None, active],
                                                     attn_mask=causal, scale=scale)[0]
        visits += active.numel() * int(causal.sum())
    gone = torch.nonzero(pruned).squeeze(1)
    text = torch.nonzero(chunk.text_mask).squeeze(1)
    if gone.numel() and text.numel():  # vision queries get nothing from pruned heads: only text is computed
        mask = causal[text] & (key_kinds != VISION)[None, :]
        out[gone[:, None], text[None, :]] = F.scaled_dot_product_attention(
            q[None, gone][:, :, text], k_all[None, gone], v_all[None, gone], attn_mask=mask, scale=scale)[0]
        visits += gone.numel() * int(mask.sum())
    # The counter charges attention per head-average: scale the visits back to "all heads" units.
    return out, visits // heads


class Decoder:
    """Runs chunks through the language model. Holds no state of its own besides the router."""

    def __init__(self, parts: DecoderParts, router: Router):
        self.parts = parts
        self.router = router
        self.scale = parts.head_dim ** -0.5

    def forward(self, chunk: Chunk, cache: KVCache, flops: FlopCounter, logits: str = "last") -> torch.Tensor | None:
        """Process `chunk`, appending its K/V to `cache`.

        logits: "last" -> (vocab,) for the last token, "all" -> (n, vocab), "none" -> None.
        """
        p = self.parts
        x = chunk.embeds
        cos, sin = p.rotary(x, chunk.positions[None])  # (1, n, head_dim) each
        cos, sin = cos[0], sin[0]
        for index, layer in enumerate(p.layers):
            decision = self.router.decide(index, x, chunk)
            if decision is None:
                x = self._layer(index, layer, x, cos, sin, chunk, slice(None), None, cache, flops)
            elif decision.window is not None or decision.pruned_heads is not None:
                x = self._layer(index, layer, x, cos, sin, chunk, slice(None), None, cache, flops, decision)
            elif decision.splits_the_block:
                x = self._split_layer(index, layer, x, cos, sin, chunk, decision, cache, flops)
            elif decision.keep_index.numel() == 0:  # nothing of this chunk runs here (e.g. vision-only chunk)
                continue
            elif decision.keep_index.numel() == len(chunk):  # everything kept: no gather/scatter
                x = self._layer(index, layer, x, cos, sin, chunk, slice(None), decision.weight, cache, flops)
            else:
                keep = decision.keep_index
                out = self._layer(index, layer, x[keep], cos[keep], sin[keep], chunk, keep, decision.weight,
                                  cache, flops)
                x = x.index_copy(0, keep, out)
        flops.add_dense(len(chunk), int(chunk.positions[0]))  # what this chunk costs with routing off
        if logits == "none":
            return None
        h = x[-1:] if logits == "last" else x
        flops.add_logits(h.shape[0])
        out = p.lm_head(p.norm(h))
        return out[0] if logits == "last" else out

    def _attention(self, index: int, layer: LayerParts, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   chunk: Chunk, keep, cache: KVCache, flops: FlopCounter, decision=None) -> torch.Tensor:
        """x: (m, d) inputs of the tokens that attend -> their attention update (m, d); appends their K/V."""
        p = self.parts
        m = x.shape[0]
        h = layer.input_norm(x)
        q = layer.q_proj(h).view(m, p.num_heads, p.head_dim).transpose(0, 1)  # (H, m, hd)
        k = layer.k_proj(h).view(m, p.num_kv_heads, p.head_dim).transpose(0, 1)  # (KV, m, hd)
        v = layer.v_proj(h).view(m, p.num_kv_heads, p.head_dim).transpose(0, 1)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        keys, values = cache.append(index, k, v, chunk.positions[keep], chunk.kinds[keep], chunk.frames[keep])
        length = keys.shape[1]
        if decision is not None and decision.window is not None:
            attn, visits = _neighbour_attend(q, keys, values, chunk, cache.positions(index), cache.kinds(index),
                                             decision.window, self.scale)
        elif decision is not None and decision.pruned_heads is not None:
            attn, visits = _head_pruned_attend(q, keys, values, chunk, cache.kinds(index), decision.pruned_heads,
                                               self.scale)
        else:
            attn = _attend(q, keys, values, self.scale)  # (H, m, hd)
            visits = m * (length - m) + m * (m + 1) // 2
        flops.add_attention(index, m, visits)
        return layer.o_proj(attn.transpose(0, 1).reshape(m, p.num_heads * p.head_dim))

    def _layer(self, index: int, layer: LayerParts, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               chunk: Chunk, keep, weight: torch.Tensor | None, cache: KVCache, flops: FlopCounter,
               decision=None) -> torch.Tensor:
        """x: (m, d) hidden states of the tokens this layer processes -> their new hidden states."""
        a = self._attention(index, layer, x, cos, sin, chunk, keep, cache, flops, decision)
        mid = x + a
        m_out = layer.mlp(layer.post_attention_norm(mid))
        flops.add_mlp(x.shape[0])
        if weight is None:
            return mid + m_out
        # x + w * (block(x) - x), associated so that w == 1 gives the dense result bit for bit.
        w = weight[:, None].to(x.dtype)
        return (x + w * a) + w * m_out

    def _split_layer(self, index: int, layer: LayerParts, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     chunk: Chunk, decision, cache: KVCache, flops: FlopCounter) -> torch.Tensor:
        """A layer whose attention and MLP run on different token sets, or in parallel for some tokens.

        x: (n, d) the whole chunk. Tokens in keep_index attend; tokens in mlp_index run the MLP, reading
        x + attention (or x itself for parallel tokens and tokens that did not attend).
        """
        keep = decision.keep_index
        after = x
        if keep.numel():
            after = x.index_add(0, keep, self._attention(index, layer, x[keep], cos[keep], sin[keep], chunk, keep,
                                                         cache, flops))
        mlp_index = keep if decision.mlp_index is None else decision.mlp_index
        mlp_in = after if decision.parallel_index is None else after.index_copy(
            0, decision.parallel_index, x[decision.parallel_index])
        if mlp_index.numel():
            after = after.index_add(0, mlp_index, layer.mlp(layer.post_attention_norm(mlp_in[mlp_index])))
            flops.add_mlp(mlp_index.numel())
        return after
