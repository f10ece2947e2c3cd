"""pdrop (PyramidDrop): at each stage layer (default L/4, L/2, 3L/4), rank the tokens still kept by the
attention they receive at that layer and keep a fraction of them, down the pyramid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streamvlm.errors import StreamVLMError
from streamvlm.routers.config import tokens_kept
from streamvlm.routers.policy import Arg, Policy, numbers, spec_parts
from streamvlm.routers.ranking import NestedRankRouter


@dataclass(frozen=True)
class PDropConfig:
    keep: float = 0.5
    """Fraction of the remaining vision tokens each stage keeps (PyramidDrop's 0.5)."""
    stages: tuple[int, ...] = ()
    """Layers where a stage prunes; default L/4, L/2, 3L/4."""
    policy: str = field(default="pdrop", init=False)

    def __post_init__(self):
        if not 0.0 < self.keep <= 1.0:
            raise StreamVLMError(f"pdrop keep must be in (0, 1], got {self.keep}")
        object.__setattr__(self, "stages", tuple(int(s) for s in self.stages))

    def spec(self) -> str:
        stages = ":" + ",".join(map(str, self.stages)) if self.stages else ""
        return f"pdrop:{self.keep:g}{stages}"


class PDropRouter(NestedRankRouter):
    def __init__(self, config: PDropConfig, num_layers: int):
        super().__init__()
        stages = config.stages or tuple(num_layers * i // 4 for i in (1, 2, 3))
        if any(not 0 < s < num_layers for s in stages) or list(stages) != sorted(set(stages)):
            raise StreamVLMError(f"pdrop stages must be increasing layers in (0, {num_layers}), got {list(stages)}")
        self.config = config
        self.stages = stages

    def _target(self, layer: int, current: int, tokens: int) -> int | None:
        return tokens_kept(self.config.keep, current) if layer in self.stages else None


GRAMMAR = "pdrop[:KEEP[:S1,S2,...]]"


def parse(spec: str) -> PDropConfig:
    args = spec_parts(spec, GRAMMAR, most=2)
    with numbers(spec):
        keep = float(args[0]) if len(args) > 0 else 0.5
        stages = tuple(int(s) for s in args[1].split(",")) if len(args) > 1 else ()
    return PDropConfig(keep=keep, stages=stages)


POLICY = Policy(
    name="pdrop", grammar=GRAMMAR, config=PDropConfig, parse=parse,
    summary="at each stage layer keep KEEP of the tokens still kept, ranked by attention there (PyramidDrop)",
    args=(Arg("KEEP", "the fraction of the remaining vision tokens each stage keeps", "0.5"),
          Arg("S1,S2,...", "the stage layers, increasing (default L/4, L/2, 3L/4 of L layers)")),
    build=lambda config, num_layers, hidden_size: PDropRouter(config, num_layers),
    example="pdrop:0.25:1,3", default="pdrop:0.5")
