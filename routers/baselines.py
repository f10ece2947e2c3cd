"""Baselines at the same budget as a learned router, with no intelligence (`random`, `uniform`).

random: at each routed layer, k tokens of each frame drawn at random: each token gets a pseudo-random key
    hashed from (seed, frame, layer, token) and the k smallest keys win, so the choice is reproducible,
    does not depend on how frames were chunked, and is computed for all frames at once.
uniform: k tokens spread evenly over each frame's row-major token order, the same at every layer.
Kept tokens' updates are not scaled (weight 1).
"""

from __future__ import annotations

import torch

from streamvlm.routers.base import RouteDecision, Router
from streamvlm.routers.config import KEEP_ARGS, RoutingConfig, keep_grammar, tokens_kept
from streamvlm.routers.mod import decision_from_kept, default_spec
from streamvlm.routers.policy import PerModel, Policy
from streamvlm.types import Chunk


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer hash step (splitmix64's finaliser), kept in the non-negative int64 range."""
    x = (x ^ (x >> 31)) * 0x5851F42D4C957F2D & 0x7FFFFFFFFFFFFFFF
    x = (x ^ (x >> 29)) * 0x14057B7EF767814F & 0x7FFFFFFFFFFFFFFF
    return x ^ (x >> 32)


class BaselineRouter(Router):
    def __init__(self, config: RoutingConfig, num_layers: int, seed: int = 0):
        super().__init__()
        if config.policy not in ("random", "uniform"):
            raise ValueError(f"BaselineRouter takes policy random or uniform, got {config.policy!r}")
        self.config = config
        self.seed = seed
        self.layer_keep = config.layer_keep_ratios(num_layers)

    def _order(self, layer: int, chunk: Chunk, k: int) -> torch.Tensor:
        """(F, k) ascending positions within each frame to keep."""
        frames, tokens = chunk.vision_index.shape
        device = chunk.vision_index.device
        if self.config.policy == "uniform":
            return (torch.arange(k, device=device) * tokens // k).expand(frames, k)
        frame_ids = chunk.frames[chunk.vision_index[:, 0]].to(torch.int64)[:, None]  # (F, 1)
        token_ids = torch.arange(tokens, device=device, dtype=torch.int64)[None, :]  # (1, T)
        keys = _mix(_mix(_mix(torch.full_like(frame_ids, self.seed) + frame_ids) + layer) + token_ids)
        return keys.argsort(dim=-1)[:, :k].sort(dim=-1).values

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        ratio = self.layer_keep[layer]
        if ratio is None or chunk.num_frames == 0:
            return None
        vision = chunk.vision_index
        k = tokens_kept(ratio, vision.shape[1])
        if k >= vision.shape[1]:
            return None
        return decision_from_kept(chunk, vision.gather(1, self._order(layer, chunk, k)).flatten(), None)


RANDOM = Policy(
    name="random", grammar=keep_grammar("random"), config=RoutingConfig, parse=RoutingConfig.parse,
    args=KEEP_ARGS, summary="mod's budget, KEEP of each frame drawn at random per layer (a baseline)",
    build=lambda config, num_layers, hidden_size: BaselineRouter(config, num_layers),
    example="random:0.3:interleaved:1", quality=("random:0.2",),
    default=PerModel("random:0.2 on the layers mod's default routes", lambda s: default_spec(s, "random")))

UNIFORM = Policy(
    name="uniform", grammar=keep_grammar("uniform"), config=RoutingConfig, parse=RoutingConfig.parse,
    args=KEEP_ARGS, summary="mod's budget, KEEP of each frame spread evenly over its tokens (a baseline)",
    build=lambda config, num_layers, hidden_size: BaselineRouter(config, num_layers),
    example="uniform:0.3:interleaved:1", quality=("uniform:0.2",),
    default=PerModel("uniform:0.2 on the layers mod's default routes", lambda s: default_spec(s, "uniform")))
