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

import functools

import torch
import torch.nn.functional as F

from streamvlm.cache import KVCache
from streamvlm.flops import FlopCounter
from streamvlm.parts import DecoderParts, LayerParts
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


@functools.lru_cache(maxsize=16)  # one per (grid, window, device): built once, not per layer and chunk
def _band_mask(grid: tuple[int, int], window: int, device) -> torch.Tensor:
    """(R, C, w*C) bool: for the query at grid cell (r, c), which keys of the w-row band around its row
    (rows r - w//2 .. r + w//2, every column) lie in its w x w window, inside the grid, and not after it."""
    with torch.inference_mode(False):  # cached across calls: must not be an inference-mode tensor
        rows, cols = grid
        half = window // 2
        r = torch.arange(rows, device=device)[:, None, None, None]
        c = torch.arange(cols, device=device)[None, :, None, None]
        dr = torch.arange(-half, half + 1, device=device)[None, None, :, None]
        kc = torch.arange(cols, device=device)[None, None, None, :]
        kr = r + dr
        valid = (kr >= 0) & (kr < rows) & ((kc - c).abs() <= half) & (kr * cols + kc <= r * cols + c)
        return valid.reshape(rows, cols, window * cols)


def _neighbour_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk: Chunk,
                      key_pos: torch.Tensor, key_kinds: torch.Tensor, window: int, scale: float) -> tuple[torch.Tensor, int]:
    """Attention for a chunk whose every token was just appended (the last n cache entries), with vision
    queries restricted to earlier text plus a w x w causal window of their frame. q: (H, n, hd); keys,
    values: (KV, L, hd). Returns (H, n, hd) and the number of query-key pairs scored.

    Vision queries are computed in row bands: the queries of one grid row score the keys of the w rows
    around it (w x cols keys, a batched matmul over every row and frame), masked to the window. That scores
    cols / w times more pairs than the window holds, still far fewer than dense attention.
    """
    heads, n, hd = q.shape
    kv_heads, length = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
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
        rows, cols = chunk.frame_grid
        half = window // 2
        vision = chunk.vision_index  # (F, T)
        frames = vision.shape[0]
        firsts = positions[vision[:, 0]]  # (F,) position of each frame's first token
        # Earlier text: entries that are not vision and precede the frame (per frame, by position).
        context = torch.nonzero((key_kinds != VISION) & (key_pos < firsts.max())).squeeze(1)  # (c,)
        ctx_ok = key_pos[context][None, :] < firsts[:, None]  # (F, c)
        entries = length - n + vision  # the frames' own cache rows: the chunk sits at the end of the cache
        k_frame = keys[:, entries].view(kv_heads, frames, rows, cols, hd)
        v_frame = values[:, entries].view(kv_heads, frames, rows, cols, hd)
        pad = (0, 0, 0, 0, half, half)  # zero rows above and below; the band mask hides them
        k_band = torch.stack([F.pad(k_frame, pad)[:, :, i:i + rows] for i in range(window)], dim=3)
        v_band = torch.stack([F.pad(v_frame, pad)[:, :, i:i + rows] for i in range(window)], dim=3)
        k_band = k_band.reshape(kv_heads, 1, frames, rows, window * cols, hd)  # (KV, 1, F, R, w*C, hd)
        v_band = v_band.reshape(kv_heads, 1, frames, rows, window * cols, hd)
        qv = q[:, vision].view(kv_heads, group, frames, rows, cols, hd)
        s_win = (qv @ k_band.transpose(-1, -2)) * scale  # (KV, G, F, R, C, w*C)
        s_win = s_win.masked_fill(~_band_mask(chunk.frame_grid, window, q.device), float("-inf"))
        k_ctx = keys[:, context][:, None, None]  # (KV, 1, 1, c, hd)
        s_ctx = (qv.flatten(3, 4) @ k_ctx.transpose(-1, -2)) * scale  # (KV, G, F, T, c)
        s_ctx = s_ctx.masked_fill(~ctx_ok[None, None, :, None, :], float("-inf"))
        c = context.numel()
        p = torch.cat([s_ctx, s_win.flatten(3, 4)], dim=-1).softmax(-1)  # (KV, G, F, T, c + w*C)
        p_ctx = p[..., :c]
        p_win = p[..., c:].unflatten(3, (rows, cols))  # (KV, G, F, R, C, w*C)
        mixed = p_ctx @ values[:, context][:, None, None] + (p_win @ v_band).flatten(3, 4)
        out[:, vision.flatten()] = mixed.reshape(heads, frames * rows * cols, hd)
        visits += frames * rows * cols * (int(ctx_ok.sum()) // frames + window * cols)
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
        cos, sin = p.rotary(x, chunk.rope_ids())  # (1, n, head_dim) each
        cos, sin = cos[0], sin[0]
        deepstack = chunk.deepstack
        vision_rows = chunk.vision_index.flatten() if deepstack is not None else None
        for index, layer in enumerate(p.layers):
            if deepstack is not None and 0 < index <= deepstack.shape[0]:
                # DeepStack: the vision tower's intermediate features join the vision tokens' residual stream
                # after each early layer, whether or not the router sent the tokens through that layer.
                x = x.index_add(0, vision_rows, deepstack[index - 1].to(x.dtype))
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
        if deepstack is not None and deepstack.shape[0] >= len(p.layers):
            x = x.index_add(0, vision_rows, deepstack[len(p.layers) - 1].to(x.dtype))
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
        if layer.q_norm is not None:  # per-head RMSNorm of queries and keys before RoPE (Qwen3)
            q, k = layer.q_norm(q), layer.k_norm(k)
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
