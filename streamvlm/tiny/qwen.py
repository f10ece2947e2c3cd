"""Small random Qwen2-VL / Qwen2.5-VL checkpoints, built offline as streamvlm.tiny builds LLaVA-OneVision's:
transformers' own config and model classes, save_pretrained, a byte-level BPE tokenizer trained here and a
ChatML template written here. Random weights: for parity tests and speed, not for watching video."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from streamvlm.tiny import build_tokenizer, spread_weights

logger = logging.getLogger(__name__)

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|video_pad|>", "<|image_pad|>")

# Qwen-VL's ChatML layout: media inside <|vision_start|>...<|vision_end|> first, then the text; an assistant
# turn renders as the generation prompt plus the answer. Written for this project.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'video' %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def build_qwen_tokenizer(vocab_size: int = 400):
    return build_tokenizer(vocab_size, QWEN_SPECIAL_TOKENS, QWEN_CHAT_TEMPLATE,
                           extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                 "vision_start_token": "<|vision_start|>",
                                                 "vision_end_token": "<|vision_end|>"})


def write_tiny_qwen(out_dir: str | Path, family: str = "qwen2_5_vl", seed: int = 0, side: int = 32,
                    num_layers: int = 2, hidden_size: int = 64, tokens_per_second: int = 2) -> Path:
    """Write a random Qwen2-VL or Qwen2.5-VL checkpoint: 4 px patches, 2x2 merge, frames resized to
    side x side (32 -> 4 x 4 = 16 tokens per pair of frames), a Qwen2 decoder of num_layers x hidden_size."""
    import transformers
    from transformers.utils import logging as hf_logging

    if family not in QWEN_FAMILIES:
        raise ValueError(f"family must be one of {QWEN_FAMILIES}, got {family!r}")
    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    heads = 4
    half = hidden_size // heads // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # (t, h, w) like Qwen's 16/24/24
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                max_position_embeddings=4096, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    common_vision = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                         in_channels=3)
    if family == "qwen2_5_vl":
        vision = dict(common_vision, hidden_size=32, intermediate_size=64, out_hidden_size=hidden_size,
                      window_size=16, fullatt_block_indexes=[1], tokens_per_second=tokens_per_second)
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(common_vision, embed_dim=32, mlp_ratio=2, hidden_size=hidden_size)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    spread_weights(model)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                 "image_std": [0.26862954, 0.26130258, 0.27577711], "patch_size": 4, "temporal_patch_size": 2,
                 "merge_size": 2, "size": {"shortest_edge": 8 * 8, "longest_edge": side * side}}
    processor_class = "Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen2VLProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps(
        {**processor, "image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor_class},
        indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(
        {**processor, "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": processor_class,
         "fps": 2.0}, indent=2))
    (out / "streamvlm_tiny.json").write_text(json.dumps({"random_weights": True, "family": family, "seed": seed,
                                                          "side": side}, indent=2))
    logger.info("wrote a random %s checkpoint to %s", family, out)
    return out
