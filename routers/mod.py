"""The learned Mixture-of-Depths router (VideoLLM-MoD, p-MoD).

One zero-initialised linear scorer per routed layer reads each vision token's hidden state. Within each
frame the k = ceil(keep_ratio * tokens_per_frame) best-scoring tokens go through the layer; their update
is scaled by 1 + a * tanh(score), so gradients reach the scorer through the kept tokens' outputs, and
an untrained router (score 0, weight 1) at keep ratio 1.0 is exactly the dense model. Top-k is taken
per frame, so a frame's decision never depends on later frames: streaming needs no look-ahead.

Ties (every score equal, as in an untrained router) go to the earlier token: the sort is stable.
"""

from __future__ import annotations

import torch
from torch import nn

from streamvlm.routers.base import RouteDecision, Router
from streamvlm.routers.config import KEEP_ARGS, RoutingConfig, keep_grammar, tokens_kept
from streamvlm.routers.policy import ModelSample, PerModel, Policy
from streamvlm.types import Chunk


def select_per_frame(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (F, T) -> (F, k) positions of the k highest per row, ascending within each row."""
    top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return top.sort(dim=-1).values


def decision_from_kept(chunk: Chunk, kept: torch.Tensor, kept_weight: torch.Tensor | None) -> RouteDecision:
    """kept: (m,) chunk indices of kept vision tokens, kept_weight (m,) or None -> a RouteDecision that also
    keeps every text token (weight 1), indices ascending."""
    mask = chunk.text_mask.clone()
    mask[kept] = True
    keep_index = mask.nonzero().squeeze(1)
    if kept_weight is None:
        return RouteDecision(keep_index)
    full = torch.ones(len(chunk), dtype=kept_weight.dtype, device=kept_weight.device)
    full = full.index_put((kept,), kept_weight)  # out of place: gradients flow to the scorer
    return RouteDecision(keep_index, full[keep_index])


class MoDRouter(Router):
    def __init__(self, config: RoutingConfig, num_layers: int, hidden_size: int):
        super().__init__()
        if config.policy != "mod":
            raise ValueError(f"MoDRouter needs policy 'mod', got {config.policy!r}")
        self.config = config
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.layer_keep = config.layer_keep_ratios(num_layers)
        self.scorers = nn.ModuleDict({
            str(layer): nn.Linear(hidden_size, 1) for layer, r in enumerate(self.layer_keep) if r is not None
        })
        for scorer in self.scorers.values():
            nn.init.zeros_(scorer.weight)
            nn.init.zeros_(scorer.bias)
        self.recorded: dict[int, torch.Tensor] = {}
        """In training mode, each routed layer's (num_frames, tokens_per_frame) scores of the last chunk,
        for auxiliary losses on the router's ranking."""

    def scores(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        """(num_frames, tokens_per_frame) router logits of the chunk's vision tokens at `layer`."""
        scorer = self.scorers[str(layer)]
        vision = chunk.vision_index
        return scorer(hidden[vision].to(scorer.weight.dtype)).squeeze(-1)

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        ratio = self.layer_keep[layer]
        if ratio is None or chunk.num_frames == 0:
            return None
        vision = chunk.vision_index  # (F, T)
        scores = self.scores(layer, hidden, chunk)
        if self.training:
            self.recorded[layer] = scores
        k = tokens_kept(ratio, vision.shape[1])
        if k < vision.shape[1]:
            order = select_per_frame(scores.detach(), k)
            vision, scores = vision.gather(1, order), scores.gather(1, order)
        weight = 1.0 + self.config.weight_scale * torch.tanh(scores)
        return decision_from_kept(chunk, vision.flatten(), weight.flatten().to(hidden.dtype))


DEFAULT_KEEP = 0.2
"""VideoLLM-MoD's keep ratio, what compare runs."""


def default_spec(sample: ModelSample, policy: str) -> str:
    """compare's default for mod, random and uniform: keep 0.2 on the layers of the checkpoint's shipped router
    when it has one (its trained weights then serve mod, and the baselines spend the same budget), else on the
    odd layers (VideoLLM-MoD's interleaved). "mod:KEEP" resolves to the shipped router where there is one; a
    fresh router is zero-initialised, so weights tell which it is."""
    router = sample.vlm.with_routing(f"mod:{DEFAULT_KEEP}").router
    trained = any(bool(p.detach().ne(0).any()) for p in router.parameters())
    spec = router.config.spec() if trained else f"mod:{DEFAULT_KEEP}:interleaved"
    return spec.replace("mod:", f"{policy}:", 1)


POLICY = Policy(
    name="mod", grammar=keep_grammar("mod"), config=RoutingConfig, parse=RoutingConfig.parse, args=KEEP_ARGS,
    summary="learned Mixture-of-Depths: each routed layer keeps the top KEEP of each frame by a trained scorer "
            "(VideoLLM-MoD, p-MoD; the checkpoint's own router/ when it ships one, else a fresh one)",
    build=MoDRouter, trainable=True,
    example="mod:0.3:interleaved:1", default=PerModel("mod:0.2:interleaved (on a checkpoint that ships a router: mod:0.2 "
                                                       "on that router's layers)", lambda s: default_spec(s, "mod")),
    quality=("mod:0.5", "mod:0.2"))
