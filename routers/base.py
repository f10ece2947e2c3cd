"""The router seam: which vision tokens of a chunk each decoder layer processes.

Imports only torch and streamvlm core types, so the runtime can use routers without Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from streamvlm.routers.config import RoutingConfig
from streamvlm.types import Chunk


@dataclass(frozen=True)
class RouteDecision:
    """A layer's choice over one chunk: which tokens it processes, and how much of its update they take.

    keep_index: (k,) int64, ascending indices into the chunk of the tokens this layer processes; every
        text token is in it (text is never routed). Tokens left out carry their hidden state unchanged
        to the next layer and write no K/V at this layer.
    weight: (k,) multiplier of the layer's update (attention + MLP) for each kept token, or None for 1.

    How a layer computes (its attention or block variant) is not decided here, per chunk: a router fixes it
    per layer once, through `Router.variant`.
    """

    keep_index: torch.Tensor
    weight: torch.Tensor | None = None


@dataclass(frozen=True)
class WindowAttention:
    """A layer whose vision queries attend only to the layer's text entries before their frame and to the
    w x w neighbours on their own frame's token grid (causally); text attends as usual. Linear in vision
    tokens: the decoder scores only those pairs (YOPO's neighbour-aware attention)."""

    window: int
    """w, odd."""


@dataclass(frozen=True)
class PrunedHeads:
    """A layer whose pruned heads neither read nor update vision tokens: their text queries do not attend to
    vision entries, and vision tokens get no output from them (YOPO's inactive heads)."""

    heads: tuple[bool, ...]
    """Per query head, True where it is pruned."""


@dataclass(frozen=True)
class VisionSkip:
    """A layer where the chunk's vision tokens skip part of the block (Skipping Computations, seed 003):
    "attn": they skip attention (and write no K/V here) but run the MLP on their input; "mlp": they attend
    and skip the MLP; "parallel": they run attention and the MLP side by side, x + SA(LN x) + FFN(LN' x)."""

    part: str


@dataclass(frozen=True)
class YopoLayer:
    """YOPO's parts in one layer, for the layers before its layer drop (where vision tokens still run):
    neighbour-window attention for vision queries, inactive heads that neither read nor update vision
    tokens, and a sparse FFN for vision tokens. Text queries attend to every earlier entry through the active
    heads and to every earlier non-vision entry through the pruned ones, and run the whole MLP."""

    window: int | None
    """w, odd: vision queries see the earlier text and a w x w causal window of their frame; None: every
    earlier entry, as in the dense model."""
    heads: tuple[bool, ...] = ()
    """Per query head, True where it is pruned; () when none is."""
    ffn: float = 1.0
    """The fraction of the MLP's intermediate neurons (the first ones) vision tokens go through."""


LayerVariant = WindowAttention | PrunedHeads | VisionSkip | YopoLayer
"""What a layer runs instead of the standard block. The decoder keeps one straight path per variant."""


class Router(nn.Module):
    """Base class. `decide` returns None when a layer processes every token of the chunk with weight 1,
    which lets the decoder skip the gather/scatter entirely."""

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        raise NotImplementedError

    def variant(self, layer: int) -> LayerVariant | None:
        """The attention or block variant `layer` runs, asked once when a decoder takes the router (None: the
        standard block). A variant layer processes every token of each chunk: `decide` returns None there."""
        return None

    def spec(self) -> str:
        """The --routing string this router answers to (for stats and output records): its config's."""
        config = getattr(self, "config", None)
        return config.spec() if config is not None else type(self).__name__

    def question_evictions(self, cache, question_embeds: torch.Tensor,
                           question_rope_ids: torch.Tensor) -> torch.Tensor | None:
        """Called when a question is about to be fed, with its embeddings (m, d) and RoPE position ids as the
        decoder's rotary module takes them ((1, m), or (3, 1, m) with M-RoPE; see Chunk.rope_ids): return
        positions of cached vision entries to drop from every layer (question-aware KV selection), or None.
        The session does the dropping; the router only reads the cache."""
        return None

    def bind(self, parts) -> None:
        """Called once when a model takes the router, with its DecoderParts (for routers that rank tokens
        with the model's own attention weights). Most routers need nothing."""


class DenseRouter(Router):
    """Every token through every layer: the model as trained."""

    config = RoutingConfig()  # policy "dense": what save_router stores

    def spec(self) -> str:
        return "dense"

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        return None
