"""neighbor_attention (YOPO): vision tokens attend to the earlier text and to a w x w window of their own
frame's token grid; text attends to everything. The decoder computes only those scores (WindowAttention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.routers.base import RouteDecision, Router, WindowAttention
from streamvlm.routers.policy import Arg, Policy, numbers, spec_parts
from streamvlm.types import Chunk


@dataclass(frozen=True)
class NeighborConfig:
    window: int = 5
    """w: a vision token attends to the w x w neighbours on its frame's grid (YOPO's default 5)."""
    start_layer: int = 0
    """Layers before this one keep full attention."""
    policy: str = field(default="neighbor_attention", init=False)

    def __post_init__(self):
        if self.window < 1 or self.window % 2 == 0:
            raise StreamVLMError(f"neighbor_attention needs an odd window >= 1, got {self.window}")
        if self.start_layer < 0:
            raise StreamVLMError("neighbor_attention start layer must be >= 0")

    def spec(self) -> str:
        return f"neighbor_attention:{self.window}" + (f":{self.start_layer}" if self.start_layer else "")


class NeighborRouter(Router):
    """YOPO's neighbour-aware vision attention: vision-to-vision attention only inside a w x w window of
    the token's own frame (causal), vision still reads the earlier text, text reads everything."""

    def __init__(self, config: NeighborConfig, num_layers: int):
        super().__init__()
        if config.start_layer >= num_layers:
            raise StreamVLMError(f"neighbor_attention start layer {config.start_layer} is past the model's layers")
        self.config = config

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        return None  # every token, through the window attention `variant` gives from start_layer on

    def variant(self, layer: int) -> WindowAttention | None:
        return WindowAttention(self.config.window) if layer >= self.config.start_layer else None


GRAMMAR = "neighbor_attention[:W[:START]]"


def parse(spec: str) -> NeighborConfig:
    args = spec_parts(spec, GRAMMAR, most=2)
    with numbers(spec):
        return NeighborConfig(window=int(args[0]) if len(args) > 0 else 5,
                              start_layer=int(args[1]) if len(args) > 1 else 0)


POLICY = Policy(
    name="neighbor_attention", grammar=GRAMMAR, config=NeighborConfig, parse=parse,
    summary="vision tokens attend to earlier text and a W x W window of their own frame (YOPO)",
    args=(Arg("W", "the window's side in tokens, odd", "5"),
          Arg("START", "layers before this one keep full attention", "0")),
    build=lambda config, num_layers, hidden_size: NeighborRouter(config, num_layers),
    example="neighbor_attention:3:1", default="neighbor_attention:5")
