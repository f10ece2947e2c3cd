"""The built-in sample video, drawn with torch and cached on first use, so examples run offline.

Content (8 s at 8 fps, 256x256, 64 frames, deterministic):
- background: dark teal at the top shading lighter downwards, brightening over time;
- a red 48x48 square moving left to right along the top (x from 8 to 200, y 40..88);
- a blue disc of radius 32 centred at (x=176, y=176), appearing at second 3;
- a white progress bar along the bottom (y 232..244) growing from empty to full.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.video.files import write_video

log = logging.getLogger(__name__)

_SIZE = 256
_FPS = 8
_SECONDS = 8
_SQUARE = 48
_DISC_AT = 3.0  # seconds


def cache_dir() -> Path:
    """`$STREAMVLM_CACHE`, else `$XDG_CACHE_HOME/streamvlm`, else `~/.cache/streamvlm` (not created here)."""
    if os.environ.get("STREAMVLM_CACHE"):
        return Path(os.environ["STREAMVLM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "streamvlm"


def sample_video(path: Path | None = None) -> Path:
    """Path of the sample video (default `cache_dir()/sample.mp4`), written on first use."""
    target = Path(path) if path is not None else cache_dir() / "sample.mp4"
    if target.is_file() and target.stat().st_size > 0:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sample-", suffix=target.suffix or ".mp4", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise StreamVLMError(
            f"cannot write the sample video in {target.parent} ({e}); set STREAMVLM_CACHE to a writable folder"
        ) from e
    # written beside the target and renamed: a crash never leaves a half-written sample, and two
    # processes racing both end with a complete file
    try:
        write_video(tmp, _draw_sample(), fps=_FPS, codec="mpeg4")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("wrote the sample video to %s", target)
    return target


def _draw_sample() -> torch.Tensor:
    """uint8 (64, 256, 256, 3): the sample's frames, all drawn at once (few large ops, not 64x many small)."""
    count = _FPS * _SECONDS
    index = torch.arange(count).view(-1, 1, 1)  # (T, 1, 1)
    progress = index / (count - 1)  # 0 on the first frame, 1 on the last
    y = torch.arange(_SIZE).view(1, -1, 1)  # (1, H, 1)
    x = torch.arange(_SIZE).view(1, 1, -1)  # (1, 1, W)

    ramp = (y * 60 // _SIZE).unsqueeze(-1) * torch.tensor([0, 1, 1])  # (1, H, 1, 3): lighter downwards
    shade = (40 * progress).long().unsqueeze(-1)  # (T, 1, 1, 1): lighter over time
    background = torch.tensor([20, 60, 70]) + ramp + shade  # (T, H, 1, 3)
    frames = background.to(torch.uint8).expand(count, _SIZE, _SIZE, 3).clone()

    left = 8 + ((_SIZE - 16 - _SQUARE) * progress).round().long()  # (T, 1, 1)
    square = (y >= 40) & (y < 40 + _SQUARE) & (x >= left) & (x < left + _SQUARE)  # (T, H, W)
    frames[square] = torch.tensor([220, 30, 30], dtype=torch.uint8)
    disc = ((x - 176) ** 2 + (y - 176) ** 2 <= 32**2) & (index >= _DISC_AT * _FPS)
    frames[disc] = torch.tensor([30, 60, 220], dtype=torch.uint8)
    bar = (y >= 232) & (y < 244) & (x >= 8) & (x < 8 + ((_SIZE - 16) * progress).round().long())
    frames[bar] = 255
    return frames
