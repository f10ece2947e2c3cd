"""The SigLIP vision tower, as LLaVA-OneVision and SmolVLM2 both use it."""

from __future__ import annotations


def siglip_flops(v) -> float:
    """Analytic FLOPs (multiply-add = 2) of a SigLIP tower (patch embedding and encoder layers) on one image."""
    patches = (v.image_size // v.patch_size) ** 2
    d, inter = v.hidden_size, v.intermediate_size
    embed = 2 * patches * (3 * v.patch_size**2) * d
    per_layer = 2 * patches * d * d * 4 + 2 * patches * d * inter * 2 + 4 * patches * patches * d
    return float(embed + v.num_hidden_layers * per_layer)
