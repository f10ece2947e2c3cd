"""cls_knee (arXiv 2409.01162): keep each frame's tokens before the knee of its sorted similarity-to-the-
pooled-token curve, at every layer; optionally drop the cached vision entries the question attends to least.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.probe import attention_probs
from streamvlm.routers.base import RouteDecision
from streamvlm.routers.config import tokens_kept
from streamvlm.routers.mod import decision_from_kept
from streamvlm.routers.policy import Arg, Policy, numbers, spec_parts
from streamvlm.routers.ranking import BoundRouter
from streamvlm.types import VISION, Chunk


def knee_index(curve: torch.Tensor) -> int:
    """Index of the knee of a descending curve (Kneedle-style): the point farthest below the chord from
    its first to its last point, after scaling both axes to [0, 1]. Tokens before it are kept."""
    n = curve.numel()
    if n < 3:
        return n
    y = (curve - curve[-1]) / (curve[0] - curve[-1]).clamp_min(1e-12)
    x = torch.linspace(0, 1, n, device=curve.device)
    return int(((1 - x) - y).argmax())  # chord y = 1 - x; the knee sits farthest below it


@dataclass(frozen=True)
class ClsKneeConfig:
    min_keep: float = 0.05
    """Keep at least this fraction of each frame's tokens, whatever the knee says."""
    question_keep: float | None = None
    """Stage 2: at question time keep only this fraction of cached vision entries, the most attended by the
    question's tokens at the first layer (None: stage 2 off)."""
    policy: str = field(default="cls_knee", init=False)

    def __post_init__(self):
        if not 0.0 < self.min_keep <= 1.0:
            raise StreamVLMError(f"cls_knee min_keep must be in (0, 1], got {self.min_keep}")
        if self.question_keep is not None and not 0.0 < self.question_keep <= 1.0:
            raise StreamVLMError(f"cls_knee question keep must be in (0, 1], got {self.question_keep}")

    def spec(self) -> str:
        tail = f":{self.question_keep:g}" if self.question_keep is not None else ""
        return f"cls_knee:{self.min_keep:g}{tail}"


class ClsKneeRouter(BoundRouter):
    """The CLS-similarity method (arXiv 2409.01162) in a stream.

    Stage 1, per frame at ingest: cosine similarity of each of the frame's tokens (the projector's output)
    to the frame's pooled token (SigLIP has no CLS token: the mean token stands in); sorted, the curve is
    long-tailed; tokens before its knee are kept at every layer, an adaptive count per frame, the rest are
    dropped from every layer. Stage 2 (optional), at question time: cached vision entries the question's
    tokens attend to least at the first layer are dropped from the cache.
    """

    def __init__(self, config: ClsKneeConfig, num_layers: int):
        super().__init__()
        self.config = config
        self._kept: torch.Tensor | None = None

    def keep_per_frame(self, features: torch.Tensor) -> list[torch.Tensor]:
        """features (F, T, d) -> per frame, the ascending within-frame indices kept."""
        pooled = features.mean(dim=1, keepdim=True)
        sim = torch.nn.functional.cosine_similarity(features, pooled, dim=-1)  # (F, T)
        order = sim.argsort(dim=-1, descending=True)
        floor = tokens_kept(self.config.min_keep, features.shape[1])
        return [order[f, : max(floor, knee_index(sim[f, order[f]]))].sort().values for f in range(sim.shape[0])]

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        if chunk.num_frames == 0:
            return None
        vision = chunk.vision_index
        if layer == 0:
            kept = self.keep_per_frame(hidden[vision].float())
            self._kept = torch.cat([vision[f, k] for f, k in enumerate(kept)])
        return decision_from_kept(chunk, self._kept, None)

    def question_evictions(self, cache, question_embeds, question_rope_ids):
        keep = self.config.question_keep
        if keep is None or self.parts is None:
            return None
        vision = cache.kinds(0) == VISION
        if not bool(vision.any()):
            return None
        probs = attention_probs(self.parts, 0, question_embeds, question_rope_ids, cache.keys(0))  # (H, m, L)
        attention = probs.mean(dim=(0, 1))  # (L,)
        positions = cache.positions(0)[vision]
        relevance = attention[vision]
        count = tokens_kept(keep, positions.numel())
        return positions[relevance.argsort(descending=True)[count:]]


GRAMMAR = "cls_knee[:MIN_KEEP[:QUESTION_KEEP]]"


def parse(spec: str) -> ClsKneeConfig:
    args = spec_parts(spec, GRAMMAR, most=2)
    with numbers(spec):
        return ClsKneeConfig(min_keep=float(args[0]) if len(args) > 0 else 0.05,
                             question_keep=float(args[1]) if len(args) > 1 else None)


POLICY = Policy(
    name="cls_knee", grammar=GRAMMAR, config=ClsKneeConfig, parse=parse,
    summary="keep each frame's tokens before the knee of their similarity to the frame's pooled token "
            "(CLS-similarity pruning, arXiv 2409.01162)",
    args=(Arg("MIN_KEEP", "keep at least this fraction of each frame, whatever the knee says", "0.05"),
          Arg("QUESTION_KEEP", "stage 2: at a question keep this fraction of cached vision entries, those the "
                               "question attends to most at the first layer (default: stage 2 off)")),
    build=lambda config, num_layers, hidden_size: ClsKneeRouter(config, num_layers),
    example="cls_knee:0.1:0.5", default="cls_knee:0.05:0.5", quality=("cls_knee",))
