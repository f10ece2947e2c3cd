"""The built-in default model: what commands use when no --model is given.

For now it is a small random LLaVA-OneVision checkpoint written to the user's cache directory on first
use. It has not been trained, so its answers are noise; it shows the runtime working offline.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from streamvlm.video.sample import cache_dir

logger = logging.getLogger(__name__)

UNTRAINED_NOTICE = ("note: the built-in model has random, untrained weights, so its answers are noise; "
                    "pass --model DIR for a real checkpoint")


def default_model_dir() -> Path:
    """The built-in checkpoint, created on first use (atomically: a crash never leaves half a folder)."""
    from streamvlm.tiny import TinySpec, write_tiny_checkpoint

    target = cache_dir() / "builtin-tiny-llava-onevision"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".builtin-", dir=target.parent))
    try:
        # 56 px frames in 8 px patches: a 7x7 grid pooled to 4x4 = 16 tokens per frame.
        write_tiny_checkpoint(tmp, TinySpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                            intermediate_size=256, image_size=56, patch_size=8))
        try:
            os.replace(tmp, target)
        except OSError:  # another process made it first
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote the built-in model to %s", target)
    return target


def is_builtin(model_dir: str | Path) -> bool:
    return Path(model_dir).resolve() == (cache_dir() / "builtin-tiny-llava-onevision").resolve()
