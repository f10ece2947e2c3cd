"""Frame preprocessing in torch: resize, rescale, normalize, as the checkpoint's processor config says.

torchvision has no CPU build here, so this is plain torch. It follows what transformers' fast video
processors do to uint8 frames: resize the uint8 image (antialiased, rounded back to 0..255), then
rescale and normalize in float.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from streamvlm.errors import StreamVLMError

# PIL resample codes used in processor configs -> torch interpolate modes.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class PreprocessConfig:
    """What a checkpoint's `video_preprocessor_config.json` (or `preprocessor_config.json`) asks for."""

    height: int
    """Output height in pixels."""
    width: int
    """Output width in pixels."""
    mean: tuple[float, float, float]
    """Per-channel mean subtracted after rescaling."""
    std: tuple[float, float, float]
    """Per-channel std divided after subtracting the mean."""
    rescale_factor: float = 1 / 255
    """Multiplies pixel values before normalizing."""
    resample: str = "bicubic"
    """torch interpolate mode for resizing."""
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self):
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"output size must be positive, got {self.height}x{self.width}")
        if self.resample not in _RESAMPLE.values():
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE.values())}, got {self.resample!r}")

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> PreprocessConfig:
        model_dir = Path(model_dir)
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = model_dir / name
            if path.is_file():
                return cls.from_dict(json.loads(path.read_text()))
        raise StreamVLMError(
            f"{model_dir} has no video_preprocessor_config.json or preprocessor_config.json; a checkpoint "
            "needs one to say how frames are resized and normalized")

    @classmethod
    def from_dict(cls, cfg: dict) -> PreprocessConfig:
        size = cfg.get("size") or {}
        if "height" in size and "width" in size:
            height, width = size["height"], size["width"]
        elif "shortest_edge" in size:
            # LLaVA-OneVision videos are resized to a square of the short-edge size.
            height = width = size["shortest_edge"]
        else:
            raise StreamVLMError(f"preprocessor config has an unsupported size {size!r}")
        return cls(
            height=int(height), width=int(width),
            mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))), std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            resample=_RESAMPLE.get(int(cfg.get("resample", 3)), "bicubic"),
            do_resize=bool(cfg.get("do_resize", True)), do_rescale=bool(cfg.get("do_rescale", True)),
            do_normalize=bool(cfg.get("do_normalize", True)),
        )


FrameInput = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


def as_frame_tensor(frames: FrameInput) -> torch.Tensor:
    """Validate user frames and return a uint8 tensor (T, H, W, 3)."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise StreamVLMError("no frames given: pass at least one frame, uint8 of shape (H, W, 3)")
        shapes = {tuple(f.shape) for f in frames}
        if len(shapes) > 1:
            raise StreamVLMError(f"frames in one call must share a shape, got {sorted(shapes)}")
        frames = torch.stack([torch.as_tensor(np.asarray(f)) if isinstance(f, np.ndarray) else f for f in frames])
    elif isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise StreamVLMError(f"frames must be a uint8 tensor or array (T, H, W, 3), got {type(frames).__name__}")
    if frames.dim() == 3:
        frames = frames[None]
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise StreamVLMError(
            f"frames must have shape (T, H, W, 3) with RGB last, got {tuple(frames.shape)}; "
            "convert channels-first frames with frames.permute(0, 2, 3, 1)")
    if frames.shape[0] == 0:
        raise StreamVLMError("no frames given: the frame tensor has T = 0")
    if frames.dtype != torch.uint8:
        raise StreamVLMError(
            f"frames must be uint8 (0..255), got {frames.dtype}; convert with (x * 255).round().to(torch.uint8) "
            "if they are floats in 0..1")
    if frames.shape[1] < 2 or frames.shape[2] < 2:
        raise StreamVLMError(f"frames of {frames.shape[1]}x{frames.shape[2]} pixels are too small to resize")
    return frames


def resize_frames(frames: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> uint8 (T, cfg.height, cfg.width, 3), as `preprocess` resizes (the same op, so
    resizing first and preprocessing after gives the same pixels). Frames already that size, or a config
    that does not resize, come back as they are."""
    if not cfg.do_resize or tuple(frames.shape[1:3]) == (cfg.height, cfg.width):
        return frames
    # One channel plane at a time: interpolate treats planes alike and apart, so the pixels are the same, and
    # the float copy of a large frame is a third the size (48 MB rather than 144 MB for 4000x3000).
    planes = [_resize(frames[..., c][:, None], cfg).to(torch.uint8) for c in range(frames.shape[-1])]
    return torch.cat(planes, dim=1).permute(0, 2, 3, 1).contiguous()


def resize_frame(frame: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """One uint8 frame (H, W, 3) -> uint8 (cfg.height, cfg.width, 3); see resize_frames."""
    return resize_frames(frame[None], cfg)[0]


def _resize(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """(T, 3, H, W) -> float (T, 3, cfg.height, cfg.width) holding whole values 0..255."""
    # Resize in float then round back to uint8 values, as a uint8 image resize does.
    antialias = cfg.resample in ("bilinear", "bicubic")
    y = F.interpolate(x.float(), size=(cfg.height, cfg.width), mode=cfg.resample, antialias=antialias,
                      **({} if cfg.resample == "nearest" else {"align_corners": False}))
    return y.round_().clamp_(0, 255)


def preprocess(frames: FrameInput, cfg: PreprocessConfig, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (T, 3, cfg.height, cfg.width)."""
    x = as_frame_tensor(frames).to(device).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    if cfg.do_resize and tuple(x.shape[-2:]) != (cfg.height, cfg.width):
        x = _resize(x, cfg)
    x = x.to(torch.float32)
    if cfg.do_rescale:
        x = x * cfg.rescale_factor
    if cfg.do_normalize:
        mean = torch.tensor(cfg.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.to(dtype)
