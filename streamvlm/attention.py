"""Attention kernels over one layer's cache: plain causal, YOPO's neighbour window, pruned heads, and the
window with pruned heads together (YOPO combined), each with the count of query-key pairs it scores (for
the FLOP counter, read after the step, not inside it).

Every kernel takes the queries of a chunk that sits at the end of the layer's cache, q (H, m, hd), and the
layer's keys and values (KV, L, hd), post-RoPE, and returns (H, m, hd).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from streamvlm.types import VISION, Chunk


def causal_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
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
        make = _chunk_mask if m * length <= _CACHED_MASK_SIZE else _chunk_mask.__wrapped__
        mask = make(m, length, q.dtype, q.device)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0]


_CACHED_MASK_SIZE = 1 << 16
"""Masks of up to this many elements are kept (a question's, an answer's closing text): every layer of every
sequence in a step asks for the same few, and building one costs as much as the small attention it masks."""


@functools.lru_cache(maxsize=32)  # a step of 8 sequences asks for up to 8 (m, length) pairs, once per layer
def _chunk_mask(m: int, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive mask (m, length) of m queries at the end of `length` keys: 0 where a query sees the key
    (every earlier entry; itself and the chunk's tokens before it), -inf elsewhere. SDPA turns a boolean mask
    into this on every call."""
    with torch.inference_mode(False):  # cached across calls: must not be an inference-mode tensor
        mask = torch.zeros(m, length, dtype=dtype, device=device)
        mask[:, length - m:] = torch.full((m, m), float("-inf"), dtype=dtype, device=device).triu_(1)
        return mask


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


def neighbour_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk: Chunk,
                      key_pos: torch.Tensor, key_kinds: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """Attention for a chunk whose every token was just appended (the last n cache entries), with vision
    queries restricted to earlier text plus a w x w causal window of their frame. q: (H, n, hd); keys,
    values: (KV, L, hd). Returns (H, n, hd); `neighbour_visits` counts the query-key pairs it scores.

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
    if text_rows.numel():  # text queries: every earlier entry, as in the dense model
        mask = key_pos[None, :] <= positions[text_rows][:, None]  # (t, L)
        out[:, text_rows] = F.scaled_dot_product_attention(q[None, :, text_rows], keys[None], values[None],
                                                           attn_mask=mask, scale=scale, enable_gqa=group > 1)[0]
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
    return out


def neighbour_visits(chunk: Chunk, key_pos: torch.Tensor, key_kinds: torch.Tensor, window: int) -> int:
    """Query-key pairs `neighbour_attend` scores for `chunk` (the last n of the layer's entries, whose
    positions and kinds are key_pos, key_kinds (L,)): text queries score every earlier entry, a vision query
    the earlier text before its frame and its w-row band of the frame (w x cols keys)."""
    positions = chunk.positions
    text_rows = torch.nonzero(chunk.text_mask).squeeze(1)
    visits = 0
    if text_rows.numel():
        visits += int((key_pos[None, :] <= positions[text_rows][:, None]).sum())
    if chunk.num_frames:
        rows, cols = chunk.frame_grid
        vision = chunk.vision_index  # (F, T)
        frames = vision.shape[0]
        firsts = positions[vision[:, 0]]  # (F,)
        context = torch.nonzero((key_kinds != VISION) & (key_pos < firsts.max())).squeeze(1)
        ctx_ok = key_pos[context][None, :] < firsts[:, None]  # (F, c)
        visits += frames * rows * cols * (int(ctx_ok.sum()) // frames + window * cols)
    return visits


def head_pruned_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk: Chunk,
                        key_kinds: torch.Tensor, pruned: torch.Tensor, scale: float) -> torch.Tensor:
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
    if active.numel():
        out[active] = F.scaled_dot_product_attention(q[None, active], k_all[None, active], v_all[None, active],
                                                     attn_mask=causal, scale=scale)[0]
    gone = torch.nonzero(pruned).squeeze(1)
    text = torch.nonzero(chunk.text_mask).squeeze(1)
    if gone.numel() and text.numel():  # vision queries get nothing from pruned heads: only text is computed
        mask = causal[text] & (key_kinds != VISION)[None, :]
        out[gone[:, None], text[None, :]] = F.scaled_dot_product_attention(
            q[None, gone][:, :, text], k_all[None, gone], v_all[None, gone], attn_mask=mask, scale=scale)[0]
    return out


def head_pruned_visits(chunk: Chunk, key_kinds: torch.Tensor, pruned) -> int:
    """Query-key pairs `head_pruned_attend` scores for `chunk` (the last n of the layer's L entries, of kinds
    key_kinds (L,)), in "all heads" units, as the counter charges attention per head-average: active heads
    score every causal pair; pruned heads only text queries against non-vision entries. pruned: per head,
    True where pruned (a tuple of bools, as `PrunedHeads` holds it, or a bool tensor)."""
    heads, n, length = len(pruned), len(chunk), key_kinds.numel()
    gone = int(sum(pruned))
    visits = (heads - gone) * (n * (length - n) + n * (n + 1) // 2)
    text = torch.nonzero(chunk.text_mask).squeeze(1)
    if gone and text.numel():
        seen = (key_kinds != VISION).cumsum(0)  # (L,) non-vision entries among 0..j
        visits += gone * int(seen[length - n + text].sum())  # text query i sees entries 0..L-n+i
    return visits // heads


def yopo_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk: Chunk, key_pos: torch.Tensor,
                key_kinds: torch.Tensor, window: int | None, pruned: torch.Tensor | None, scale: float) -> torch.Tensor:
    """YOPO's attention for a chunk whose every token was just appended (the last n cache entries): the
    neighbour window and inactive heads together. q: (H, n, hd); keys, values: (KV, L, hd); key_pos,
    key_kinds (L,). Returns (H, n, hd); `yopo_visits` counts the query-key pairs it scores.

    Active heads: text queries see every earlier entry; vision queries the earlier text before their frame
    and a w x w causal window of their frame (`neighbour_attend`; window None: every earlier entry).
    Pruned heads (`pruned`, (H,) bool, or None when none is): vision queries get nothing (their output is 0),
    text queries see only the earlier non-vision entries, whose scores alone are computed.
    """
    heads, n, hd = q.shape
    group = heads // keys.shape[0]

    def active_heads(q_a, k_a, v_a):
        if window is None:
            return causal_attend(q_a, k_a, v_a, scale)
        return neighbour_attend(q_a, k_a, v_a, chunk, key_pos, key_kinds, window, scale)

    if pruned is None:
        return active_heads(q, keys, values)
    out = torch.zeros_like(q)
    active = torch.nonzero(~pruned).squeeze(1)
    if active.numel():  # each active query head with its own kv head: GQA groups break once heads are pruned
        kv = active // group
        out[active] = active_heads(q[active], keys[kv], values[kv])
    gone = torch.nonzero(pruned).squeeze(1)
    text = torch.nonzero(chunk.text_mask).squeeze(1)
    if gone.numel() and text.numel():
        context = torch.nonzero(key_kinds != VISION).squeeze(1)  # (c,) the entries pruned heads may read
        length = keys.shape[1]
        causal = context[None, :] <= (length - n + text)[:, None]  # (t, c): entry index <= the query's own
        kv = gone // group
        k_ctx, v_ctx = keys[kv][:, context], values[kv][:, context]  # (P, c, hd)
        out[gone[:, None], text[None, :]] = F.scaled_dot_product_attention(
            q[gone][:, text][None], k_ctx[None], v_ctx[None], attn_mask=causal, scale=scale)[0]
    return out


def yopo_visits(chunk: Chunk, key_pos: torch.Tensor, key_kinds: torch.Tensor, window: int | None, pruned) -> int:
    """Query-key pairs `yopo_attend` scores for `chunk` (the last n of the layer's L entries, with positions
    and kinds key_pos, key_kinds (L,)), in "all heads" units as the counter charges attention: each active
    head scores what `neighbour_visits` counts (every causal pair when window is None), each pruned head its
    text queries against the earlier non-vision entries. pruned: per head, True where pruned (a tuple of
    bools, as `YopoLayer` holds it; () when none is)."""
    n, length = len(chunk), key_kinds.numel()
    if window is None:
        per_active = n * (length - n) + n * (n + 1) // 2
    else:
        per_active = neighbour_visits(chunk, key_pos, key_kinds, window)
    heads = len(pruned)
    gone = int(sum(pruned))
    if not gone:
        return per_active
    visits = (heads - gone) * per_active
    text = torch.nonzero(chunk.text_mask).squeeze(1)
    if text.numel():
        seen = (key_kinds != VISION).cumsum(0)  # (L,) non-vision entries among 0..j
        visits += gone * int(seen[length - n + text].sum())
    return visits // heads
