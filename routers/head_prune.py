"""head_prune (YOPO): calibrated inactive heads neither read nor update vision tokens.

Its config is a per-layer, per-head mask measured on clips (`calibrate_heads`, run by `streamvlm calibrate
heads`, which writes a router folder for --routing); it has no spec of its own. The calibration lives here, with
the policy, so that `streamvlm compare` can calibrate its default on the compared clip without importing
streamvlm.calibrate (which imports compare).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.probe import HiddenRecorder, attention_probs
from streamvlm.routers.base import PrunedHeads, RouteDecision, Router
from streamvlm.routers.policy import PerModel, Policy
from streamvlm.types import VISION, Chunk


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

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        return None  # every token, through the pruned-head attention `variant` gives

    def variant(self, layer: int) -> PrunedHeads | None:
        # Every chunk, text-only ones too: a pruned head must not let later text read vision entries.
        heads = self.config.pruned[layer]
        return PrunedHeads(heads) if any(heads) else None


def calibrate_heads(vlm, clips: list, questions: list[str], tau: float = 0.07, min_fraction: float = 0.4,
                    dense_layers: int = 2, max_new_tokens: int = 16) -> dict:
    """YOPO's inactive heads: per head, r = attention mass the question's and answer's text puts on vision
    entries divided by the mass on text entries; a head is active in a sample when r > tau and is kept when
    active in more than `min_fraction` of the samples. The first `dense_layers` layers keep every head.

    The queries are the text tokens of the chunk that carries the question's turn and the dense model's
    answer (the template's text around the question included), each seeing the cache up to itself.

    Returns {"pruned": [[bool per head] per layer], "ratios": mean r per layer and head, "active": the share of
    samples in which each head was active, "samples", "tau", "min_fraction"}.
    """
    if not clips or not questions:
        raise StreamVLMError("calibration needs at least one clip and one question")
    parts = vlm.adapter.decoder
    recorder = HiddenRecorder(every_chunk=True)
    model = vlm.with_routing(recorder)
    active = torch.zeros(parts.num_layers, parts.num_heads)
    ratio_sum = torch.zeros(parts.num_layers, parts.num_heads)
    samples = 0
    for frames in clips:
        for question in questions:
            session = model.session()
            session.append_frames(frames)
            reference = vlm.session()
            reference.append_frames(frames)
            reference.ask(question, max_new_tokens=max_new_tokens, ignore_stop=True)
            answer = list(reference.turns[-1].answer_ids)
            recorder.clear()
            # score feeds the question's turn and the answer in one chunk, then the turn's closing text in
            # another: the chunk probed is the one ending at the answer's last position.
            session.score(question, answer)
            last = session.turns[-1].context_tokens + len(answer) - 1
            with torch.no_grad():
                for layer in range(parts.num_layers):
                    hidden, chunk = _chunk_ending_at(recorder.seen[layer], last)
                    text = torch.nonzero(chunk.text_mask).squeeze(1)  # (m,)
                    seen = session.cache.positions(layer)[None] <= chunk.positions[text][:, None]  # (m, L)
                    probs = attention_probs(parts, layer, hidden[text], chunk.rope_ids(text[None]),
                                            session.cache.keys(layer), mask=seen)  # (H, m, L)
                    vision = session.cache.kinds(layer) == VISION
                    ratio = (probs[..., vision].sum(-1) / probs[..., ~vision].sum(-1).clamp_min(1e-12)).mean(-1)
                    ratio_sum[layer] += ratio
                    active[layer] += (ratio > tau).float()
            samples += 1
    keep = active / samples > min_fraction
    keep[:dense_layers] = True
    return {"pruned": (~keep).tolist(), "ratios": (ratio_sum / samples).tolist(),
            "active": (active / samples).tolist(), "samples": samples,
            "tau": tau, "min_fraction": min_fraction}


def _chunk_ending_at(seen: list, position: int):
    """The recorded (hidden, chunk) whose last token is at `position`."""
    for hidden, chunk in seen:
        if int(chunk.positions[-1]) == position:
            return hidden, chunk
    raise StreamVLMError(f"no recorded chunk ends at position {position}")  # a session change broke the probe


MADE_BY = "streamvlm calibrate heads"


def parse(spec: str) -> HeadPruneConfig:
    raise StreamVLMError(f"head_prune needs a calibrated head mask: run `{MADE_BY} --out DIR` and pass --routing DIR")


def _calibrated_on_the_sample(sample) -> HeadPruneConfig:
    """YOPO's defaults, calibrated on the compared clip itself (a real run calibrates on other clips)."""
    return HeadPruneConfig(pruned=calibrate_heads(sample.vlm, [sample.frames], [sample.question])["pruned"])


POLICY = Policy(
    name="head_prune", grammar="head_prune (a router folder)", config=HeadPruneConfig, parse=parse,
    summary=f"calibrated inactive heads neither read nor update vision tokens (YOPO; `{MADE_BY}` writes the "
            "router folder)",
    build=lambda config, num_layers, hidden_size: HeadPruneRouter(config, num_layers),
    default=PerModel("head_prune:<calibrated on the compared clip>", _calibrated_on_the_sample), made_by=MADE_BY)
