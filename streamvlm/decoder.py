"""Our decoder forward over a family's weights, with a router at every layer.

For each layer: the router picks which tokens of the chunk the layer processes (all text, some or all
vision tokens); those are gathered, normed, projected to q/k/v, rotated with their original positions,
appended to that layer's cache, attend to everything the layer has cached (causally inside the chunk),
go through the MLP, and their update (scaled by the router weight) is scattered back. Tokens left out
keep their hidden state for the next layer, where they may be picked again.

Pitfall: RoPE goes on before caching, at each token's absolute position, so a layer's cache can be
sparse (positions with gaps) and still be valid for any later query.

What to process and how are apart. Per chunk, the router's `decide` says which tokens a layer processes
and with what weight (`RouteDecision`). How a layer computes is fixed when the decoder is built: the
router's `variant(layer)` (a `WindowAttention`, `PrunedHeads`, `VisionSkip` or `YopoLayer`, or None for the
standard block) picks the layer's path once, and each path is one straight function (`_standard`, `_window`,
`_pruned_heads`, `_vision_skip`, `_yopo`). No flag is read in every forward to choose between them.

Compute and accounting are apart. A layer's tensor work is `_layer_step` (norm, q/k/v, RoPE, the write of
its K/V into the cache views it is handed, attention, MLP, the router weight); it sees tensors and the
layer's modules only, never the cache object or the FLOP counter, so `torch.compile` can trace it without
guarding on Python lists or floats that change every step. What each layer did is kept as a `_LayerWork`
(tokens attended, tokens through the MLP, the variant when attention was not plain), and the FLOP counter
is charged once after the layer loop, from that record and the cache's lengths.

Batched steps (`forward_batch`): several sequences' chunks, each with its own cache and router, in one pass.
At a layer where a sequence runs the standard block its kept rows join the others': norms, projections and
RoPE run once over all rows (`_standard_rows`; the angles are computed once a step), the cache write and
attention per sequence (`_attend_rotated`).
Variant layers run per sequence through their path. The server, `caption --batch` and live streams reach it
through `streamvlm.batching`.

Compiled decode (`Decoder(..., compile=True)`): one-token chunks on a non-empty cache through plain layers
run `_layer_step` compiled, with the key length marked dynamic, so decode compiles once (the first step)
and not again as the cache grows or its buffers double. Everything else (prefill chunks, whose lengths and
routed subsets vary; the variant paths) runs the same code eagerly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from streamvlm.attention import (causal_attend, head_pruned_attend, head_pruned_visits, neighbour_attend,
                                 neighbour_visits, yopo_attend, yopo_visits)
from streamvlm.cache import KVCache
from streamvlm.ffn import check_gated_mlp, sparse_mlp, vision_neurons
from streamvlm.flops import FlopCounter
from streamvlm.parts import DecoderParts, LayerParts
from streamvlm.routers.base import PrunedHeads, Router, VisionSkip, WindowAttention, YopoLayer
from streamvlm.rope import apply_rope
from streamvlm.types import Chunk


def _attention_update(p: DecoderParts, layer: LayerParts, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      keys: torch.Tensor, values: torch.Tensor, scale: float, attend=None) -> torch.Tensor:
    """x: (m, d) inputs of the tokens that attend; keys, values: (KV, L, hd) views of the layer's cache whose
    last m rows are theirs, written here (after RoPE). Returns the attention update (m, d).

    attend(q (H, m, hd), keys, values) -> (H, m, hd) replaces plain attention (window, pruned heads).
    """
    h = layer.input_norm(x)
    attn = _attend(p, layer, layer.q_proj(h), layer.k_proj(h), layer.v_proj(h), cos, sin, keys, values, scale, attend)
    return layer.o_proj(attn)


def _attend(p: DecoderParts, layer: LayerParts, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, attend=None) -> torch.Tensor:
    """The attention of m tokens from their projections q (m, H*hd), k, v (m, KV*hd): RoPE, their K/V written
    as the last m rows of the cache views keys, values (KV, L, hd), attention. Returns (m, H*hd), before
    o_proj."""
    q, k = _rotate(p, layer, q, k, cos, sin)
    return _attend_rotated(p, q, k, v, keys, values, scale, attend)


def _rotate(p: DecoderParts, layer: LayerParts, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Projections q (m, H*hd), k (m, KV*hd) -> q (m, H, hd), k (m, KV, hd), per-head normed where the family
    does (Qwen3) and rotated by cos, sin (m, hd). Row by row: a batched step rotates every sequence's rows in
    one call, with the same bits as each alone."""
    m = q.shape[0]
    q = q.view(m, p.num_heads, p.head_dim)
    k = k.view(m, p.num_kv_heads, p.head_dim)
    if layer.q_norm is not None:  # per-head RMSNorm of queries and keys before RoPE (Qwen3)
        q, k = layer.q_norm(q), layer.k_norm(k)
    cos, sin = cos[:, None], sin[:, None]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def _attend_rotated(p: DecoderParts, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                    values: torch.Tensor, scale: float, attend=None) -> torch.Tensor:
    """`_attend` after `_rotate`: q (m, H, hd), k (m, KV, hd), v (m, KV*hd) -> (m, H*hd)."""
    m = q.shape[0]
    start = keys.shape[1] - m
    keys[:, start:] = k.transpose(0, 1)  # the cache's buffers: compiled, this write stays in the graph, in place
    values[:, start:] = v.view(m, p.num_kv_heads, p.head_dim).transpose(0, 1)
    q = q.transpose(0, 1)  # (H, m, hd)
    attn = causal_attend(q, keys, values, scale) if attend is None else attend(q, keys, values)
    return attn.transpose(0, 1).reshape(m, p.num_heads * p.head_dim)


def _layer_step(p: DecoderParts, layer: LayerParts, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, weight: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One layer for the m tokens it processes: x (m, d) -> their new hidden states (m, d), writing their
    K/V as the last m rows of the cache views keys, values (KV, L, hd). The unit `compile=True` compiles."""
    a = _attention_update(p, layer, x, cos, sin, keys, values, scale)
    return _add_mlp(layer, x, a, weight)


def _add_mlp(layer: LayerParts, x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """x (m, d) and its attention update a -> x + a + MLP(x + a), the update scaled by the router weight."""
    mid = x + a
    m_out = layer.mlp(layer.post_attention_norm(mid))
    if weight is None:
        return mid + m_out
    # x + w * (block(x) - x), associated so that w == 1 gives the dense result bit for bit.
    w = weight[:, None].to(x.dtype)
    return (x + w * a) + w * m_out


def _add_split_mlp(layer: LayerParts, x: torch.Tensor, a: torch.Tensor, text: torch.Tensor, vision: torch.Tensor,
                   neurons: int) -> torch.Tensor:
    """`_add_mlp` (weight 1) where the rows `vision` go through only the MLP's first `neurons` intermediate
    neurons (YOPO's sparse FFN) and the rows `text` through all of them; text and vision partition x's rows."""
    mid = x + a
    h = layer.post_attention_norm(mid)
    m_out = torch.empty_like(mid)
    m_out[text] = layer.mlp(h[text])
    m_out[vision] = sparse_mlp(layer.mlp, h[vision], neurons)
    return mid + m_out


class _LayerWork(NamedTuple):
    """What one layer did for a chunk, for the accounting after the step."""

    layer: int
    attended: int
    """Tokens whose attention ran (and wrote K/V): the last `attended` entries of the layer's cache."""
    mlp: int
    """Tokens through the MLP."""
    variant: WindowAttention | PrunedHeads | YopoLayer | None = None
    """The layer's attention variant, when it is not plain (its key visits depend on the entries)."""
    sparse_mlp: int = 0
    """Tokens through only `neurons` of the MLP's intermediate neurons (YOPO's vision tokens), besides `mlp`."""
    neurons: int = 0
    """How many of the MLP's intermediate neurons the `sparse_mlp` tokens used."""


class Decoder:
    """Runs chunks through the language model. Holds no state of its own besides the router.

    compile: run decode steps (one-token chunks) through `torch.compile(_layer_step)`; off by default (on
    these CPUs eager is as fast, see `streamvlm bench dense --compile`).
    """

    def __init__(self, parts: DecoderParts, router: Router, compile: bool = False):
        self.parts = parts
        self.router = router
        self.scale = parts.head_dim ** -0.5
        self.compiled = compile
        # How each layer computes is fixed here, once: the router's variant for the layer picks its path.
        self._variants = [router.variant(index) for index in range(parts.num_layers)]
        self._paths = [self._path(index, variant) for index, variant in enumerate(self._variants)]
        # fullgraph: a graph break inside the step would silently put Python back into every decode step.
        # dynamic=False: only the key length, marked in `_layer`, is dynamic. Compiled graphs of `_layer_step`
        # are shared by every Decoder in the process; with automatic dynamic shapes a second model's other head
        # count would turn the head dims symbolic too (and SDPA's enable_gqa flag into a SymBool it rejects).
        self._compiled_step = torch.compile(_layer_step, fullgraph=True, dynamic=False) if compile else None

    def forward(self, chunk: Chunk, cache: KVCache, flops: FlopCounter, logits: str = "last") -> torch.Tensor | None:
        """Process `chunk`, appending its K/V to `cache`, and charge its FLOPs to `flops`.

        logits: "last" -> (vocab,) for the last token, "all" -> (n, vocab), "none" -> None.
        """
        p = self.parts
        x, work = self._layers(chunk, cache)
        out = None
        rows = 0
        if logits != "none":
            h = x[-1:] if logits == "last" else x
            rows = h.shape[0]
            out = p.lm_head(p.norm(h))
            out = out[0] if logits == "last" else out
        self._account(flops, chunk, cache, work, rows)
        return out

    def finished(self) -> None:
        """The calling thread's sequence hands in no more chunks (its session asked its last question). Nothing
        to do here; a batched decoder's steps stop waiting for it (`streamvlm.batching`)."""

    def _layers(self, chunk: Chunk, cache: KVCache) -> tuple[torch.Tensor, list[_LayerWork]]:
        """Every layer over the chunk: the last hidden states (n, d) and what each layer did."""
        p = self.parts
        x = chunk.embeds
        cos, sin = p.rotary(x, chunk.rope_ids())  # (1, n, head_dim) each
        cos, sin = cos[0], sin[0]
        work: list[_LayerWork] = []
        for index, layer in enumerate(p.layers):
            x = _deepstack(x, chunk, index)
            decision = self.router.decide(index, x, chunk)
            x, done = self._paths[index](index, layer, x, cos, sin, chunk, decision, cache)
            if done is not None:
                work.append(done)
        return _deepstack(x, chunk, len(p.layers)), work

    def _account(self, flops: FlopCounter, chunk: Chunk, cache: KVCache, work: list[_LayerWork], rows: int) -> None:
        """Charge the chunk to `flops` from what each layer did and the cache as the step left it (each layer
        appended once, so its last `attended` entries are the chunk's), in the order the counter's sums
        always took; `rows`: lm_head rows computed."""
        for done in work:
            if done.attended:
                flops.add_attention(done.layer, done.attended, self._key_visits(done, chunk, cache))
            if done.mlp:
                flops.add_mlp(done.mlp)
            if done.sparse_mlp:
                flops.add_mlp(done.sparse_mlp, done.neurons)
        flops.add_dense(len(chunk), int(chunk.positions[0]))  # what this chunk costs with routing off
        if rows:
            flops.add_logits(rows)

    def _key_visits(self, done: _LayerWork, chunk: Chunk, cache: KVCache) -> int:
        """Query-key pairs a layer's attention scored: m queries at the end of the layer's L entries each see
        the earlier entries and, inside the chunk, the kept tokens up to themselves."""
        layer, m, variant = done.layer, done.attended, done.variant
        if variant is None:
            length = cache.length(layer)
            return m * (length - m) + m * (m + 1) // 2
        if isinstance(variant, WindowAttention):
            return neighbour_visits(chunk, cache.positions(layer), cache.kinds(layer), variant.window)
        if isinstance(variant, YopoLayer):
            return yopo_visits(chunk, cache.positions(layer), cache.kinds(layer), variant.window, variant.heads)
        return head_pruned_visits(chunk, cache.kinds(layer), variant.heads)  # no tensor per step

    def _layer(self, index: int, layer: LayerParts, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               chunk: Chunk, keep, weight: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """x: (m, d) hidden states of the tokens this layer processes (chunk rows `keep`) -> their new states."""
        keys, values = cache.extend(index, chunk.positions[keep], chunk.kinds[keep], chunk.frames[keep])
        step = _layer_step
        if self._compiled_step is not None and x.shape[0] == 1 and keys.shape[1] > 1:
            # The one size that changes from step to step; without this the second step recompiles.
            torch._dynamo.mark_dynamic(keys, 1)
            torch._dynamo.mark_dynamic(values, 1)
            step = self._compiled_step
        return step(self.parts, layer, x, cos, sin, keys, values, weight, self.scale)

    # -- one path per layer variant, chosen in __init__ -------------------------------------------------
    # Each takes (index, layer, x (n, d), cos, sin, chunk, decision, cache) and returns (x, _LayerWork or None).

    def _path(self, index: int, variant):
        if variant is None:
            return self._standard
        if isinstance(variant, WindowAttention):
            return functools.partial(self._window, variant=variant)
        if isinstance(variant, PrunedHeads):
            if len(variant.heads) != self.parts.num_heads:
                raise ValueError(f"layer {index}: the head mask has {len(variant.heads)} heads, the model "
                                 f"{self.parts.num_heads}")
            mask = torch.tensor(variant.heads, dtype=torch.bool, device=self.parts.embed_tokens.weight.device)
            return functools.partial(self._pruned_heads, variant=variant, mask=mask)
        if isinstance(variant, VisionSkip):
            if variant.part not in ("attn", "mlp", "parallel"):
                raise ValueError(f"layer {index}: unknown VisionSkip part {variant.part!r}")
            return functools.partial(self._vision_skip, part=variant.part)
        if isinstance(variant, YopoLayer):
            return self._yopo_path(index, variant)
        raise TypeError(f"layer {index}: {type(self.router).__name__} gave an unknown layer variant {variant!r}")

    def _standard(self, index, layer, x, cos, sin, chunk, decision, cache):
        """The standard block over the tokens the decision keeps (all of them when it is None)."""
        n = len(chunk)
        if decision is None:
            return self._layer(index, layer, x, cos, sin, chunk, slice(None), None, cache), _LayerWork(index, n, n)
        keep = decision.keep_index
        if keep.numel() == 0:  # nothing of this chunk runs here (e.g. a vision-only chunk)
            return x, None
        if keep.numel() == n:  # everything kept: no gather/scatter
            return self._layer(index, layer, x, cos, sin, chunk, slice(None), decision.weight, cache), \
                _LayerWork(index, n, n)
        out = self._layer(index, layer, x[keep], cos[keep], sin[keep], chunk, keep, decision.weight, cache)
        return x.index_copy(0, keep, out), _LayerWork(index, keep.numel(), keep.numel())

    def _variant_takes_every_token(self, index: int, decision) -> None:
        if decision is not None:
            raise ValueError(f"layer {index} runs a variant of {type(self.router).__name__}, which processes every "
                             "token; its decide() must return None there")

    def _window(self, index, layer, x, cos, sin, chunk, decision, cache, variant: WindowAttention):
        """Every token; vision queries attend to earlier text and a w x w window of their frame."""
        self._variant_takes_every_token(index, decision)
        if chunk.num_frames == 0:  # text only: the window changes nothing
            return self._standard(index, layer, x, cos, sin, chunk, None, cache)
        keys, values = cache.extend(index, chunk.positions, chunk.kinds, chunk.frames)

        def attend(q, k, v):
            return neighbour_attend(q, k, v, chunk, cache.positions(index), cache.kinds(index), variant.window,
                                     self.scale)

        a = _attention_update(self.parts, layer, x, cos, sin, keys, values, self.scale, attend)
        return _add_mlp(layer, x, a, None), _LayerWork(index, len(chunk), len(chunk), variant)

    def _pruned_heads(self, index, layer, x, cos, sin, chunk, decision, cache, variant: PrunedHeads,
                      mask: torch.Tensor):
        """Every token; pruned heads neither read nor update vision tokens (text-only chunks too: a pruned
        head must not let later text read vision entries)."""
        self._variant_takes_every_token(index, decision)
        keys, values = cache.extend(index, chunk.positions, chunk.kinds, chunk.frames)

        def attend(q, k, v):
            return head_pruned_attend(q, k, v, chunk, cache.kinds(index), mask, self.scale)

        a = _attention_update(self.parts, layer, x, cos, sin, keys, values, self.scale, attend)
        return _add_mlp(layer, x, a, None), _LayerWork(index, len(chunk), len(chunk), variant)

    def _vision_skip(self, index, layer, x, cos, sin, chunk, decision, cache, part: str):
        """Every token; the chunk's vision tokens skip attention ("attn"), the MLP ("mlp"), or run both on
        the layer's input side by side ("parallel"). Tokens that attend read x; tokens that run the MLP read
        x + attention, or x itself when they did not attend or run in parallel."""
        self._variant_takes_every_token(index, decision)
        if chunk.num_frames == 0:  # text only: nothing to skip
            return self._standard(index, layer, x, cos, sin, chunk, None, cache)
        everything = torch.arange(len(chunk), device=x.device)
        text = torch.nonzero(chunk.text_mask).squeeze(1)
        attends = text if part == "attn" else everything
        mlp_rows = text if part == "mlp" else everything
        after = x
        if attends.numel():
            keys, values = cache.extend(index, chunk.positions[attends], chunk.kinds[attends], chunk.frames[attends])
            after = x.index_add(0, attends, _attention_update(self.parts, layer, x[attends], cos[attends],
                                                              sin[attends], keys, values, self.scale))
        mlp_in = after
        if part == "parallel":
            vision = chunk.vision_index.flatten()
            mlp_in = after.index_copy(0, vision, x[vision])
        if mlp_rows.numel():
            after = after.index_add(0, mlp_rows, layer.mlp(layer.post_attention_norm(mlp_in[mlp_rows])))
        return after, _LayerWork(index, attends.numel(), mlp_rows.numel())

    def _yopo_path(self, index: int, variant: YopoLayer):
        p = self.parts
        if variant.heads and len(variant.heads) != p.num_heads:
            raise ValueError(f"layer {index}: the head mask has {len(variant.heads)} heads, the model {p.num_heads}")
        if variant.window is not None and (variant.window < 1 or variant.window % 2 == 0):
            raise ValueError(f"layer {index}: the window must be odd and >= 1, got {variant.window}")
        neurons = vision_neurons(p.intermediate_size, variant.ffn)
        if neurons < p.intermediate_size:
            check_gated_mlp(p.layers[index].mlp, index)
        mask = None
        if any(variant.heads):
            mask = torch.tensor(variant.heads, dtype=torch.bool, device=p.embed_tokens.weight.device)
        return functools.partial(self._yopo, variant=variant, pruned=mask, neurons=neurons)

    def _yopo(self, index, layer, x, cos, sin, chunk, decision, cache, variant: YopoLayer,
              pruned: torch.Tensor | None, neurons: int):
        """Every token; YOPO's layer (before its layer drop): vision queries attend through the window, pruned
        heads neither read nor update vision tokens, vision tokens go through the first `neurons` of the MLP.
        Text-only chunks too: a pruned head must not let later text read vision entries."""
        self._variant_takes_every_token(index, decision)
        keys, values = cache.extend(index, chunk.positions, chunk.kinds, chunk.frames)

        def attend(q, k, v):
            return yopo_attend(q, k, v, chunk, cache.positions(index), cache.kinds(index), variant.window, pruned,
                               self.scale)

        a = _attention_update(self.parts, layer, x, cos, sin, keys, values, self.scale, attend)
        n = len(chunk)
        if chunk.num_frames == 0:
            return _add_mlp(layer, x, a, None), _LayerWork(index, n, n, variant)
        vision = chunk.vision_index.flatten()
        text = torch.nonzero(chunk.text_mask).squeeze(1)
        out = _add_split_mlp(layer, x, a, text, vision, neurons)
        return out, _LayerWork(index, n, text.numel(), variant, sparse_mlp=vision.numel(), neurons=neurons)


class Work(NamedTuple):
    """One sequence's part of a batched step: a chunk for its own cache, charged to its own counter."""

    decoder: Decoder
    """The sequence's decoder (its router); every decoder of a step runs the same model's weights."""
    chunk: Chunk
    cache: KVCache
    flops: FlopCounter
    logits: str = "last"
    """As `Decoder.forward` takes it: "last", "all" or "none"."""


def forward_batch(work: Sequence[Work]) -> list[torch.Tensor | None]:
    """Several sequences' chunks through the model in one pass: per item what `item.decoder.forward` returns.

    Each sequence keeps its own cache (its own length per layer) and its own routing. At a layer where a
    sequence runs the standard block, its kept rows join every other such sequence's: the norms, the q/k/v,
    o and MLP projections run once over all rows (the weights are read once per step, not once per
    sequence, which is what a memory-bound decode step costs), and only RoPE, the cache write and attention
    run per sequence, each over its own cache. A layer variant (window, pruned heads, vision skip) runs on
    its sequence alone through the decoder's own path. Routing decisions stay per sequence.
    """
    if len(work) == 1:
        only = work[0]
        return [only.decoder.forward(only.chunk, only.cache, only.flops, only.logits)]
    p = work[0].decoder.parts
    if any(item.decoder.parts is not p for item in work):
        raise ValueError("a batched step runs one model: every decoder must share its DecoderParts")
    xs = [item.chunk.embeds for item in work]
    rotations, every = _rotations(p, work)
    done: list[list[_LayerWork]] = [[] for _ in work]
    for index, layer in enumerate(p.layers):
        group = []  # (item, kept rows or None for all, router weight) of the items in the standard block here
        for b, item in enumerate(work):
            xs[b] = _deepstack(xs[b], item.chunk, index)
            decoder = item.decoder
            decision = decoder.router.decide(index, xs[b], item.chunk)
            if decoder._variants[index] is not None:
                cos, sin = rotations[b]
                xs[b], layer_work = decoder._paths[index](index, layer, xs[b], cos, sin, item.chunk, decision,
                                                          item.cache)
                if layer_work is not None:
                    done[b].append(layer_work)
                continue
            keep, weight = (None, None) if decision is None else (decision.keep_index, decision.weight)
            if keep is not None and keep.numel() == 0:  # nothing of this chunk runs here
                continue
            if keep is not None and keep.numel() == len(item.chunk):
                keep = None
            group.append((b, keep, weight))
        if group:
            _standard_rows(p, work, index, layer, group, xs, rotations, every, done)
    for b, item in enumerate(work):
        xs[b] = _deepstack(xs[b], item.chunk, len(p.layers))
    heads = [xs[b][-1:] if item.logits == "last" else xs[b] for b, item in enumerate(work) if item.logits != "none"]
    logits = iter(p.lm_head(p.norm(torch.cat(heads))).split([h.shape[0] for h in heads]) if heads else ())
    outs = []
    for b, item in enumerate(work):
        out = None if item.logits == "none" else next(logits)
        item.decoder._account(item.flops, item.chunk, item.cache, done[b], 0 if out is None else out.shape[0])
        outs.append(out[0] if item.logits == "last" else out)
    return outs


def _deepstack(x: torch.Tensor, chunk: Chunk, index: int) -> torch.Tensor:
    """DeepStack (Qwen3-VL): the vision tower's intermediate features of layer `index` - 1 join the chunk's
    vision tokens' residual stream before layer `index` (after the last layer: index = num_layers), whether
    or not the router sent the tokens through the layer before."""
    stack = chunk.deepstack
    if stack is None or not 0 < index <= stack.shape[0]:
        return x
    return x.index_add(0, chunk.vision_index.flatten(), stack[index - 1].to(x.dtype))


def _rotations(p: DecoderParts, work: Sequence[Work]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                                 tuple[torch.Tensor, torch.Tensor]]:
    """The RoPE angles of a step: each item's (cos, sin) (n, head_dim), and every item's rows concatenated.
    One call of the rotary module for all items, whose angles are position by position the same as each
    alone's; not where the module rescales its frequencies by the longest position it is given (dynamic
    NTK, LongRoPE), which would tie a sequence's angles to its batch."""
    rope_type = getattr(p.rotary, "rope_type", "default")
    if isinstance(rope_type, str) and "dynamic" not in rope_type and rope_type != "longrope":
        cos, sin = p.rotary(work[0].chunk.embeds, torch.cat([item.chunk.rope_ids() for item in work], dim=-1))
        cos, sin = cos[0], sin[0]  # (N, head_dim) each
        sizes = [len(item.chunk) for item in work]
        return list(zip(cos.split(sizes), sin.split(sizes))), (cos, sin)
    rotations = []
    for item in work:
        cos, sin = p.rotary(item.chunk.embeds, item.chunk.rope_ids())  # (1, n, head_dim) each
        rotations.append((cos[0], sin[0]))
    return rotations, (torch.cat([c for c, _ in rotations]), torch.cat([s for _, s in rotations]))


def _standard_rows(p: DecoderParts, work: Sequence[Work], index: int, layer: LayerParts, group: list, xs: list,
                   rotations: list, every: tuple[torch.Tensor, torch.Tensor], done: list) -> None:
    """The standard block at layer `index` over the kept rows of every sequence in `group`, all projected and
    rotated at once; each sequence writes its cache and attends over it. `every`: the step's angles of all
    items' rows. Updates xs and done in place."""
    rows = [xs[b] if keep is None else xs[b][keep] for b, keep, _ in group]
    sizes = [r.shape[0] for r in rows]
    x = torch.cat(rows)  # (M, d)
    if len(group) == len(work) and all(keep is None for _, keep, _ in group):
        cos, sin = every
    else:
        cos = torch.cat([rotations[b][0] if keep is None else rotations[b][0][keep] for b, keep, _ in group])
        sin = torch.cat([rotations[b][1] if keep is None else rotations[b][1][keep] for b, keep, _ in group])
    h = layer.input_norm(x)
    q, k = _rotate(p, layer, layer.q_proj(h), layer.k_proj(h), cos, sin)
    q, k, v = q.split(sizes), k.split(sizes), layer.v_proj(h).split(sizes)
    attended = []
    for i, (b, keep, _) in enumerate(group):
        chunk = work[b].chunk
        taken = slice(None) if keep is None else keep
        keys, values = work[b].cache.extend(index, chunk.positions[taken], chunk.kinds[taken], chunk.frames[taken])
        attended.append(_attend_rotated(p, q[i], k[i], v[i], keys, values, work[b].decoder.scale))
    a = layer.o_proj(torch.cat(attended))
    weights = [w for _, _, w in group]
    weight = None if all(w is None for w in weights) else torch.cat(
        [torch.ones(m, dtype=x.dtype, device=x.device) if w is None else w for w, m in zip(weights, sizes)])
    out = _add_mlp(layer, x, a, weight).split(sizes)
    for i, (b, keep, _) in enumerate(group):
        xs[b] = out[i] if keep is None else xs[b].index_copy(0, keep, out[i])
        done[b].append(_LayerWork(index, sizes[i], sizes[i]))
