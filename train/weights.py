"""Which weights of a checkpoint belong to the language model (training and export both ask)."""

from __future__ import annotations

_LANGUAGE_MODEL_PARTS = ("language_model.", "text_model.", "lm_head.", "lora_")
"""Weight names of the language model (LLaVA-OneVision, Qwen-VL: language_model; SmolVLM: text_model) and
its adapters: they play no part in encoding frames, so the encoder fingerprint leaves them out."""


def is_language_model_weight(name: str) -> bool:
    """Whether a weight name belongs to the language model (or its adapters), not to the frame encoder."""
    return any(part in name for part in _LANGUAGE_MODEL_PARTS)
