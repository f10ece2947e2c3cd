"""layer_drop (YOPO's selective layer dropping, VTW): vision tokens skip every layer from LAYER on and leave
no K/V there; text still runs every layer (and, from LAYER on, reads only earlier layers' vision tokens through
its own hidden state, as in VTW). `streamvlm calibrate vtw` chooses LAYER as VTW does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.routers.base import RouteDecision, Router
from streamvlm.routers.mod import decision_from_kept
from streamvlm.routers.policy import Arg, PerModel, Policy, numbers, spec_parts
from streamvlm.types import Chunk


@dataclass(frozen=True)
class LayerDropConfig:
    start_layer: int
    """Vision tokens skip every layer from this one on (0-based)."""
    policy: str = field(default="layer_drop", init=False)

    def __post_init__(self):
        if self.start_layer < 0:
            raise StreamVLMError(f"layer_drop needs a layer >= 0, got {self.start_layer}")

    def spec(self) -> str:
        return f"layer_drop:{self.start_layer}"


class LayerDropRouter(Router):
    def __init__(self, config: LayerDropConfig, num_layers: int):
        super().__init__()
        self.config = config
        self.num_layers = num_layers

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        if layer < self.config.start_layer or chunk.num_frames == 0:
            return None
        return decision_from_kept(chunk, chunk.vision_index[:0].flatten(), None)  # text only


GRAMMAR = "layer_drop:LAYER"


def parse(spec: str) -> LayerDropConfig:
    (layer,) = spec_parts(spec, GRAMMAR, most=1, least=1)
    with numbers(spec):
        return LayerDropConfig(int(layer))


HALF_DEPTH = PerModel("layer_drop:<half the depth>", lambda sample: f"layer_drop:{sample.num_layers // 2}")

POLICY = Policy(
    name="layer_drop", grammar=GRAMMAR, config=LayerDropConfig, parse=parse,
    summary="vision tokens skip every layer from LAYER on and leave no K/V there (YOPO, VTW; "
            "`streamvlm calibrate vtw` picks LAYER)",
    args=(Arg("LAYER", "the first layer (0-based) vision tokens skip"),),
    build=lambda config, num_layers, hidden_size: LayerDropRouter(config, num_layers),
    example="layer_drop:1", default=HALF_DEPTH, quality=(HALF_DEPTH,))
