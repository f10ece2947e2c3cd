"""yopo (arXiv 2410.06169): YOPO's four parts together, as the paper combines them, on vision tokens only.

Before the drop layer every layer runs `YopoLayer`: a vision query attends to the earlier text and a w x w
causal window of its own frame (neighbour attention); calibrated inactive heads neither read nor update vision
tokens (text queries read no vision entry through them, vision queries get nothing from them); vision tokens
go through only the first FFN of the MLP's intermediate neurons (sparse FFN). From the drop layer on, vision
tokens are neither computed nor cached (layer drop, as `layer_drop` does: the layer keeps text only).

The head mask is measured, not specified: `streamvlm calibrate yopo --spec SPEC --out DIR` scores every head
as `head_prune` does (attention mass on vision over mass on text, YOPO's r) and keeps the HEADS fraction of
heads after the first two layers, those active (r > tau) in the most samples, ties by mean r. A spec with
HEADS `all` needs no calibration; it is also how each part runs alone (`yopo:full:all:0.5:none` is the sparse
FFN by itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.routers.base import RouteDecision, Router, YopoLayer
from streamvlm.routers.head_prune import calibrate_heads
from streamvlm.routers.mod import decision_from_kept
from streamvlm.routers.policy import Arg, PerModel, Policy, numbers, spec_parts
from streamvlm.types import Chunk

DENSE_HEAD_LAYERS = 2
"""YOPO: the first two layers keep every head."""
MADE_BY = "streamvlm calibrate yopo"


@dataclass(frozen=True)
class YopoConfig:
    window: int | None = 5
    """w: vision queries attend to the earlier text and a w x w causal window of their frame (YOPO's 5); None:
    full attention (no window)."""
    head_keep: float = 0.5
    """The fraction of heads kept in the layers after the first two (YOPO keeps about half on LLaVA-1.5); 1:
    every head, no calibration needed. Below 1, `pruned` holds the calibrated mask."""
    ffn: float = 0.5
    """The fraction of the MLP's intermediate neurons (the first ones) vision tokens go through (YOPO: half)."""
    drop_layer: int | str = "half"
    """The first layer (0-based) where vision tokens are neither computed nor cached; "half": half the depth
    (YOPO: 20 of 40 on LLaVA-1.5-13B); "none": no layer drop."""
    pruned: tuple[tuple[bool, ...], ...] | None = None
    """Per layer, per query head, True where the head is inactive for vision: what `streamvlm calibrate yopo`
    measured. None: no head is pruned (head_keep 1), or not calibrated yet."""
    policy: str = field(default="yopo", init=False)

    def __post_init__(self):
        if self.window is not None and (self.window < 1 or self.window % 2 == 0):
            raise StreamVLMError(f"yopo needs an odd window >= 1 (or 'full'), got {self.window}")
        if not 0.0 < self.head_keep <= 1.0:
            raise StreamVLMError(f"yopo's head keep fraction must be in (0, 1] (or 'all'), got {self.head_keep}")
        if not 0.0 < self.ffn <= 1.0:
            raise StreamVLMError(f"yopo's FFN fraction must be in (0, 1], got {self.ffn}")
        if isinstance(self.drop_layer, str):
            if self.drop_layer not in ("half", "none"):
                raise StreamVLMError(f"yopo's drop layer must be a layer number, 'half' or 'none', got "
                                     f"{self.drop_layer!r}")
        elif self.drop_layer < 0:
            raise StreamVLMError(f"yopo's drop layer must be >= 0, got {self.drop_layer}")
        if self.pruned is not None:
            object.__setattr__(self, "pruned", tuple(tuple(bool(h) for h in layer) for layer in self.pruned))

    def spec(self) -> str:
        """The settings as a spec (a calibrated mask is not in it: its router folder holds it)."""
        window = "full" if self.window is None else str(self.window)
        heads = "all" if self.head_keep == 1.0 else f"{self.head_keep:g}"
        drop = "" if self.drop_layer == "half" else f":{self.drop_layer}"
        return f"yopo:{window}:{heads}:{self.ffn:g}{drop}"

    def pruned_heads(self) -> int:
        return 0 if self.pruned is None else sum(map(sum, self.pruned))


class YopoRouter(Router):
    """YOPO combined: `YopoLayer` before the drop layer, text only from it on."""

    def __init__(self, config: YopoConfig, num_layers: int):
        super().__init__()
        if config.drop_layer == "half":
            drop = num_layers // 2
        elif config.drop_layer == "none":
            drop = num_layers
        else:
            drop = int(config.drop_layer)
        if drop > num_layers:
            raise StreamVLMError(f"yopo's drop layer {drop} is past the model's {num_layers} layers; use 'none' "
                                 "for no layer drop")
        if config.head_keep < 1.0 and config.pruned is None:
            raise StreamVLMError(f"{config.spec()} prunes heads by a calibrated mask: run `{MADE_BY} --spec "
                                 f"{config.spec()} --out DIR` and pass --routing DIR, or write HEADS as 'all' "
                                 "to keep every head")
        if config.pruned is not None and len(config.pruned) != num_layers:
            raise StreamVLMError(f"the yopo head mask has {len(config.pruned)} layers but the model has {num_layers}")
        self.config = config
        self.drop = drop

    def decide(self, layer: int, hidden: torch.Tensor, chunk: Chunk) -> RouteDecision | None:
        if layer < self.drop or chunk.num_frames == 0:
            return None  # every token, through the YopoLayer `variant` gives before the drop layer
        return decision_from_kept(chunk, chunk.vision_index[:0].flatten(), None)  # layer drop: text only

    def variant(self, layer: int) -> YopoLayer | None:
        if layer >= self.drop:
            return None  # no vision entry is cached here, so neither the window nor the head mask matters
        heads = self.config.pruned[layer] if self.config.pruned is not None else ()
        return YopoLayer(self.config.window, heads if any(heads) else (), self.config.ffn)


def heads_to_prune(active: torch.Tensor, ratios: torch.Tensor, keep: float,
                   dense_layers: int = DENSE_HEAD_LAYERS) -> list[list[bool]]:
    """active, ratios: (layers, heads), the share of samples in which each head was active (r > tau) and its
    mean r. Keeps ceil(keep * count) of the heads after the first `dense_layers` layers, the most often
    active first (ties: higher mean r, then the earlier head); the first layers keep every head."""
    layers, heads = active.shape
    pruned = torch.zeros(layers, heads, dtype=torch.bool)
    if dense_layers >= layers:
        return pruned.tolist()
    a, r = active[dense_layers:].flatten(), ratios[dense_layers:].flatten()
    count = a.numel()
    kept = math.ceil(keep * count - 1e-9)
    order = sorted(range(count), key=lambda i: (-float(a[i]), -float(r[i]), i))
    flat = torch.ones(count, dtype=torch.bool)
    flat[order[:kept]] = False
    pruned[dense_layers:] = flat.view(layers - dense_layers, heads)
    return pruned.tolist()


def calibrate_yopo(vlm, clips: list, questions: list[str], config: YopoConfig, tau: float = 0.07,
                   min_fraction: float = 0.4, max_new_tokens: int = 16) -> dict:
    """The head mask for `config` (its head_keep) from the dense model's attention on the clips and questions.
    Returns {"config": the config with its mask, "pruned", "active", "ratios", "samples", "tau"}."""
    if config.head_keep == 1.0:
        return {"config": config, "pruned": None, "samples": 0, "tau": tau}
    result = calibrate_heads(vlm, clips, questions, tau, min_fraction, DENSE_HEAD_LAYERS, max_new_tokens)
    pruned = heads_to_prune(torch.tensor(result["active"]), torch.tensor(result["ratios"]), config.head_keep)
    calibrated = YopoConfig(window=config.window, head_keep=config.head_keep, ffn=config.ffn,
                            drop_layer=config.drop_layer, pruned=pruned)
    return {"config": calibrated, "pruned": pruned, "active": result["active"], "ratios": result["ratios"],
            "samples": result["samples"], "tau": tau}


GRAMMAR = "yopo[:W[:HEADS[:FFN[:DROP]]]]"


def parse(spec: str) -> YopoConfig:
    args = spec_parts(spec, GRAMMAR, most=4) + [""] * 4
    window, heads, ffn, drop = (a.strip() for a in args[:4])
    with numbers(spec):
        return YopoConfig(
            window=None if window == "full" else int(window) if window else 5,
            head_keep=1.0 if heads == "all" else float(heads) if heads else 0.5,
            ffn=float(ffn) if ffn else 0.5,
            drop_layer=drop if drop in ("half", "none") else int(drop) if drop else "half")


def _calibrated_on_the_sample(sample) -> YopoConfig:
    """YOPO's published settings, heads calibrated on the compared clip itself (a real run calibrates on
    other clips)."""
    return calibrate_yopo(sample.vlm, [sample.frames], [sample.question], YopoConfig())["config"]


POLICY = Policy(
    name="yopo", grammar=GRAMMAR, config=YopoConfig, parse=parse,
    summary="YOPO's parts together on vision tokens: a W x W neighbour window, calibrated inactive heads, the "
            "first FFN of the MLP's neurons, and no vision tokens from layer DROP on (arXiv 2410.06169; "
            f"`{MADE_BY} --spec SPEC` writes the router folder when HEADS is a fraction)",
    args=(Arg("W", "the window's side in tokens, odd; full: no window", "5"),
          Arg("HEADS", "the fraction of heads kept after the first two layers, chosen by calibration; all: "
                       "every head (no calibration)", "0.5"),
          Arg("FFN", "the fraction of the MLP's intermediate neurons vision tokens go through", "0.5"),
          Arg("DROP", "the first layer vision tokens skip and leave no K/V in (default half the depth); none: "
                      "no layer drop")),
    build=lambda config, num_layers, hidden_size: YopoRouter(config, num_layers),
    example="yopo:3:all:0.5:1",
    default=PerModel("yopo:5:0.5:0.5 <heads calibrated on the compared clip>", _calibrated_on_the_sample))
