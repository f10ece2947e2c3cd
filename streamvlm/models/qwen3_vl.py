"""Qwen3-VL: a ViT over 16 px patches of frame pairs with learned position embeddings (resampled to the
frame's patch grid), a 2x2 patch merger, DeepStack mergers on a few tower blocks, and a Qwen3 decoder (per-head
q/k RMSNorm) with interleaved 3-D multimodal RoPE.

Frames are folded in pairs as in Qwen2.5-VL (see streamvlm.models.qwen2_5_vl). What differs:

- Time is text, not a position. transformers' Qwen3VLProcessor replaces the chat template's <|video_pad|>
  (the template writes <|vision_start|><|video_pad|><|vision_end|>, and that outer pair stays) with, per
  pair of frames,

      <{t:.1f} seconds><|vision_start|><|video_pad|> * tokens_per_frame<|vision_end|>

  where t is the mean of the pair's two frame times (a padded last pair: its one frame's time). A video
  therefore reads <|vision_start|><0.2 seconds><|vision_start|>...<|vision_end|><1.2 seconds>...<|vision_end|>
  <|vision_end|>. Times here are seconds of the stream (transformers: frame index / the source's fps).
- Each pair is its own M-RoPE grid with temporal extent 1 (get_rope_index splits the video's grid): its
  tokens sit at (s, s + row, s + col), s the position right after the text before the pair, and the text
  after it continues at s + max(rows, cols), the largest position + 1, as the session places text.
- DeepStack: the features of tower blocks deepstack_visual_indexes, each through its own merger, are added to
  the vision tokens' hidden states after decoder layers 0, 1, ...; frame_features returns them after the
  merged tokens on the last dimension.

Frames are resized to a square whose side is a multiple of patch_size * merge_size (448 px, 14 x 14 = 196
tokens a pair, unless the checkpoint's per-frame token cap max_video_tokens is smaller). transformers'
processor keeps the aspect ratio and scales frames to a pixel budget for the whole clip, which changes the
grid per video and cannot be streamed into a fixed token layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from streamvlm.models.base import VisionShape
from streamvlm.models.qwen2_5_vl import Qwen2VLAdapter, frame_side, grid_rope
from streamvlm.video.preprocess import PreprocessConfig

MAX_VIDEO_TOKENS = 768
"""Qwen3VLVideoProcessor's default per-frame token ceiling (max_video_tokens)."""


def qwen3_preprocess_config(model_dir: Path, factor: int) -> PreprocessConfig:
    """Square resize, rescale and normalisation (default 0.5 / 0.5, as Qwen3VLVideoProcessor) as the checkpoint's
    video (or image) processor config says; the side is the largest multiple of `factor` up to 448 whose
    frame stays within max_video_tokens merged tokens."""
    cfg = {}
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (model_dir / name).is_file():
            cfg = json.loads((model_dir / name).read_text())
            break
    max_pixels = int(cfg.get("max_video_tokens") or MAX_VIDEO_TOKENS) * factor * factor
    return PreprocessConfig(
        height=frame_side(max_pixels, factor), width=frame_side(max_pixels, factor),
        mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))), std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255)), resample="bicubic",
        do_rescale=bool(cfg.get("do_rescale", True)), do_normalize=bool(cfg.get("do_normalize", True)))


def vision_flops_per_step(v, out_hidden: int, patches: int) -> float:
    """Analytic FLOPs (multiply-add = 2) of Qwen3-VL's tower, merger and DeepStack mergers for one temporal step
    of `patches` patches (attention is full within a step)."""
    d, inter = v.hidden_size, v.intermediate_size
    total = 2 * patches * (v.in_channels * v.temporal_patch_size * v.patch_size**2) * d
    total += v.depth * (2 * patches * d * d * 4 + 2 * patches * d * inter * 2 + 4 * patches * patches * d)
    merge = v.spatial_merge_size**2
    merged = patches // merge
    per_merger = 2 * merged * (d * merge) ** 2 + 2 * merged * (d * merge) * out_hidden
    return float(total + per_merger * (1 + len(v.deepstack_visual_indexes)))


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_class = "Qwen3VLForConditionalGeneration"

    @classmethod
    def preprocess_for(cls, model_dir: Path, factor: int) -> PreprocessConfig:
        return qwen3_preprocess_config(model_dir, factor)

    @classmethod
    def vision_shape(cls, config, side: int) -> VisionShape:
        v = config.vision_config
        rows = side // (v.patch_size * v.spatial_merge_size)
        return VisionShape(grid=(rows, rows), deepstack=len(v.deepstack_visual_indexes),
                           vision_flops_per_frame=vision_flops_per_step(v, config.text_config.hidden_size,
                                                                        (side // v.patch_size) ** 2))

    def frame_features(self, pixels: torch.Tensor) -> torch.Tensor:
        # Steps are independent in the tower (attention and position embeddings are per step), so a video
        # encoded in pieces equals it encoded whole.
        flat, grid = self.patches(pixels)
        out = self.model.model.get_video_features(flat, grid, return_dict=True)
        merged = torch.cat(out.pooler_output)  # (steps * tokens_per_frame, d), steps in order, rows row-major
        stacks = [torch.cat(feature) for feature in out.deepstack_features]  # deepstack x (steps * tpf, d)
        feats = torch.cat([merged, *stacks], dim=-1)  # (steps * tpf, d * (1 + deepstack))
        return feats.view(pixels.shape[0] // self.frames_per_step, self.vision.tokens_per_frame, -1)

    def frame_text(self, index: int, seconds: float) -> tuple[str, str]:
        # seconds: the pair's mean frame time, as the processor stamps it. The markers as Qwen3VLProcessor names
        # them: the tokenizer's, else Qwen's own.
        start = getattr(self.tokenizer, "vision_start_token", None) or "<|vision_start|>"
        end = getattr(self.tokenizer, "vision_end_token", None) or "<|vision_end|>"
        return f"<{seconds:.1f} seconds>{start}", end

    def vision_rope(self, start: int, video_start: int, index: int, elapsed: float) -> torch.Tensor:
        # Every pair is a grid of temporal extent 1 starting at the position after the text before it.
        return grid_rope(self.vision.grid, start, start)
