"""cls_knee (arXiv 2409.01162): keep each frame's tokens before the knee of its sorted similarity-to-the-class-
token curve, at every layer; optionally drop the cached vision entries the question attends to least.

The reference the paper ranks against is the vision tower's CLS token. Towers differ:
- a tower with a class token (CLIP-style, `embeddings.class_embedding`): similarity of each patch to it;
- a tower with an attention-pooling head (SigLIP's MAP head, `head` of transformers' SiglipVisionModel when
  `vision_use_head`): the head's probe is the learned query that summarises the image, and its attention
  weights over the patches are how much each patch makes up the summary, the same role the CLS token's
  attention plays in a CLIP tower;
- neither (SigLIP as LLaVA-OneVision, SmolVLM and the built-in model ship it; Qwen-VL's tower): the frame's
  mean token stands in, and the ranking is by distance from it (1 - cosine similarity), not closeness. A mean
  is dominated by what most tokens show, the background; a CLS token is trained to carry what the image is
  about. So the tokens most like the mean are the least informative, and ranking by closeness to it keeps
  background. On the built-in model that kept 7% of the tokens that show an object (40.8% accuracy);
  ranking by distance keeps 51% at the same count (`docs/routing.md`, CLS-knee).

The tower's reference is read while frames are encoded: `TowerReference` hooks the projector of a family whose
encoder splits into tower and projector (`FamilyAdapter.tower_prefix`), scores each frame's patches, pools the
scores to the frame's token grid as the projector's output is pooled, and files them under the frame's
projected tokens, which the router sees at layer 0. Frames encoded before a router with a tower reference was
attached (no scores filed) fall back to the mean-token ranking, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from streamvlm.errors import StreamVLMError
from streamvlm.probe import attention_probs
from streamvlm.routers.base import RouteDecision
from streamvlm.routers.config import tokens_kept
from streamvlm.routers.mod import decision_from_kept
from streamvlm.routers.policy import Arg, Policy, numbers, spec_parts
from streamvlm.routers.ranking import BoundRouter
from streamvlm.types import VISION, Chunk

logger = logging.getLogger(__name__)

REFERENCES = ("auto", "cls", "map", "mean")
"""What a frame's tokens are ranked against: auto (the tower's CLS token, else its attention-pooling head,
else the mean token), or one of them by name."""


def knee_index(curve: torch.Tensor) -> int:
    """Index of the knee of a descending curve (Kneedle-style): the point farthest below the chord from
    its first to its last point, after scaling both axes to [0, 1]. Tokens before it are kept."""
    n = curve.numel()
    if n < 3:
        return n
    y = (curve - curve[-1]) / (curve[0] - curve[-1]).clamp_min(1e-12)
    x = torch.linspace(0, 1, n, device=curve.device)
    return int(((1 - x) - y).argmax())  # chord y = 1 - x; the knee sits farthest below it


def cls_scores(tower_hidden: torch.Tensor) -> torch.Tensor:
    """(F, 1 + P, d) tower tokens, the class token first -> (F, P): each patch's cosine similarity to it."""
    return F.cosine_similarity(tower_hidden[:, 1:], tower_hidden[:, :1], dim=-1)


def map_scores(head: torch.nn.Module, tower_hidden: torch.Tensor) -> torch.Tensor:
    """(F, P, d) post-layernorm tower tokens -> (F, P): the attention weights of the attention-pooling head's
    probe over the patches, averaged over its heads (SiglipMultiheadAttentionPoolingHead: `probe`,
    `attention` an nn.MultiheadAttention)."""
    probe = head.probe.expand(tower_hidden.shape[0], -1, -1)
    _, weights = head.attention(probe, tower_hidden, tower_hidden, need_weights=True, average_attn_weights=True)
    return weights[:, 0]  # (F, 1, P) -> (F, P)


def mean_scores(tokens: torch.Tensor) -> torch.Tensor:
    """(F, T, d) a frame's tokens -> (F, T): distance from the frame's mean token, 1 - cosine similarity
    (the most distinct first; see the module docstring for why not the closest)."""
    return 1 - F.cosine_similarity(tokens, tokens.mean(dim=1, keepdim=True), dim=-1)


def keep_before_knee(scores: torch.Tensor, floor: int) -> list[torch.Tensor]:
    """scores (F, T), higher = more important -> per frame, the ascending indices of the tokens before the knee
    of the descending sorted curve, at least `floor` of them."""
    order = scores.argsort(dim=-1, descending=True)
    kept = []
    for f in range(scores.shape[0]):
        count = max(floor, knee_index(scores[f, order[f]]))
        kept.append(order[f, :count].sort().values)
    return kept


def tower_kind(adapter) -> str:
    """What reference the adapter's vision tower offers: "cls", "map" or "mean" (neither, or a family whose
    encoder does not split into tower and projector, so its patch scores cannot be filed under its tokens)."""
    if getattr(adapter, "tower_prefix", None) is None or _projector(adapter) is None:
        return "mean"
    tower = adapter.vision_tower()
    embeddings = getattr(tower, "embeddings", None) or getattr(getattr(tower, "vision_model", None), "embeddings", None)
    if embeddings is not None and getattr(embeddings, "class_embedding", None) is not None:
        return "cls"
    if getattr(tower, "use_head", False) and getattr(tower, "head", None) is not None:
        return "map"
    return "mean"


def _projector(adapter):
    inner = getattr(adapter.model, "model", None)
    projector = getattr(inner, "multi_modal_projector", None)
    return projector if projector is not None and hasattr(inner, "apply_pooling") else None


def _frame_key(tokens: torch.Tensor) -> bytes:
    """A frame's projected tokens (T, d) -> the key its tower scores are filed under."""
    return hashlib.blake2b(tokens.detach().contiguous().cpu().numpy().tobytes(), digest_size=16).digest()


class TowerReference:
    """Scores of each encoded frame's tokens against the tower's CLS token or attention-pooling head, read by
    a forward hook on the projector as frames are encoded (one per adapter, shared by its routers) and filed
    under the frame's pooled, projected tokens. Keeps the last `capacity` frames."""

    capacity = 4096

    def __init__(self, adapter, kind: str):
        self.kind = kind
        self.scores: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._inner = adapter.model.model
        self._tower = adapter.vision_tower()
        self._last_layer = adapter.model.config.vision_feature_layer in (-1, len(self._tower.encoder.layers))
        _projector(adapter).register_forward_hook(self._record)

    @classmethod
    def of(cls, adapter, kind: str) -> TowerReference:
        reference = getattr(adapter, "_cls_knee_reference", None)
        if reference is None or reference.kind != kind:
            reference = cls(adapter, kind)
            adapter._cls_knee_reference = reference
        return reference

    @torch.no_grad()
    def _record(self, module, inputs, output) -> None:
        tower = inputs[0]  # (F, P(+1), dv): the feature layer's hidden states, before the tower's last norm
        if self.kind == "cls":
            patch = cls_scores(tower)
        else:
            if not self._last_layer:  # the head reads the last layer; this checkpoint projects another
                return
            patch = map_scores(self._tower.head, self._tower.post_layernorm(tower))
        tokens = self._inner.apply_pooling(output)  # (F, T, d) as the adapter's frame features
        pooled = self._inner.apply_pooling(patch[..., None].to(output.dtype))[..., 0]  # (F, T)
        for frame, scores in zip(tokens, pooled):
            self.scores[_frame_key(frame)] = scores.float()
            self.scores.move_to_end(_frame_key(frame))
        while len(self.scores) > self.capacity:
            self.scores.popitem(last=False)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """tokens (F, T, d) as layer 0 sees them -> (F, T) scores, or None when a frame was not recorded."""
        found = [self.scores.get(_frame_key(frame)) for frame in tokens]
        return None if any(s is None for s in found) else torch.stack(found).to(tokens.device)


@dataclass(frozen=True)
class ClsKneeConfig:
    min_keep: float = 0.05
    """Keep at least this fraction of each frame's tokens, whatever the knee says (the knob --budget sets)."""
    question_keep: float | None = None
    """Stage 2: at question time keep only this fraction of cached vision entries, the most attended by the
    question's tokens at the first layer (None: stage 2 off)."""
    reference: str = "auto"
    """What tokens are ranked against: auto | cls | map | mean (see REFERENCES)."""
    policy: str = field(default="cls_knee", init=False)

    def __post_init__(self):
        if not 0.0 < self.min_keep <= 1.0:
            raise StreamVLMError(f"cls_knee min_keep must be in (0, 1], got {self.min_keep}")
        if self.question_keep is not None and not 0.0 < self.question_keep <= 1.0:
            raise StreamVLMError(f"cls_knee question keep must be in (0, 1], got {self.question_keep}")
        if self.reference not in REFERENCES:
            raise StreamVLMError(f"cls_knee reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")

    def spec(self) -> str:
        tail = [f"{self.question_keep:g}" if self.question_keep is not None else ""]
        if self.reference != "auto":
            tail.append(self.reference)
        while tail and not tail[-1]:
            tail.pop()
        return ":".join(["cls_knee", f"{self.min_keep:g}", *tail])


class ClsKneeRouter(BoundRouter):
    """The CLS-similarity method (arXiv 2409.01162) in a stream.

    Stage 1, per frame at ingest: each of the frame's tokens is scored against the tower's reference (CLS
    token, attention-pooling head, or distance from the mean token: the module docstring says which and why);
    sorted, the curve is long-tailed; tokens before its knee are kept at every layer, an adaptive count per
    frame, the rest are dropped from every layer. Stage 2 (optional), at question time: cached vision entries
    the question's tokens attend to least at the first layer are dropped from the cache.
    """

    def __init__(self, config: ClsKneeConfig, num_layers: int):
        super().__init__()
        self.config = config
        self.reference: TowerReference | None = None
        self.kind = "mean" if config.reference == "auto" else config.reference
        self._kept: torch.Tensor | None = None
        self._warned = False

    def bind_vision(self, adapter) -> None:
        """Called by StreamVLM with the family adapter: find the tower's reference and start recording it."""
        offered = tower_kind(adapter)
        wanted = offered if self.config.reference == "auto" else self.config.reference
        if wanted not in ("mean", offered):
            raise StreamVLMError(f"cls_knee reference {wanted!r}: this model's vision tower offers {offered!r} "
                                 "(use cls_knee:MIN_KEEP:QUESTION_KEEP:auto, or :mean)")
        self.kind = wanted
        self.reference = TowerReference.of(adapter, wanted) if wanted != "mean" else None

    def frame_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (F, T, d), the frames' projected tokens -> (F, T) scores, higher = keep first."""
        if self.reference is not None:
            scores = self.reference.lookup(tokens)
            if scores is not None:
                return scores
            if not self._warned:
                logger.warning("cls_knee: frames encoded before the router was attached have no %s scores; "
                               "ranking them by distance from the mean token", self.kind)
                self._warned = True
        return mean_scores(tokens.float())

    def keep_per_frame(self, features: torch.Tensor) -> list[torch.Tensor]:
        """features (F, T, d) -> per frame, the ascending within-frame indices kept."""
        return keep_before_knee(self.frame_scores(features), tokens_kept(self.config.min_keep, features.shape[1]))

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        if chunk.num_frames == 0:
            return None
        vision = chunk.vision_index
        if layer == 0:
            kept = self.keep_per_frame(hidden[vision])
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


GRAMMAR = "cls_knee[:MIN_KEEP[:QUESTION_KEEP[:REFERENCE]]]"


def parse(spec: str) -> ClsKneeConfig:
    args = spec_parts(spec, GRAMMAR, most=3)
    with numbers(spec):
        return ClsKneeConfig(min_keep=float(args[0]) if len(args) > 0 and args[0] else 0.05,
                             question_keep=float(args[1]) if len(args) > 1 and args[1] else None,
                             reference=args[2] if len(args) > 2 else "auto")


POLICY = Policy(
    name="cls_knee", grammar=GRAMMAR, config=ClsKneeConfig, parse=parse,
    summary="keep each frame's tokens before the knee of their similarity to the tower's CLS token or "
            "attention-pooling head, or of their distance from the frame's mean token where the tower has "
            "neither (CLS-similarity pruning, arXiv 2409.01162)",
    args=(Arg("MIN_KEEP", "keep at least this fraction of each frame, whatever the knee says", "0.05"),
          Arg("QUESTION_KEEP", "stage 2: at a question keep this fraction of cached vision entries, those the "
                               "question attends to most at the first layer (default: stage 2 off; empty for off)"),
          Arg("REFERENCE", "auto (the tower's CLS token, else its attention-pooling head, else the mean token) | "
                           "cls | map | mean", "auto")),
    build=lambda config, num_layers, hidden_size: ClsKneeRouter(config, num_layers),
    example="cls_knee:0.1:0.5", default="cls_knee:0.05:0.5", quality=("cls_knee",))
