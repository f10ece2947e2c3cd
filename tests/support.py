"""Helpers shared by the tests: tiny checkpoint shapes, frames, transformers' reference inputs, and small
video files whose frames say which frame they are."""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from unittest import mock

import av
import numpy as np
import torch

from streamvlm.tiny import TinySpec
from streamvlm.tiny.families import write_tiny_family

# Several tiny shapes: grouped-query attention, an odd patch grid (pooling rounds up: 5x5 -> 3x3),
# multi-query attention with more layers, and full multi-head attention.
SPECS = {
    "gqa": TinySpec(),
    "odd_grid_mha": TinySpec(hidden_size=96, num_layers=3, num_heads=6, num_kv_heads=6, intermediate_size=160,
                             image_size=35, patch_size=7, seed=1),
    "mqa_deep": TinySpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=1, intermediate_size=256,
                         vision_hidden_size=48, image_size=42, patch_size=7, vocab_size=512, seed=2),
}


def feed_in_chunks(session, frames: torch.Tensor, chunking: list[int]) -> None:
    """Append `frames` to `session` in consecutive groups of the given sizes."""
    start = 0
    for size in chunking:
        session.append_frames(frames[start:start + size])
        start += size


def random_frames(count: int, height: int = 40, width: int = 52, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, height, width, 3), dtype=torch.uint8, generator=g)


class _VideoProcessorStandIn:
    """transformers' LLaVA-OneVision video processor needs torchvision, which has no CPU build here. The
    processor's own text expansion and tokenization still run; this stand-in hands it our pixels."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels

    def __call__(self, videos, **kwargs):
        from transformers import BatchFeature

        return BatchFeature({"pixel_values_videos": self.pixels[None]})


def hf_inputs(model_dir, pixels: torch.Tensor, prompt: str, preface: tuple[str, ...] = (),
              chat_template: str | None = None) -> dict:
    """input_ids and pixel_values_videos as transformers' LlavaOnevisionProcessor builds them for a user
    message of the preface's text parts, the video and the prompt (with the checkpoint's chat template, or
    the one given)."""
    from transformers import AutoTokenizer, LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    tok = AutoTokenizer.from_pretrained(model_dir)
    num_image_tokens = json.loads((model_dir / "processor_config.json").read_text())["num_image_tokens"]
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        proc = LlavaOnevisionProcessor(image_processor=None, tokenizer=tok,
                                       video_processor=_VideoProcessorStandIn(pixels),
                                       num_image_tokens=num_image_tokens, vision_feature_select_strategy="full",
                                       chat_template=chat_template or tok.chat_template)
    content = [{"type": "text", "text": text} for text in preface] + [{"type": "video"}]
    conversation = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    out = proc(text=text, videos=[pixels.numpy()], return_tensors="pt")
    return {"input_ids": out["input_ids"], "pixel_values_videos": out["pixel_values_videos"]}


# ---------------------------------------------------------------- video files

FPS = 8
N = 24  # 3 s at 8 fps
STEP = 10  # frame i has red = STEP * i: the index survives the codec in a flat colour


def indexed_frames(n: int = N, height: int = 48, width: int = 64, noise: bool = False) -> np.ndarray:
    """uint8 (n, H, W, 3): frame i is flat red=10i, green=255-10i, blue=128 (noise in the lower right)."""
    frames = np.zeros((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i] = (STEP * i, 255 - STEP * i, 128)
    if noise:  # makes packets large enough to cut a file inside one
        rng = np.random.default_rng(0)
        frames[:, height // 2 :, width // 2 :] = rng.integers(0, 256, (n, height // 2, width // 2, 3), dtype=np.uint8)
    return frames


def indices(clip) -> list[int]:
    """Which indexed frame each decoded frame is, from the red of its upper-left quarter.

    clip: a VideoClip, or uint8 (T, H, W, 3) frames.
    """
    frames = getattr(clip, "frames", clip)
    h, w = frames.shape[1] // 2, frames.shape[2] // 2
    red = frames[:, :h, :w, 0].double().mean(dim=(1, 2))
    return (red / STEP).round().long().tolist()


def encode(path, frames, pts=None, time_base=Fraction(1, FPS), rotation=None, codec="mpeg4"):
    """Write frames with PyAV directly: explicit pts (in time_base units) and display rotation."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate = 2_000_000
        stream.codec_context.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i if pts is None else pts[i]
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def upright_picture(height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 (H, W, 3): dark, with a white block in the top-left corner (tells all four rotations apart)."""
    picture = np.full((height, width, 3), 20, np.uint8)
    picture[:16, :16] = 235
    return picture



def check_caption_and_live(model_dir, tmp_path, capsys) -> None:
    """`streamvlm caption` and `streamvlm live` run in-process with `model_dir` on a 3 s clip: two caption
    segments over 12 frames at 4 fps, and a live answer after 6 frames at 2 fps."""
    from streamvlm.cli import main

    clip = encode(tmp_path / "clip.mp4", indexed_frames(height=32, width=32))
    out = tmp_path / "captions.jsonl"
    assert main(["caption", "--model", str(model_dir), "--fps", "4", "--segment", "2", "--max-new-tokens", "3",
                 "--no-progress", str(clip), "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "error" not in record and record["stats"]["frames"] == 12
    assert [(s["start"], s["end"]) for s in record["segments"]] == [(0.0, 2.0), (2.0, 3.0)]
    assert isinstance(record["summary"], str)
    capsys.readouterr()
    assert main(["live", "--model", str(model_dir), "--source", str(clip), "--speed", "0", "--fps", "2",
                 "--ask", "What happens?", "--json", "--no-stdin", "--max-new-tokens", "3",
                 "--status-every", "0"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    answer = next(e for e in events if e["type"] == "answer")
    assert answer["question"] == "What happens?" and answer["frames"] == 6 and answer["t"] == 2.5


def record_chunk_rope(vlm) -> list:
    """Wrap vlm's decoder so every chunk it runs appends its M-RoPE positions (Chunk.rope) to the returned list."""
    seen = []
    original = vlm.decoder.forward

    def recording(chunk, *args, **kwargs):
        seen.append(chunk.rope)
        return original(chunk, *args, **kwargs)

    vlm.decoder.forward = recording
    return seen


@dataclass
class Frames:
    """A run of input frames in a dialogue laid out by `lay_out_dialogue` (as train.data's Frames)."""

    start: int
    end: int


@dataclass
class Exchange:
    """A question and its teacher-forced answer in such a dialogue."""

    question: str
    answer: str




def tiny_family_checkpoint(family: str, root) -> str:
    """A tiny random checkpoint of `family` that transformers writes, in root/family."""
    return write_tiny_family(root / family, family)
