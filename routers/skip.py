"""skip (Skipping Computations in Multimodal LLMs, arXiv 2410.09454): on layers START, START+INTERVAL, ...
< END, vision tokens skip the whole block, only attention (no K/V there), only the MLP, or run attention and
MLP in parallel on the same normed input (x + SA(LN x) + FFN(LN x)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.routers.base import RouteDecision, Router, VisionSkip
from streamvlm.routers.policy import Arg, Policy, numbers, spec_parts
from streamvlm.types import Chunk

SKIP_MODES = ("block", "attn", "mlp", "parallel")


@dataclass(frozen=True)
class SkipConfig:
    mode: str = "block"
    """block | attn | mlp | parallel: what vision tokens skip (or run in parallel) on the chosen layers."""
    start: int | None = None
    """First chosen layer; default half the depth."""
    end: int | None = None
    """Layers up to (not including) this one; default the last layer + 1."""
    interval: int = 1
    """Every interval-th layer from start."""
    policy: str = field(default="skip", init=False)

    def __post_init__(self):
        if self.mode not in SKIP_MODES:
            raise StreamVLMError(f"skip mode must be one of {', '.join(SKIP_MODES)}, got {self.mode!r}")
        if self.interval < 1 or (self.start is not None and self.start < 0):
            raise StreamVLMError("skip needs start >= 0 and interval >= 1")

    def spec(self) -> str:
        values = [self.start, self.end, self.interval if self.interval != 1 else None]
        while values and values[-1] is None:
            values.pop()
        return ":".join(["skip", self.mode, *("" if v is None else str(v) for v in values)])


class SkipRouter(Router):
    def __init__(self, config: SkipConfig, num_layers: int):
        super().__init__()
        start = num_layers // 2 if config.start is None else config.start
        end = num_layers if config.end is None else config.end
        if not 0 <= start <= end <= num_layers:
            raise StreamVLMError(f"skip layers [{start}, {end}) do not fit a {num_layers}-layer model")
        self.config = config
        self.layers = set(range(start, end, config.interval))

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        if self.config.mode != "block" or layer not in self.layers or chunk.num_frames == 0:
            return None  # attn, mlp, parallel: every token, through the `variant` block
        return RouteDecision(torch.nonzero(chunk.text_mask).squeeze(1))  # vision skips the whole block

    def variant(self, layer: int) -> VisionSkip | None:
        if self.config.mode == "block" or layer not in self.layers:
            return None
        return VisionSkip(self.config.mode)


GRAMMAR = "skip:MODE[:START[:END[:INTERVAL]]]"


def parse(spec: str) -> SkipConfig:
    args = spec_parts(spec, GRAMMAR, most=4, least=1)
    with numbers(spec):
        values = [int(v) if v else None for v in args[1:]] + [None, None, None]
    return SkipConfig(mode=args[0], start=values[0], end=values[1], interval=values[2] or 1)


POLICY = Policy(
    name="skip", grammar=GRAMMAR, config=SkipConfig, parse=parse,
    summary="on the chosen layers vision tokens skip the block, attention or the MLP, or run both in "
            "parallel (Skipping Computations, arXiv 2410.09454)",
    args=(Arg("MODE", "block | attn | mlp | parallel"),
          Arg("START", "the first chosen layer (default half the depth; empty for the default)"),
          Arg("END", "chosen layers stop before this one (default after the last layer)"),
          Arg("INTERVAL", "every INTERVAL-th layer from START", "1")),
    build=lambda config, num_layers, hidden_size: SkipRouter(config, num_layers),
    example="skip:parallel:0:4:2", default="skip:attn")
