"""Training-free pruning policies from the literature, as routers.

layer_drop (YOPO's selective layer dropping, VTW): vision tokens skip every layer from L on and leave no
    K/V there; text still runs every layer (and, from L on, reads only earlier layers' vision tokens
    through its own hidden state, as in VTW).
fastv (FastV): at layer K, rank each frame's vision tokens by the attention they receive at layer K-1 and
    keep the top (1 - R) for every later layer.
pdrop (PyramidDrop): at each stage layer (default L/4, L/2, 3L/4), rank the tokens still kept by the
    attention they receive at that layer and keep a fraction of them, down the pyramid.
neighbor_attention (YOPO): vision tokens attend to earlier text and a w x w window of their own frame.
schedule (G-Search / P-Sigmoid): a per-layer keep ratio, non-increasing with depth, nested and ranked by
    attention received; the schedule comes from `streamvlm calibrate schedule`.
skip (Skipping Computations in Multimodal LLMs): on layers start, start+interval, ... < end, vision tokens
    skip the whole block, only attention (no K/V there), only the MLP, or run attention and MLP in parallel
    on the same normed input (x + SA(LN x) + FFN(LN x)).

In a stream the question arrives after the frames, so the ranking query cannot be the question: here it is
each frame's own last vision token (the frame's "last token"), and ranking is done within the frame. The
ranking needs one extra query and the frame's keys at the ranking layer; those FLOPs are not added to the
shared counter (about one layer's k-projection for the chunk, per ranking layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streamvlm.rope import apply_rope
from streamvlm.errors import StreamVLMError
from streamvlm.parts import DecoderParts
from streamvlm.routers.base import RouteDecision, Router
from streamvlm.routers.config import tokens_kept
from streamvlm.routers.mod import decision_from_kept, select_per_frame
from streamvlm.types import VISION, Chunk


def frame_attention_ranking(parts: DecoderParts, layer: int, hidden: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """(F, T): head-averaged attention each vision token of a frame receives from the frame's last vision
    token at `layer`, computed with that layer's own norm, projections and RoPE on its input `hidden`."""
    lp = parts.layers[layer]
    vision = chunk.vision_index  # (F, T)
    frames, tokens = vision.shape
    h = lp.input_norm(hidden[vision])  # (F, T, d)
    cos, sin = parts.rotary(h, chunk.rope_ids(vision))  # (F, T, hd)
    q = lp.q_proj(h[:, -1:]).view(frames, 1, parts.num_heads, parts.head_dim).transpose(1, 2)  # (F, H, 1, hd)
    k = lp.k_proj(h).view(frames, tokens, parts.num_kv_heads, parts.head_dim).transpose(1, 2)  # (F, KV, T, hd)
    q = apply_rope(q, cos[:, None, -1:], sin[:, None, -1:])
    k = apply_rope(k, cos[:, None], sin[:, None])
    k = k.repeat_interleave(parts.num_heads // parts.num_kv_heads, dim=1)
    scores = (q @ k.transpose(-1, -2)) * parts.head_dim ** -0.5  # (F, H, 1, T)
    return scores.softmax(-1).mean(dim=1)[:, 0]


class _BoundRouter(Router):
    """A router that needs the decoder's weights; StreamVLM calls `bind` when it attaches the router."""

    parts: DecoderParts | None = None

    def bind(self, parts: DecoderParts) -> None:
        self.parts = parts

    def _ranking(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        if self.parts is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to a model; use StreamVLM.from_pretrained")
        return frame_attention_ranking(self.parts, layer, hidden, chunk)


@dataclass(frozen=True)
class LayerDropConfig:
    start_layer: int
    """Vision tokens skip every layer from this one on (0-based)."""
    policy: str = field(default="layer_drop", init=False)

    def __post_init__(self):
        if self.start_layer < 0:
            raise StreamVLMError(f"layer_drop needs a layer >= 0, got {self.start_layer}")

    def spec(self) -> str:
        return f"layer_drop:{self.start_layer}"


class LayerDropRouter(Router):
    def __init__(self, config: LayerDropConfig, num_layers: int):
        super().__init__()
        self.config = config
        self.num_layers = num_layers

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        if layer < self.config.start_layer or chunk.num_frames == 0:
            return None
        return decision_from_kept(chunk, chunk.vision_index[:0].flatten(), None)  # text only


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


class FastVRouter(_BoundRouter):
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


class _NestedRankRouter(_BoundRouter):
    """Keeps a shrinking, nested set of each frame's tokens: where `_target` asks for fewer, the tokens still
    kept are ranked by the attention they receive at that layer (from the frame's last token) and the top
    ones stay. The first layer with a target starts routing; later layers reuse the set."""

    def _target(self, layer: int, current: int, tokens: int) -> int | None:
        raise NotImplementedError

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        if chunk.num_frames == 0:
            return None
        vision = chunk.vision_index
        if layer == 0:
            self._kept = torch.arange(vision.shape[1], device=vision.device).expand(vision.shape[0], -1)
        k = self._target(layer, self._kept.shape[1], vision.shape[1])
        if k is not None and k < self._kept.shape[1]:
            ranking = self._ranking(layer, hidden, chunk).gather(1, self._kept)  # among those still kept
            self._kept = self._kept.gather(1, select_per_frame(ranking, k))
        if self._kept.shape[1] == vision.shape[1]:
            return None
        return decision_from_kept(chunk, vision.gather(1, self._kept).flatten(), None)


class PDropRouter(_NestedRankRouter):
    def __init__(self, config: PDropConfig, num_layers: int):
        super().__init__()
        stages = config.stages or tuple(num_layers * i // 4 for i in (1, 2, 3))
        if any(not 0 < s < num_layers for s in stages) or list(stages) != sorted(set(stages)):
            raise StreamVLMError(f"pdrop stages must be increasing layers in (0, {num_layers}), got {list(stages)}")
        self.config = config
        self.stages = stages

    def _target(self, layer: int, current: int, tokens: int) -> int | None:
        return tokens_kept(self.config.keep, current) if layer in self.stages else None


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


class ScheduleRouter(_NestedRankRouter):
    """A per-layer keep schedule (from G-Search or P-Sigmoid): at layer l keep ceil(r_l * T) of each frame,
    a subset of what layer l-1 kept, ranked by attention received."""

    def __init__(self, config: ScheduleConfig, num_layers: int):
        super().__init__()
        if len(config.keep) != num_layers:
            raise StreamVLMError(f"the schedule lists {len(config.keep)} layers but the model has {num_layers}")
        self.config = config

    def _target(self, layer: int, current: int, tokens: int) -> int | None:
        return min(current, tokens_kept(self.config.keep[layer], tokens))


@dataclass(frozen=True)
class NeighborConfig:
    window: int = 5
    """w: a vision token attends to the w x w neighbours on its frame's grid (YOPO's default 5)."""
    start_layer: int = 0
    """Layers before this one keep full attention."""
    policy: str = field(default="neighbor_attention", init=False)

    def __post_init__(self):
        if self.window < 1 or self.window % 2 == 0:
            raise StreamVLMError(f"neighbor_attention needs an odd window >= 1, got {self.window}")
        if self.start_layer < 0:
            raise StreamVLMError("neighbor_attention start layer must be >= 0")

    def spec(self) -> str:
        return f"neighbor_attention:{self.window}" + (f":{self.start_layer}" if self.start_layer else "")


class NeighborRouter(Router):
    """YOPO's neighbour-aware vision attention: vision-to-vision attention only inside a w x w window of
    the token's own frame (causal), vision still reads the earlier text, text reads everything."""

    def __init__(self, config: NeighborConfig, num_layers: int):
        super().__init__()
        if config.start_layer >= num_layers:
            raise StreamVLMError(f"neighbor_attention start layer {config.start_layer} is past the model's layers")
        self.config = config

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        if layer < self.config.start_layer or chunk.num_frames == 0:
            return None
        return RouteDecision(torch.arange(len(chunk), device=hidden.device), window=self.config.window)


@dataclass(frozen=True)
class HeadPruneConfig:
    pruned: tuple[tuple[bool, ...], ...]
    """Per layer, per query head: True where the head neither reads nor updates vision tokens."""
    policy: str = field(default="head_prune", init=False)

    def __post_init__(self):
        object.__setattr__(self, "pruned", tuple(tuple(bool(h) for h in layer) for layer in self.pruned))

    def spec(self) -> str:
        total = sum(len(layer) for layer in self.pruned)
        return f"head_prune({sum(map(sum, self.pruned))}/{total} heads pruned)"


class HeadPruneRouter(Router):
    """YOPO's inactive-head pruning with a calibrated mask (`streamvlm calibrate heads`)."""

    def __init__(self, config: HeadPruneConfig, num_layers: int):
        super().__init__()
        if len(config.pruned) != num_layers:
            raise StreamVLMError(f"the head mask has {len(config.pruned)} layers but the model has {num_layers}")
        self.config = config
        self.masks = [torch.tensor(layer) if any(layer) else None for layer in config.pruned]

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        mask = self.masks[layer]
        if mask is None:
            return None
        # Every chunk, text-only ones too: a pruned head must not let later text read vision entries.
        return RouteDecision(torch.arange(len(chunk), device=hidden.device), pruned_heads=mask.to(hidden.device))


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


class ClsKneeRouter(_BoundRouter):
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
        parts = self.parts
        vision = cache.kinds(0) == VISION
        if not bool(vision.any()):
            return None
        lp = parts.layers[0]
        h = lp.input_norm(question_embeds)
        m = h.shape[0]
        q = lp.q_proj(h).view(m, parts.num_heads, parts.head_dim).transpose(0, 1)
        cos, sin = parts.rotary(h, question_rope_ids)
        q = apply_rope(q, cos[0], sin[0])
        keys = cache.keys(0).repeat_interleave(parts.num_heads // parts.num_kv_heads, 0)
        attention = ((q @ keys.transpose(1, 2)) * parts.head_dim ** -0.5).softmax(-1).mean(dim=(0, 1))  # (L,)
        positions = cache.positions(0)[vision]
        relevance = attention[vision]
        count = tokens_kept(keep, positions.numel())
        return positions[relevance.argsort(descending=True)[count:]]


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
        if layer not in self.layers or chunk.num_frames == 0:
            return None
        everything = torch.arange(len(chunk), device=hidden.device)
        text = torch.nonzero(chunk.text_mask).squeeze(1)
        mode = self.config.mode
        if mode == "block":
            return RouteDecision(text)
        if mode == "attn":
            return RouteDecision(text, mlp_index=everything)
        if mode == "mlp":
            return RouteDecision(everything, mlp_index=text)
        return RouteDecision(everything, parallel_index=chunk.vision_index.flatten())


def parse_pruning(spec: str):
    """layer_drop:L | fastv[:K[:R]] | pdrop[:KEEP[:S1,S2,...]] | skip:MODE[:START[:END[:INTERVAL]]] -> its config."""
    parts = spec.split(":")
    try:
        if parts[0] == "layer_drop":
            if len(parts) != 2:
                raise StreamVLMError(f"routing {spec!r}: expected layer_drop:LAYER")
            return LayerDropConfig(int(parts[1]))
        if parts[0] == "fastv":
            if len(parts) > 3:
                raise StreamVLMError(f"routing {spec!r}: expected fastv[:K[:R]]")
            layer = int(parts[1]) if len(parts) > 1 else 2
            drop = float(parts[2]) if len(parts) > 2 else 0.5
            return FastVConfig(layer=layer, drop_ratio=drop)
        if parts[0] == "pdrop":
            if len(parts) > 3:
                raise StreamVLMError(f"routing {spec!r}: expected pdrop[:KEEP[:S1,S2,...]]")
            keep = float(parts[1]) if len(parts) > 1 else 0.5
            stages = tuple(int(s) for s in parts[2].split(",")) if len(parts) > 2 else ()
            return PDropConfig(keep=keep, stages=stages)
        if parts[0] == "neighbor_attention":
            if len(parts) > 3:
                raise StreamVLMError(f"routing {spec!r}: expected neighbor_attention[:W[:START_LAYER]]")
            return NeighborConfig(window=int(parts[1]) if len(parts) > 1 else 5,
                                  start_layer=int(parts[2]) if len(parts) > 2 else 0)
        if parts[0] == "schedule":
            if len(parts) != 2:
                raise StreamVLMError(f"routing {spec!r}: expected schedule:R0,R1,... (one ratio per layer)")
            return ScheduleConfig(keep=tuple(float(r) for r in parts[1].split(",")))
        if parts[0] == "cls_knee":
            if len(parts) > 3:
                raise StreamVLMError(f"routing {spec!r}: expected cls_knee[:MIN_KEEP[:QUESTION_KEEP]]")
            return ClsKneeConfig(min_keep=float(parts[1]) if len(parts) > 1 else 0.05,
                                 question_keep=float(parts[2]) if len(parts) > 2 else None)
        if parts[0] == "head_prune":
            raise StreamVLMError("head_prune needs a calibrated head mask: run `streamvlm calibrate heads --out DIR` "
                                 "and pass --routing DIR")
        if parts[0] == "skip":
            if len(parts) < 2 or len(parts) > 5:
                raise StreamVLMError(f"routing {spec!r}: expected skip:MODE[:START[:END[:INTERVAL]]]")
            numbers = [int(v) if v else None for v in parts[2:]] + [None, None, None]
            return SkipConfig(mode=parts[1], start=numbers[0], end=numbers[1], interval=numbers[2] or 1)
    except ValueError:
        raise StreamVLMError(f"routing {spec!r}: its numbers do not parse") from None
    raise StreamVLMError(f"unknown pruning policy {parts[0]!r}")


PRUNING_POLICIES = ("layer_drop", "fastv", "pdrop", "skip", "neighbor_attention", "head_prune", "cls_knee",
                    "schedule")
PRUNING_CONFIGS = {"layer_drop": LayerDropConfig, "fastv": FastVConfig, "pdrop": PDropConfig, "skip": SkipConfig,
                   "neighbor_attention": NeighborConfig, "head_prune": HeadPruneConfig, "cls_knee": ClsKneeConfig,
                   "schedule": ScheduleConfig}


def build_pruning(config, num_layers: int) -> Router:
    if isinstance(config, LayerDropConfig):
        return LayerDropRouter(config, num_layers)
    if isinstance(config, FastVConfig):
        return FastVRouter(config, num_layers)
    if isinstance(config, SkipConfig):
        return SkipRouter(config, num_layers)
    if isinstance(config, NeighborConfig):
        return NeighborRouter(config, num_layers)
    if isinstance(config, HeadPruneConfig):
        return HeadPruneRouter(config, num_layers)
    if isinstance(config, ClsKneeConfig):
        return ClsKneeRouter(config, num_layers)
    if isinstance(config, ScheduleConfig):
        return ScheduleRouter(config, num_layers)
    return PDropRouter(config, num_layers)
