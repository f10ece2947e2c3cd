"""Synthetic training videos whose answers are exact: a coloured shape moving over a plain background.

Each video shows one square or circle of a palette colour that moves in a straight line (left, right,
up or down) across the frame at constant speed. The records ask what colour and shape it is and which
way it moves; the answers are the generation parameters, so a model that learns them has learned to
read the video. Everything is drawn with torch and is deterministic for a seed.

Files written under out_dir:
    videos/NNNN.mp4     the videos
    train.json          LLaVA-style records (a JSON list), all frames before the questions
    stream.jsonl        with streaming=True: the same questions as streaming records, asked over time
    synthetic.json      the generation parameters, written last: a folder holding it is complete
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.video.files import write_atomic, write_video

log = logging.getLogger(__name__)

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 50),
}
"""Shape colours, RGB; far apart from each other and from the background."""
BACKGROUND = (64, 64, 64)
SHAPES = ("square", "circle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
"""Direction -> (dx, dy) in image coordinates (y grows downwards)."""
QUESTIONS = {
    "colour": "What colour is the shape?",
    "direction": "Which way does it move?",
    "shape": "What shape is it?",
}
RECORD_FILE = "train.json"
STREAM_FILE = "stream.jsonl"
_MANIFEST = "synthetic.json"


@dataclass(frozen=True)
class ShapeVideo:
    """What one synthetic video shows."""

    colour: str
    """A PALETTE name."""
    shape: str
    """"square" or "circle"."""
    direction: str
    """A DIRECTIONS name."""
    start: tuple[float, float]
    """(x, y) centre on the first frame, pixels."""
    end: tuple[float, float]
    """(x, y) centre on the last frame, pixels."""
    radius: float
    """Half the square's side, or the circle's radius, pixels."""

    def answer(self, topic: str) -> str:
        return {"colour": self.colour, "direction": self.direction, "shape": self.shape}[topic]


def generate(
    out_dir: str | os.PathLike,
    num_videos: int,
    seed: int,
    fps: int = 8,
    seconds: int = 4,
    size: int = 64,
    streaming: bool = False,
) -> Path:
    """Write num_videos videos and their records under out_dir; returns the path of train.json.

    Deterministic for (num_videos, seed, fps, seconds, size, streaming); a folder already generated with
    the same parameters is reused as it is.
    """
    if num_videos < 1:
        raise StreamVLMError(f"synthetic: num_videos must be at least 1, got {num_videos}")
    if size < 16 or size % 2:
        raise StreamVLMError(f"synthetic: size must be even and at least 16 pixels, got {size}")
    if fps < 1 or seconds < 1:
        raise StreamVLMError(f"synthetic: fps and seconds must be at least 1, got fps={fps}, seconds={seconds}")
    out = Path(out_dir).expanduser()
    params = {"num_videos": num_videos, "seed": seed, "fps": fps, "seconds": seconds, "size": size,
              "streaming": streaming}
    if _complete(out, params):
        return out / RECORD_FILE
    (out / _MANIFEST).unlink(missing_ok=True)  # until rewritten at the end, the folder is incomplete
    videos = [draw_parameters(random.Random(seed * 1_000_003 + index), size) for index in range(num_videos)]
    for index, video in enumerate(videos):
        _atomic_video(out / _video_name(index), render(video, size, fps * seconds), fps)
    records = [_llava_record(seed, index, video) for index, video in enumerate(videos)]
    _atomic_text(out / RECORD_FILE, json.dumps(records, indent=1))
    if streaming:
        lines = [json.dumps(_stream_record(seed, index, video, seconds)) for index, video in enumerate(videos)]
        _atomic_text(out / STREAM_FILE, "\n".join(lines) + "\n")
    _atomic_text(out / _MANIFEST, json.dumps(params))
    log.info("wrote %d synthetic videos to %s", num_videos, out)
    return out / RECORD_FILE


def draw_parameters(rng: random.Random, size: int) -> ShapeVideo:
    """Random colour, shape and straight path across a size x size frame."""
    radius = size / 8
    margin = radius + 2
    direction = rng.choice(sorted(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    across = rng.uniform(margin, size - margin)  # the coordinate that stays fixed
    first, last = (margin, size - margin) if dx + dy > 0 else (size - margin, margin)
    start, end = ((first, across), (last, across)) if dx else ((across, first), (across, last))
    return ShapeVideo(rng.choice(sorted(PALETTE)), rng.choice(SHAPES), direction, start, end, radius)


def render(video: ShapeVideo, size: int, count: int) -> torch.Tensor:
    """uint8 (count, size, size, 3): the shape moving at constant speed from start to end."""
    progress = (torch.arange(count, dtype=torch.float64) / max(count - 1, 1)).view(-1, 1, 1)  # (T, 1, 1)
    cx = video.start[0] + (video.end[0] - video.start[0]) * progress
    cy = video.start[1] + (video.end[1] - video.start[1]) * progress
    coords = torch.arange(size, dtype=torch.float64) + 0.5  # pixel centres
    x, y = coords.view(1, 1, -1), coords.view(1, -1, 1)  # (1, 1, W), (1, H, 1)
    if video.shape == "square":
        mask = ((x - cx).abs() < video.radius) & ((y - cy).abs() < video.radius)  # (T, H, W)
    else:
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= video.radius**2
    frames = torch.tensor(BACKGROUND, dtype=torch.uint8).expand(count, size, size, 3).clone()
    frames[mask] = torch.tensor(PALETTE[video.colour], dtype=torch.uint8)
    return frames


def _video_name(index: int) -> str:
    return f"videos/{index:04d}.mp4"


def _topics(seed: int, index: int) -> list[str]:
    """The question order of one video (varied, so the answer's position teaches nothing)."""
    topics = sorted(QUESTIONS)
    random.Random(seed * 1_000_003 + index + 7).shuffle(topics)
    return topics


def _llava_record(seed: int, index: int, video: ShapeVideo) -> dict:
    turns = []
    for n, topic in enumerate(_topics(seed, index)):
        question = QUESTIONS[topic]
        turns.append({"from": "human", "value": f"<video>\n{question}" if n == 0 else question})
        turns.append({"from": "gpt", "value": video.answer(topic)})
    return {"id": f"synthetic-{seed}-{index:04d}", "video": _video_name(index), "conversations": turns,
            "meta": asdict(video)}


def _stream_record(seed: int, index: int, video: ShapeVideo, seconds: int) -> dict:
    """Question k is asked at (k + 1/4) / 3 of the video and answered at (k + 3/4) / 3."""
    messages = []
    for k, topic in enumerate(_topics(seed, index)):
        messages.append({"role": "user", "content": QUESTIONS[topic], "time": round(seconds * (k + 0.25) / 3, 3)})
        messages.append({"role": "assistant", "content": video.answer(topic),
                         "time": round(seconds * (k + 0.75) / 3, 3)})
    return {"id": f"synthetic-stream-{seed}-{index:04d}", "video": _video_name(index), "conversation": messages,
            "meta": asdict(video)}


def _complete(out: Path, params: dict) -> bool:
    """Whether out already holds a complete set generated with params."""
    try:
        if json.loads((out / _MANIFEST).read_text()) != params:
            return False
    except (OSError, ValueError):
        return False
    names = [_video_name(i) for i in range(params["num_videos"])] + [RECORD_FILE]
    names += [STREAM_FILE] if params["streaming"] else []
    return all((out / name).is_file() for name in names)


def _atomic_video(path: Path, frames: torch.Tensor, fps: int) -> None:
    write_atomic(path, lambda tmp: write_video(tmp, frames, fps=fps, codec="mpeg4"))


def _atomic_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
