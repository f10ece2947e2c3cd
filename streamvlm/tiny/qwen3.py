"""A small random Qwen3-VL checkpoint, built offline as streamvlm.tiny.qwen builds Qwen2.5-VL's: transformers'
own config and model classes, save_pretrained, the byte-level BPE tokenizer and ChatML template of
streamvlm.tiny.qwen (Qwen3-VL's template also writes <|vision_start|><|video_pad|><|vision_end|> for a video).
Random weights: for parity tests and speed, not for watching video."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from streamvlm.tiny import spread_weights
from streamvlm.tiny.qwen import QWEN_SPECIAL_TOKENS, build_qwen_tokenizer

logger = logging.getLogger(__name__)


def write_tiny_qwen3_vl(out_dir: str | Path, seed: int = 0, side: int = 32, num_layers: int = 3,
                        hidden_size: int = 64, deepstack_layers: tuple[int, ...] = (0, 1)) -> Path:
    """Write a random Qwen3-VL checkpoint: a 2-block vision tower over 4 px patches with a 2x2 merger and
    DeepStack mergers after `deepstack_layers` of the tower (their features join the first
    len(deepstack_layers) decoder layers), frames resized to side x side (32 -> 4 x 4 = 16 tokens per pair),
    and a Qwen3 decoder (q/k norms, interleaved M-RoPE) of num_layers x hidden_size, 4 heads of 16, 2 KV heads."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    heads, head_dim, patch, merge = 4, 16, 4, 2
    half = head_dim // 2
    # (t, h, w) frequency counts like Qwen3-VL's 24/20/20 of 64; interleaved: h and w take every third one.
    section = [half - 2 * (half // 4), half // 4, half // 4]
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim,
                max_position_embeddings=4096, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": section,
                                 "mrope_interleaved": True},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    # 36 learned positions (a 6 x 6 table), bilinearly resampled to each frame's 8 x 8 patch grid.
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                  spatial_merge_size=merge, temporal_patch_size=2, in_channels=3, out_hidden_size=hidden_size,
                  num_position_embeddings=36, deepstack_visual_indexes=list(deepstack_layers))
    config = transformers.Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Qwen3VLForConditionalGeneration(config).eval()
    spread_weights(model)
    with torch.no_grad():  # norm weights away from 1, so that parity tests see each norm (q_norm, k_norm) matter
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    factor = patch * merge
    processor = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                 "patch_size": patch, "temporal_patch_size": 2, "merge_size": merge}
    (out / "preprocessor_config.json").write_text(json.dumps(
        {**processor, "size": {"shortest_edge": factor * factor, "longest_edge": side * side},
         "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor"}, indent=2))
    # Qwen3-VL's video size is a budget for the whole clip (frames x pixels); max_video_tokens caps one frame.
    (out / "video_preprocessor_config.json").write_text(json.dumps(
        {**processor, "size": {"shortest_edge": factor * factor, "longest_edge": side * side * 256},
         "max_video_tokens": (side // factor) ** 2, "fps": 2.0, "min_frames": 4, "max_frames": 256,
         "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor"}, indent=2))
    (out / "streamvlm_tiny.json").write_text(json.dumps({"random_weights": True, "family": "qwen3_vl", "seed": seed,
                                                          "side": side}, indent=2))
    logger.info("wrote a random qwen3_vl checkpoint to %s", out)
    return out
