"""fastv (FastV): at layer K, rank each frame's vision tokens by the attention they receive at layer K-1 (from
the frame's last token, see ranking.py) and keep the top (1 - R) for every later layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.routers.base import RouteDecision
from streamvlm.routers.config import tokens_kept
from streamvlm.routers.mod import decision_from_kept, select_per_frame
from streamvlm.routers.policy import Arg, Policy, numbers, spec_parts
from streamvlm.routers.ranking import BoundRouter
from streamvlm.types import Chunk


@dataclass(frozen=True)
class FastVConfig:
    layer: int = 2
    """K: pruning starts at this layer, ranked by attention at layer K - 1 (FastV's default 2)."""
    drop_ratio: float = 0.5
    """R: fraction of each frame's vision tokens dropped (FastV's default 50%)."""
    policy: str = field(default="fastv", init=False)

    def __post_init__(self):
        if self.layer < 1:
            raise StreamVLMError(f"fastv ranks at layer K-1, so K must be >= 1, got {self.layer}")
        if not 0.0 <= self.drop_ratio < 1.0:
            raise StreamVLMError(f"fastv drop ratio must be in [0, 1), got {self.drop_ratio}")

    def spec(self) -> str:
        return f"fastv:{self.layer}:{self.drop_ratio:g}"


class FastVRouter(BoundRouter):
    def __init__(self, config: FastVConfig, num_layers: int):
        super().__init__()
        if config.layer >= num_layers:
            raise StreamVLMError(f"fastv layer {config.layer} is past the model's {num_layers} layers")
        self.config = config
        self._kept: torch.Tensor | None = None  # (F * k,) chunk indices chosen at layer K, for this chunk

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        if chunk.num_frames == 0 or self.config.drop_ratio == 0.0:
            return None
        vision = chunk.vision_index
        if layer == self.config.layer - 1:
            k = tokens_kept(1.0 - self.config.drop_ratio, vision.shape[1])
            order = select_per_frame(self._ranking(layer, hidden, chunk), k)
            self._kept = vision.gather(1, order).flatten()
        if layer < self.config.layer:
            return None
        return decision_from_kept(chunk, self._kept, None)


GRAMMAR = "fastv[:K[:R]]"


def parse(spec: str) -> FastVConfig:
    args = spec_parts(spec, GRAMMAR, most=2)
    with numbers(spec):
        layer = int(args[0]) if len(args) > 0 else 2
        drop = float(args[1]) if len(args) > 1 else 0.5
    return FastVConfig(layer=layer, drop_ratio=drop)


POLICY = Policy(
    name="fastv", grammar=GRAMMAR, config=FastVConfig, parse=parse,
    summary="from layer K keep the (1 - R) of each frame's tokens most attended at layer K-1 (FastV)",
    args=(Arg("K", "the first pruned layer; ranking uses layer K-1", "2"),
          Arg("R", "the fraction of each frame's vision tokens dropped", "0.5")),
    build=lambda config, num_layers, hidden_size: FastVRouter(config, num_layers),
    example="fastv:3:0.25", default="fastv:2:0.5", quality=("fastv",))
