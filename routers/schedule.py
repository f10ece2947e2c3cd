"""schedule (G-Search / P-Sigmoid): a per-layer keep ratio, non-increasing with depth, nested and ranked by
attention received; `streamvlm calibrate schedule` searches one (greedy or a sigmoid), and `sigmoid_schedule`
is P-Sigmoid's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from streamvlm.errors import StreamVLMError
from streamvlm.routers.config import tokens_kept
from streamvlm.routers.policy import Arg, PerModel, Policy, numbers, spec_parts
from streamvlm.routers.ranking import NestedRankRouter


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

    def spec(self) -> str:
        return "schedule:" + ",".join(f"{r:.4g}" for r in self.keep)


class ScheduleRouter(NestedRankRouter):
    """A per-layer keep schedule (from G-Search or P-Sigmoid): at layer l keep ceil(r_l * T) of each frame,
    a subset of what layer l-1 kept, ranked by attention received."""

    def __init__(self, config: ScheduleConfig, num_layers: int):
        super().__init__()
        if len(config.keep) != num_layers:
            raise StreamVLMError(f"the schedule lists {len(config.keep)} layers but the model has {num_layers}")
        self.config = config

    def _target(self, layer: int, current: int, tokens: int) -> int | None:
        return min(current, tokens_kept(self.config.keep[layer], tokens))


def sigmoid_schedule(layers: int, steepness: float, midpoint: float, floor: float) -> list[float]:
    """P-Sigmoid: r(l) = floor + (1 - floor) / (1 + exp(steepness * (l - midpoint))), non-increasing."""
    return [floor + (1 - floor) / (1 + math.exp(min(60.0, steepness * (layer - midpoint))))
            for layer in range(layers)]


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
    summary="keep R_l of each frame at layer l, a nested subset of layer l-1's, ranked by attention "
            "(G-Search / P-Sigmoid; `streamvlm calibrate schedule` searches one)",
    args=(Arg("R0,R1,...", "one keep ratio per decoder layer, non-increasing with depth"),),
    build=lambda config, num_layers, hidden_size: ScheduleRouter(config, num_layers),
    example="schedule:1,0.5,0.5,0.25",
    default=PerModel("schedule:<P-Sigmoid falling to 0.25 at mid-depth>", _sigmoid_default))
