"""Ranking a frame's vision tokens by the attention they receive, shared by fastv, pdrop, schedule and cls_knee.

In a stream the question arrives after the frames, so the ranking query cannot be the question: here it is
each frame's own last vision token (the frame's "last token"), and ranking is done within the frame. The
ranking needs one extra query and the frame's keys at the ranking layer; those FLOPs are not added to the
shared counter (about one layer's k-projection for the chunk, per ranking layer).
"""

from __future__ import annotations

import torch

from streamvlm.parts import DecoderParts
from streamvlm.probe import attention_probs, layer_keys
from streamvlm.routers.base import RouteDecision, Router
from streamvlm.routers.mod import decision_from_kept, select_per_frame
from streamvlm.types import Chunk


def frame_attention_ranking(parts: DecoderParts, layer: int, hidden: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """(F, T): head-averaged attention each vision token of a frame receives from the frame's last vision
    token at `layer`, computed with that layer's own norm, projections and RoPE on its input `hidden`."""
    vision = chunk.vision_index  # (F, T)
    frames = hidden[vision]  # (F, T, d)
    ids = chunk.rope_ids(vision)  # (F, T), or (3, F, T) with M-RoPE
    keys = layer_keys(parts, layer, frames, ids)  # (F, KV, T, hd)
    return attention_probs(parts, layer, frames[:, -1:], ids[..., -1:], keys, mean_heads=True)[:, 0]


class BoundRouter(Router):
    """A router that needs the decoder's weights; StreamVLM calls `bind` when it attaches the router."""

    parts: DecoderParts | None = None

    def bind(self, parts: DecoderParts) -> None:
        self.parts = parts

    def _ranking(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        if self.parts is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to a model; use StreamVLM.from_pretrained")
        return frame_attention_ranking(self.parts, layer, hidden, chunk)


class NestedRankRouter(BoundRouter):
    """Keeps a shrinking, nested set of each frame's tokens: where `_target` asks for fewer, the tokens still
    kept are ranked by the attention they receive at that layer (from the frame's last token) and the top
    ones stay. The first layer with a target starts routing; later layers reuse the set."""

    def _target(self, layer: int, current: int, tokens: int) -> int | None:
        raise NotImplementedError

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        if chunk.num_frames == 0:
            return None
        vision = chunk.vision_index
        if layer == 0:
            self._kept = torch.arange(vision.shape[1], device=vision.device).expand(vision.shape[0], -1)
        k = self._target(layer, self._kept.shape[1], vision.shape[1])
        if k is not None and k < self._kept.shape[1]:
            ranking = self._ranking(layer, hidden, chunk).gather(1, self._kept)  # among those still kept
            self._kept = self._kept.gather(1, select_per_frame(ranking, k))
        if self._kept.shape[1] == vision.shape[1]:
            return None
        return decision_from_kept(chunk, vision.gather(1, self._kept).flatten(), None)
