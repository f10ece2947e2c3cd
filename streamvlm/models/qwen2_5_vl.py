"""Qwen2-VL and Qwen2.5-VL: a ViT over 14 px patches of frame pairs, a 2x2 patch merger, a Qwen2 decoder
with 3-D multimodal RoPE.

Frames are folded in pairs (the tower's temporal patch is 2 frames deep), so one frame of tokens covers two
input frames; the session holds an odd frame until its pair arrives and, at a question, pairs it with a
copy of itself, as transformers' video processor pads an odd frame count. Each pair is one temporal step
of the video's grid: its tokens sit at rope positions (t, row, col) from the video's start, where t is the
pair index (Qwen2-VL) or the pair's time in `tokens_per_second` units (Qwen2.5-VL's absolute time).

Frames are resized to a square whose side is a multiple of patch_size * merge_size (448 px, 16 x 16 = 256
tokens a pair, unless the checkpoint's max_pixels is smaller); transformers' processor keeps the aspect
ratio instead, which changes the grid per video and cannot be streamed into a fixed token layout.

The chat template writes <|vision_start|><|video_pad|><|vision_end|>; the placeholder becomes the frames'
tokens and nothing closes a video but the template's own <|vision_end|>.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.models.base import DecoderParts, FamilyAdapter, VisionShape, standard_decoder_parts
from streamvlm.video.preprocess import PreprocessConfig

DEFAULT_SIDE = 448
"""Frame side in pixels when the checkpoint allows it (256 tokens per pair of frames)."""

# OpenAI CLIP normalisation, which Qwen-VL's processors use when the config names none.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def frame_side(max_pixels: int, factor: int, default: int = DEFAULT_SIDE) -> int:
    """The largest multiple of `factor` up to `default` whose square fits in max_pixels (at least factor)."""
    side = min(default, math.isqrt(max_pixels)) // factor * factor
    return max(side, factor)


def qwen_preprocess_config(model_dir: Path, factor: int) -> PreprocessConfig:
    """Square resize, rescale and CLIP normalisation as the checkpoint's video (or image) processor config
    says; the side comes from its max_pixels (see frame_side)."""
    cfg = {}
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (model_dir / name).is_file():
            cfg = json.loads((model_dir / name).read_text())
            break
    size = cfg.get("size") or {}
    max_pixels = int(cfg.get("max_pixels") or size.get("longest_edge") or DEFAULT_SIDE**2)
    side = frame_side(max_pixels, factor)
    return PreprocessConfig(
        height=side, width=side, mean=tuple(cfg.get("image_mean", _CLIP_MEAN)), std=tuple(cfg.get("image_std", _CLIP_STD)),
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255)), resample="bicubic",
        do_rescale=bool(cfg.get("do_rescale", True)), do_normalize=bool(cfg.get("do_normalize", True)))


def patchify(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, C, H, W) frames, T a multiple of `temporal` -> flat patches (T/temporal * H/patch * W/patch,
    C * temporal * patch * patch) and the grid (t, h, w), in the order transformers' Qwen-VL video processors
    give them: per temporal step, merge x merge blocks row by row, each block's patches row by row."""
    frames, channels, height, width = pixels.shape
    t, h, w = frames // temporal, height // patch, width // patch
    x = pixels.reshape(t, temporal, channels, h // merge, merge, patch, w // merge, merge, patch)
    # (t, block row, block col, row in block, col in block, C, temporal, patch y, patch x)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, channels * temporal * patch * patch), (t, h, w)


def grid_rope(grid: tuple[int, int], origin: int, t: int) -> torch.Tensor:
    """(3, rows * cols) M-RoPE positions of a frame's tokens, row-major: (t, origin + row, origin + col)."""
    rows, cols = grid
    r = torch.arange(rows).repeat_interleave(cols) + origin
    c = torch.arange(cols).repeat(rows) + origin
    return torch.stack([torch.full_like(r, t), r, c])


def _vision_flops_per_step(v, out_hidden: int, patches: int, windowed: bool) -> float:
    """Analytic FLOPs (multiply-add = 2) of the tower and merger for one temporal step of `patches` patches."""
    d = v.hidden_size if windowed else v.embed_dim
    inter = v.intermediate_size if windowed else d * v.mlp_ratio
    mlp_mats = 3 if windowed else 2  # Qwen2.5-VL: gated SiLU MLP; Qwen2-VL: fc1/fc2
    merge = v.spatial_merge_size**2
    embed = 2 * patches * (v.in_channels * v.temporal_patch_size * v.patch_size**2) * d
    window = min(patches, (v.window_size // v.patch_size) ** 2) if windowed else patches
    full = set(v.fullatt_block_indexes) if windowed else set(range(v.depth))
    total = embed
    for layer in range(v.depth):
        keys = patches if layer in full else window
        total += 2 * patches * d * d * 4 + 2 * patches * d * inter * mlp_mats + 4 * patches * keys * d
    merged = patches // merge
    total += 2 * merged * (d * merge) ** 2 + 2 * merged * (d * merge) * out_hidden
    return float(total)


class Qwen2VLAdapter(FamilyAdapter):
    family = "qwen2_vl"
    frames_per_step = 2
    mrope = True
    assumed_fps = 2.0
    model_class = "Qwen2VLForConditionalGeneration"
    vision_tower_path = "model.visual"
    windowed_tower = False

    @classmethod
    def load(cls, model_dir: Path, dtype: torch.dtype, device: torch.device, tokenizer) -> Qwen2VLAdapter:
        model = cls.load_frozen(cls.model_class, model_dir, dtype, device)
        v = model.config.vision_config
        if v.temporal_patch_size != cls.frames_per_step:
            raise StreamVLMError(f"{model_dir}: temporal_patch_size {v.temporal_patch_size} is not supported "
                                 f"(streamvlm pairs frames, {cls.frames_per_step} per step)")
        preprocess = cls.preprocess_for(model_dir, v.patch_size * v.spatial_merge_size)
        vision = cls.vision_shape(model.config, preprocess.height)
        video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        adapter = cls(model_dir, model, tokenizer, preprocess, cls.decoder_parts(model), vision, video_token)
        adapter.assumed_fps = cls._processor_fps(model_dir)
        return adapter

    @classmethod
    def preprocess_for(cls, model_dir: Path, factor: int) -> PreprocessConfig:
        return qwen_preprocess_config(model_dir, factor)

    @classmethod
    def vision_shape(cls, config, side: int) -> VisionShape:
        v = config.vision_config
        rows = side // (v.patch_size * v.spatial_merge_size)
        return VisionShape(grid=(rows, rows), vision_flops_per_frame=_vision_flops_per_step(
            v, config.text_config.hidden_size, (side // v.patch_size) ** 2, cls.windowed_tower))

    @classmethod
    def _processor_fps(cls, model_dir: Path) -> float:
        path = model_dir / "video_preprocessor_config.json"
        fps = json.loads(path.read_text()).get("fps") if path.is_file() else None
        return float(fps) if fps else cls.assumed_fps

    @staticmethod
    def decoder_parts(model) -> DecoderParts:
        """The Qwen2 (Qwen3 for Qwen3-VL) decoder's modules; call again after something replaces them."""
        return standard_decoder_parts(model.model.language_model, model.config.text_config, model.lm_head)

    def patches(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 3, h, w) preprocessed frames -> transformers' pixel_values_videos and video_grid_thw (1, 3)."""
        v = self.model.config.vision_config
        flat, grid = patchify(pixels, v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
        return flat, torch.tensor([grid], device=pixels.device)

    def frame_features(self, pixels: torch.Tensor) -> torch.Tensor:
        # One video of T/2 temporal steps: the tower attends within a step only (its attention windows and
        # full-attention blocks are per step), so steps encoded together equal steps encoded one by one.
        flat, grid = self.patches(pixels)
        out = self.model.model.get_video_features(flat, grid, return_dict=True)
        feats = torch.cat(out.pooler_output)  # (steps * tokens_per_frame, d), steps in order, rows row-major
        return feats.view(pixels.shape[0] // self.frames_per_step, self.vision.tokens_per_frame, -1)

    def video_tail(self) -> torch.Tensor:
        return self.decoder.embed_tokens.weight.new_zeros(0, self.decoder.hidden_size)

    def temporal_position(self, index: int, elapsed: float) -> int:
        """Qwen2-VL: the step index."""
        return index

    def vision_rope(self, start: int, video_start: int, index: int, elapsed: float) -> torch.Tensor:
        # Every pair of a video shares the video's grid origin; time moves only the temporal axis.
        return grid_rope(self.vision.grid, video_start, video_start + self.temporal_position(index, elapsed))


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    windowed_tower = True

    def temporal_position(self, index: int, elapsed: float) -> int:
        """Qwen2.5-VL: absolute time, tokens_per_second positions a second (floored, as transformers)."""
        return int(elapsed * self.model.config.vision_config.tokens_per_second)
