"""Calibration: choosing a policy's setting from measurements on a few clips.

`vtw`: VTW's choice of the layer from which vision tokens are withdrawn: the first layer L at which
dropping vision tokens from L on keeps the answer distribution within a KL threshold of dense, averaged over
calibration clips (VTW used about 20 samples and 0.003 for 7B models). KL is measured on the dense model's
own greedy answer, teacher-forced, as `streamvlm compare` does.
"""

from __future__ import annotations

import logging
from pathlib import Path

from streamvlm.compare import compare
from streamvlm.errors import StreamVLMError

logger = logging.getLogger(__name__)

DEFAULT_QUESTIONS = ("What happens in the video?", "What objects are visible?", "Describe the motion you see.")


def calibrate_vtw(vlm, clips: list, questions: list[str], threshold: float, max_new_tokens: int = 16) -> dict:
    """clips: uint8 frame tensors (T, H, W, 3). Returns {"layer", "threshold", "kl_per_layer"}."""
    if not clips or not questions:
        raise StreamVLMError("calibration needs at least one clip and one question")
    layers = vlm.adapter.decoder.num_layers
    policies = [f"layer_drop:{layer}" for layer in range(1, layers)]
    totals = [0.0] * len(policies)
    count = 0
    for frames in clips:
        for question in questions:
            rows = compare(vlm, frames, question, policies, max_new_tokens=max_new_tokens, repeats=1)
            totals = [t + r["kl"] for t, r in zip(totals, rows)]
            count += 1
    kl = {layer: total / count for layer, total in zip(range(1, layers), totals)}
    chosen = next((layer for layer in kl if kl[layer] <= threshold), layers)
    logger.info("VTW: layer %d (KL %s)", chosen, {k: round(v, 5) for k, v in kl.items()})
    return {"layer": chosen, "threshold": threshold, "kl_per_layer": kl, "samples": count}


def save_vtw(vlm, result: dict, out_dir: str | Path) -> Path:
    from streamvlm.routers import save_router

    parts = vlm.adapter.decoder
    router = vlm.with_routing(f"layer_drop:{result['layer']}").router
    return save_router(router, out_dir, parts.num_layers, parts.hidden_size)
