"""Where streamvlm keeps files it makes (the sample video, tiny checkpoints, feature caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$STREAMVLM_CACHE`, else `$XDG_CACHE_HOME/streamvlm`, else `~/.cache/streamvlm` (not created here)."""
    if os.environ.get("STREAMVLM_CACHE"):
        return Path(os.environ["STREAMVLM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "streamvlm"
