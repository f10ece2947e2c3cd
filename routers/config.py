"""RoutingConfig: the config of the keep-ratio policies (dense, mod, random, uniform): which layers route,
keeping how much of each frame.

Their specs (the command line and `StreamVLM.from_pretrained(routing=...)` take the same strings):

    dense                        every token through every layer
    mod:KEEP                     learned MoD router, KEEP of each frame's tokens at every layer
    mod:KEEP:SCHEDULE            SCHEDULE: all | interleaved | deep | cosine
    mod:KEEP:SCHEDULE:N          ... with the first N layers left dense
    mod:R0,R1,...,RL-1           explicit keep ratio per layer (1 = dense layer)
    random:KEEP[...], uniform:KEEP[...]   the same forms for the no-intelligence baselines

Every other policy has a config of its own; `streamvlm.routers.parse_routing` parses any registered one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from streamvlm.errors import StreamVLMError
from streamvlm.routers.policy import Arg

SCHEDULES = ("all", "interleaved", "deep", "cosine", "explicit")
POLICIES = ("dense", "mod", "random", "uniform")
"""The policies whose config is a RoutingConfig (each is registered by its own file: dense.py, mod.py,
baselines.py)."""


def keep_grammar(policy: str) -> str:
    """The spec form of mod, random and uniform."""
    return f"{policy}:KEEP[:SCHEDULE[:DENSE_LAYERS]] | {policy}:R0,R1,..."


KEEP_ARGS = (
    Arg("KEEP", "the fraction of each frame's vision tokens a routed layer processes (for cosine, the floor); "
                "or R0,R1,...: a keep ratio per layer, 1 for a dense layer"),
    Arg("SCHEDULE", "the routed layers: all | interleaved (odd layers) | deep (from DENSE_LAYERS, by default "
                    "half the depth) | cosine (p-MoD's decay)", "all"),
    Arg("DENSE_LAYERS", "the first DENSE_LAYERS layers stay dense", "0"),
)
"""The arguments of keep_grammar."""


@dataclass(frozen=True)
class RoutingConfig:
    """How vision tokens are routed through the decoder layers."""

    policy: str = "dense"
    """"dense" (no routing), "mod" (learned Mixture-of-Depths router), or the same-budget baselines
    "random" (random tokens per frame and layer) and "uniform" (evenly spaced tokens per frame)."""
    keep_ratio: float = 1.0
    """Fraction of each frame's vision tokens a routed layer processes: k = ceil(keep_ratio * tokens).
    For the cosine schedule it is the floor the decay stops at (p-MoD uses 0.15)."""
    schedule: str = "all"
    """Routed layers: "all" (every layer), "interleaved" (odd layers: 1, 3, 5, ...), "deep" (from
    dense_layers on; default half the depth), "cosine" (p-MoD: keep cos(pi*l/L)/2 + 0.5, floored at
    keep_ratio), "explicit" (layer_keep)."""
    dense_layers: int = 0
    """The first dense_layers layers are never routed (for "deep": where routing starts)."""
    layer_keep: tuple[float, ...] = field(default_factory=tuple)
    """For "explicit": a keep ratio per decoder layer, 1.0 for a dense layer."""
    weight_scale: float = 0.2
    """a in the update weight 1 + a * tanh(score) of a kept token (p-MoD's 0.2)."""

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise StreamVLMError(f"unknown routing policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise StreamVLMError(f"keep ratio must be in (0, 1], got {self.keep_ratio}")
        if self.schedule not in SCHEDULES:
            raise StreamVLMError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.dense_layers < 0:
            raise StreamVLMError(f"dense_layers must be >= 0, got {self.dense_layers}")
        if self.schedule == "explicit":
            if not self.layer_keep:
                raise StreamVLMError("the explicit schedule needs layer_keep, one ratio per layer")
            if any(not 0.0 < r <= 1.0 for r in self.layer_keep):
                raise StreamVLMError(f"every layer_keep ratio must be in (0, 1], got {list(self.layer_keep)}")
        elif self.layer_keep:
            raise StreamVLMError("layer_keep is only used with schedule='explicit'")
        if self.weight_scale < 0:
            raise StreamVLMError(f"weight_scale must be >= 0, got {self.weight_scale}")
        object.__setattr__(self, "layer_keep", tuple(float(r) for r in self.layer_keep))

    @classmethod
    def parse(cls, spec: str) -> RoutingConfig:
        """Parse the command-line form (see the module docstring)."""
        parts = spec.strip().split(":")
        policy = parts[0]
        if policy == "dense":
            if len(parts) > 1:
                raise StreamVLMError(f"'dense' takes no arguments, got {spec!r}")
            return cls()
        if policy not in POLICIES:
            raise StreamVLMError(f"RoutingConfig parses specs of {', '.join(POLICIES)}, not {spec!r}; "
                                 "streamvlm.routers.parse_routing parses every registered policy")
        if len(parts) < 2 or len(parts) > 4:
            raise StreamVLMError(f"routing {spec!r}: expected {policy}:KEEP[:SCHEDULE[:DENSE_LAYERS]]")
        try:
            if "," in parts[1]:
                if len(parts) > 2:
                    raise StreamVLMError(f"routing {spec!r}: an explicit per-layer list takes no schedule")
                return cls(policy=policy, schedule="explicit", layer_keep=tuple(float(r) for r in parts[1].split(",")))
            keep = float(parts[1])
            schedule = parts[2] if len(parts) > 2 else "all"
            dense_layers = int(parts[3]) if len(parts) > 3 else 0
        except ValueError:
            raise StreamVLMError(f"routing {spec!r}: KEEP must be a number and DENSE_LAYERS an integer") from None
        return cls(policy=policy, keep_ratio=keep, schedule=schedule, dense_layers=dense_layers)

    def spec(self) -> str:
        """The command-line form of this config."""
        if self.policy == "dense":
            return "dense"
        if self.schedule == "explicit":
            return f"{self.policy}:" + ",".join(f"{r:g}" for r in self.layer_keep)
        tail = f":{self.dense_layers}" if self.dense_layers else ""
        return f"{self.policy}:{self.keep_ratio:g}:{self.schedule}{tail}"

    def layer_keep_ratios(self, num_layers: int) -> list[float | None]:
        """Keep ratio of each decoder layer, None for a layer that is not routed."""
        if self.policy == "dense":
            return [None] * num_layers
        if self.schedule == "explicit":
            if len(self.layer_keep) != num_layers:
                raise StreamVLMError(
                    f"the explicit schedule lists {len(self.layer_keep)} layers but the model has {num_layers}")
            return [None if r >= 1.0 else r for r in self.layer_keep]
        start = self.dense_layers
        if self.schedule == "deep" and not start:
            start = num_layers // 2
        if start >= num_layers:
            raise StreamVLMError(f"dense_layers={start} leaves no layer to route in a {num_layers}-layer model")
        ratios: list[float | None] = []
        for layer in range(num_layers):
            if layer < start or (self.schedule == "interleaved" and layer % 2 == 0):
                ratios.append(None)
            elif self.schedule == "cosine":
                ratios.append(max(self.keep_ratio, 0.5 * math.cos(math.pi * layer / num_layers) + 0.5))
            else:
                ratios.append(self.keep_ratio)
        return ratios

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_keep"] = list(self.layer_keep)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RoutingConfig:
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise StreamVLMError(f"routing config has unknown keys: {', '.join(sorted(unknown))}")
        return cls(**{**d, "layer_keep": tuple(d.get("layer_keep", ()))})


def tokens_kept(ratio: float, tokens_per_frame: int) -> int:
    """k = ceil(ratio * tokens), robust to float error (0.3 * 10 must give 3, not 4)."""
    return max(1, min(tokens_per_frame, math.ceil(ratio * tokens_per_frame - 1e-9)))
