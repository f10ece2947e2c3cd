"""The built-in sample video, a scene of the procedural world (`streamvlm.world`), drawn with torch and
cached on first use, so examples run offline and the built-in model, trained on that world, has something
to answer about.

Content (8 s at 8 fps, 256x256, 64 frames, deterministic), in unit coordinates (x right, y down):
- a big red square moving right along y = 0.3, from x = 0.2 to 0.76, the whole time;
- a small green triangle moving left along y = 0.75, from x = 0.75, until it leaves at second 4.5;
- a small blue circle that appears at second 3 at (0.3, 0.85) and moves up, to y = 0.6 at the end.

At the end: two objects; the first (and only) object that left was green.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.paths import cache_dir
from streamvlm.video.files import write_atomic, write_video
from streamvlm.world import WorldObject, WorldVideo, render

log = logging.getLogger(__name__)

_SIZE = 256
_FPS = 8
_SECONDS = 8
SCENE = WorldVideo.of((
    WorldObject("red", "square", "big", "right", start=(0.2, 0.3), speed=0.07, appear=0.0, leave=None),
    WorldObject("green", "triangle", "small", "left", start=(0.75, 0.75), speed=0.06, appear=0.0, leave=4.5),
    WorldObject("blue", "circle", "small", "up", start=(0.3, 0.85), speed=0.05, appear=3.0, leave=None),
), seconds=_SECONDS)


SAMPLE_NAME = "world-sample.mp4"
"""The sample's file in the cache folder. A new name whenever the content changes: a file is reused as it
is, and an older version's sample left in the cache (another scene) must not be taken for this one."""


def sample_video(path: Path | None = None) -> Path:
    """Path of the sample video (default `cache_dir()/world-sample.mp4`), written on first use."""
    target = Path(path) if path is not None else cache_dir() / SAMPLE_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    try:
        write_atomic(target, lambda tmp: write_video(tmp, _draw_sample(), fps=_FPS, codec="mpeg4"))
    except OSError as e:
        raise StreamVLMError(
            f"cannot write the sample video in {target.parent} ({e}); set STREAMVLM_CACHE to a writable folder"
        ) from e
    log.info("wrote the sample video to %s", target)
    return target


def _draw_sample() -> torch.Tensor:
    """uint8 (64, 256, 256, 3): the sample's frames."""
    return render(SCENE, _SIZE, _FPS)


def source_spec(spec: str) -> str:
    """A live source spec with `sample` replaced by the sample video's path (sources know no world)."""
    return str(sample_video()) if spec == "sample" else spec
