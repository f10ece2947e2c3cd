"""schedule (G-Search / P-Sigmoid, arXiv 2412.00556): a per-layer keep ratio, non-increasing with depth; layer l
keeps the top r_l of the tokens layer l-1 kept, ranked by the attention they received at layer l-1 (the
previous layer's attention, as the paper ranks). The first layer is never pruned: the paper found rankings at
layer 0 disagree with every later layer's, so r_0 = 1. `streamvlm calibrate schedule` searches a schedule
(greedy, or a sigmoid by Bayesian optimisation), and `sigmoid_schedule` is P-Sigmoid's shape.

"From the prompt", in a stream: the paper ranks by the attention the text prompt pays to the image tokens, a
prompt that in LLaVA follows the image. In a stream every frame arrives before the question that will be asked
about it, and the text before a frame (system prompt, earlier turns) cannot attend to it in a causal model. So
the query is the frame's own last vision token, the one token at ingest that sees the whole frame, as FastV's and
PyramidDrop's rankings here do (routers/ranking.py). It does not depend on how frames are chunked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.routers.base import RouteDecision
from streamvlm.routers.config import tokens_kept
from streamvlm.routers.policy import Arg, PerModel, Policy, numbers, spec_parts
from streamvlm.routers.ranking import NestedRankRouter, frame_attention_ranking
from streamvlm.types import Chunk


@dataclass(frozen=True)
class ScheduleConfig:
    keep: tuple[float, ...]
    """Keep ratio of each frame's tokens at every layer, non-increasing with depth (G-Search's
    observation: rankings agree across layers, so keep rates can only fall)."""
    policy: str = field(default="schedule", init=False)

    def __post_init__(self):
        keep = tuple(float(r) for r in self.keep)
        object.__setattr__(self, "keep", keep)
        if not keep or any(not 0.0 < r <= 1.0 for r in keep):
            raise StreamVLMError(f"schedule keep ratios must be in (0, 1], got {list(keep)}")
        if any(b > a + 1e-12 for a, b in zip(keep, keep[1:])):
            raise StreamVLMError(f"schedule keep ratios must not increase with depth, got {list(keep)}")
        if keep[0] < 1.0:
            raise StreamVLMError(f"schedule keeps the first layer dense (G-Search: its ranking disagrees with every "
                                 f"later layer's), so R0 must be 1, got {keep[0]:g}")

    def spec(self) -> str:
        return "schedule:" + ",".join(f"{r:.4g}" for r in self.keep)


class ScheduleRouter(NestedRankRouter):
    """A per-layer keep schedule (from G-Search or P-Sigmoid): at layer l >= 1 keep ceil(r_l * T) of each frame,
    a subset of what layer l-1 kept, ranked by the attention each received at layer l-1 (from the frame's last
    token, computed with layer l-1's weights on layer l-1's input)."""

    def __init__(self, config: ScheduleConfig, num_layers: int):
        super().__init__()
        if len(config.keep) != num_layers:
            raise StreamVLMError(f"the schedule lists {len(config.keep)} layers but the model has {num_layers}")
        self.config = config
        self._previous: torch.Tensor | None = None  # (n, d) the input of the layer before, for this chunk

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        decision = super().decide(layer, hidden, chunk)
        self._previous = hidden
        return decision

    def _target(self, layer: int, current: int, tokens: int) -> int | None:
        if layer == 0:
            return None  # the first layer is excluded
        return min(current, tokens_kept(self.config.keep[layer], tokens))

    def _ranking(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        if self.parts is None:
            raise RuntimeError("ScheduleRouter is not bound to a model; use StreamVLM.from_pretrained")
        return frame_attention_ranking(self.parts, layer - 1, self._previous, chunk)


def sigmoid_schedule(layers: int, steepness: float, midpoint: float, floor: float) -> list[float]:
    """P-Sigmoid: r(l) = floor + (1 - floor) / (1 + exp(steepness * (l - midpoint))) for l >= 1, non-increasing;
    r(0) = 1 (the first layer is not pruned)."""
    return [1.0] + [floor + (1 - floor) / (1 + math.exp(min(60.0, steepness * (layer - midpoint))))
                    for layer in range(1, layers)]


GRAMMAR = "schedule:R0,R1,..."


def parse(spec: str) -> ScheduleConfig:
    (ratios,) = spec_parts(spec, "schedule:R0,R1,... (one ratio per layer)", most=1, least=1)
    with numbers(spec):
        return ScheduleConfig(keep=tuple(float(r) for r in ratios.split(",")))


def _sigmoid_default(sample) -> str:
    layers = sample.num_layers
    return ScheduleConfig(keep=tuple(sigmoid_schedule(layers, 1.0, layers / 2, 0.25))).spec()


POLICY = Policy(
    name="schedule", grammar=GRAMMAR, config=ScheduleConfig, parse=parse,
    summary="keep R_l of each frame at layer l, a nested subset of layer l-1's, ranked by the attention received "
            "at layer l-1 (G-Search / P-Sigmoid; `streamvlm calibrate schedule` searches one)",
    args=(Arg("R0,R1,...", "one keep ratio per decoder layer, non-increasing with depth; R0 = 1 (the first layer "
                           "is not pruned)"),),
    build=lambda config, num_layers, hidden_size: ScheduleRouter(config, num_layers),
    example="schedule:1,0.5,0.5,0.25",
    default=PerModel("schedule:<P-Sigmoid falling to 0.25 at mid-depth>", _sigmoid_default))
