"""Helpers shared by the tests: tiny checkpoint shapes, frames, and transformers' reference inputs."""

from __future__ import annotations

import json
from unittest import mock

import torch

from streamvlm.tiny import TinySpec

# Several tiny shapes: grouped-query attention, an odd patch grid (pooling rounds up: 5x5 -> 3x3),
# multi-query attention with more layers, and full multi-head attention.
SPECS = {
    "gqa": TinySpec(),
    "odd_grid_mha": TinySpec(hidden_size=96, num_layers=3, num_heads=6, num_kv_heads=6, intermediate_size=160,
                             image_size=35, patch_size=7, seed=1),
    "mqa_deep": TinySpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=1, intermediate_size=256,
                         vision_hidden_size=48, image_size=42, patch_size=7, vocab_size=512, seed=2),
}


def random_frames(count: int, height: int = 40, width: int = 52, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, height, width, 3), dtype=torch.uint8, generator=g)


class _VideoProcessorStandIn:
    """transformers' LLaVA-OneVision video processor needs torchvision, which has no CPU build here. The
    processor's own text expansion and tokenization still run; this stand-in hands it our pixels."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels

    def __call__(self, videos, **kwargs):
        from transformers import BatchFeature

        return BatchFeature({"pixel_values_videos": self.pixels[None]})


def hf_inputs(model_dir, pixels: torch.Tensor, prompt: str) -> dict:
    """input_ids and pixel_values_videos as transformers' LlavaOnevisionProcessor builds them."""
    from transformers import AutoTokenizer, LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    tok = AutoTokenizer.from_pretrained(model_dir)
    num_image_tokens = json.loads((model_dir / "processor_config.json").read_text())["num_image_tokens"]
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        proc = LlavaOnevisionProcessor(image_processor=None, tokenizer=tok,
                                       video_processor=_VideoProcessorStandIn(pixels),
                                       num_image_tokens=num_image_tokens, vision_feature_select_strategy="full",
                                       chat_template=tok.chat_template)
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    out = proc(text=text, videos=[pixels.numpy()], return_tensors="pt")
    return {"input_ids": out["input_ids"], "pixel_values_videos": out["pixel_values_videos"]}
