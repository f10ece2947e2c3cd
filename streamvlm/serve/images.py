"""Images sent as frames (`image_url` parts): their size read from the file's first bytes, checked, then decoded.

FFmpeg allocates a whole frame from the size an image's header claims before it reads a byte of pixel data,
and PyAV's `av.open` decodes a first frame just to probe the stream (measured: a 254-byte PNG claiming
6000x6000 took 103 MB at `av.open`). So the size is read here, in Python, and an image is refused before
FFmpeg sees it when
- it has more than MAX_PIXELS pixels (the video reader's bound on a frame), or
- its file is too small to hold the pixels it claims, whatever they are: deflate never packs more than
  1032 bytes into one, so a PNG holds at most 1032 raw bytes a byte of file, and a JPEG spends at least a
  bit on every 8x8 block. A few-KB file claiming 30 MP is a decompression bomb (or cut short).
What passes is decoded from memory by a bare codec context (the whole file is one packet: no demuxer, no
probing), with FFmpeg's own `max_pixels` set as a second guard.

Only PNG and JPEG are read (what evaluation harnesses and most clients send); the format is told by the
file's signature, not by the data: URI's media type.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import av
import torch

from streamvlm.serve.errors import APIError
from streamvlm.video.files import MAX_PIXELS

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type: grey, RGB, palette, grey+alpha, RGBA
_DEFLATE_MAX_RATIO = 1032
# JPEG start-of-frame markers carry the size: SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0..7: no length follows


@dataclass(frozen=True)
class ImageHeader:
    kind: str
    """PNG or JPEG."""
    width: int
    height: int
    min_bytes: int
    """The smallest file that can hold width x height pixels of this kind."""

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def codec(self) -> str:
        """FFmpeg's decoder for it."""
        return {"PNG": "png", "JPEG": "mjpeg"}[self.kind]


def read_header(data: bytes) -> ImageHeader | None:
    """The size a PNG or JPEG claims, from its first bytes; None for anything else (or a header cut short)."""
    if data.startswith(_PNG_SIGNATURE):
        return _png_header(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_header(data)
    return None


def _png_header(data: bytes) -> ImageHeader | None:
    # signature, then the IHDR chunk: length 13, "IHDR", width, height, bit depth, colour type, ...
    if len(data) < 26 or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    channels = _PNG_CHANNELS.get(colour)
    if channels is None or depth not in (1, 2, 4, 8, 16):
        return None
    row = 1 + math.ceil(width * channels * depth / 8)  # a filter byte, then the row's samples
    return ImageHeader("PNG", width, height, height * row // _DEFLATE_MAX_RATIO)


def _jpeg_header(data: bytes) -> ImageHeader | None:
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
        elif marker in _JPEG_STANDALONE:
            at += 2
        elif marker in _JPEG_SOF:
            if at + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            blocks = math.ceil(width / 8) * math.ceil(height / 8)
            return ImageHeader("JPEG", width, height, blocks // 8)
        elif marker in (0xD9, 0xDA):  # the image ends, or its data starts, before any frame header
            return None
        else:
            at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
    return None


def load_image(data: bytes, param: str) -> torch.Tensor:
    """A PNG or JPEG file's bytes -> uint8 RGB (H, W, 3), checked as the module says before it is decoded."""
    header = read_header(data)
    if header is None:
        raise APIError(400, f"{param}: not a PNG or JPEG image (or its header is cut short); send PNG or JPEG",
                       param=param, code="bad_image")
    if header.width < 2 or header.height < 2:  # the model's resize needs two pixels a side
        raise APIError(400, f"{param}: the image is {header.width}x{header.height}; send at least 2x2 pixels",
                       param=param, code="bad_image")
    if header.pixels > MAX_PIXELS:
        raise APIError(400, f"{param}: the image is {header.width}x{header.height} ({header.pixels / 1e6:.0f} MP); "
                            f"the server takes at most {MAX_PIXELS / 1e6:.0f} MP an image; scale it down first",
                       param=param, code="image_too_large")
    if len(data) < header.min_bytes:
        raise APIError(400, f"{param}: the file has {len(data)} bytes, too few to hold the {header.width}x"
                            f"{header.height} pixels it claims (a decompression bomb, or a file cut short)",
                       param=param, code="bad_image")
    context = av.CodecContext.create(header.codec, "r")
    context.options = {"max_pixels": str(MAX_PIXELS)}
    try:
        # then a flush: a decoder may hold its picture until told the input ended
        frames = context.decode(av.Packet(data)) + context.decode(None)
    except av.FFmpegError as e:
        raise APIError(400, f"{param}: the {header.kind} image does not decode ({e.strerror or type(e).__name__}); "
                            "send a valid PNG or JPEG file", param=param, code="bad_image") from None
    if not frames:
        raise APIError(400, f"{param}: the {header.kind} image holds no picture", param=param, code="bad_image")
    return torch.from_numpy(frames[0].to_ndarray(format="rgb24"))
