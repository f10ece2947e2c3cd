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
    """A layer's choice over one chunk.

    keep_index: (k,) int64, ascending indices into the chunk of the tokens this layer processes; every
        text token is in it (text is never routed). Tokens left out carry their hidden state unchanged
        to the next layer and write no K/V at this layer.
    weight: (k,) multiplier of the layer's update (attention + MLP) for each kept token, or None for 1.
    mlp_index: ascending chunk indices of the tokens that run the MLP, when they differ from keep_index
        (a token may run the MLP without attention, or attention without the MLP). Not with `weight`.
    parallel_index: chunk indices of kept tokens whose MLP reads the layer's input instead of the
        attention's output: x + SA(LN x) + FFN(LN x). Not with `weight`.
    window: when set (odd w), a vision token attends only to the layer's text entries before its frame and
        to the w x w neighbours on its own frame's token grid (causally); text attends as usual. The
        decoder computes only those scores, so the cost is linear in vision tokens. Needs every token kept.
    pruned_heads: (num_heads,) bool, True for heads that neither read nor update vision tokens here: text
        queries of those heads do not attend to vision entries, and vision tokens get no output from them.
    """

    keep_index: torch.Tensor
    weight: torch.Tensor | None = None
    mlp_index: torch.Tensor | None = None
    parallel_index: torch.Tensor | None = None
    window: int | None = None
    pruned_heads: torch.Tensor | None = None

    @property
    def splits_the_block(self) -> bool:
        return self.mlp_index is not None or self.parallel_index is not None


class Router(nn.Module):
    """Base class. `decide` returns None when a layer processes every token of the chunk with weight 1,
    which lets the decoder skip the gather/scatter entirely."""

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        raise NotImplementedError

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
