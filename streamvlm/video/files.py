"""Decode a video file into uint8 RGB frames with their presentation timestamps, offline.

PyAV decodes sequentially (frame threading on) and converts only the frames a sampler picks. When
decord is importable, `num_frames` sampling of an unrotated stream of at most 1080p that asks for few of
its frames (a quarter or fewer) reads just the picked frames through decord's random access instead (much
faster on long files); decord sees the same timestamps and the same
picking code, so both paths return the same frames, and any decord failure falls back to PyAV.

Timestamps are seconds from the stream's start_time, taken from each frame's pts, so variable frame rate
video keeps its real timing. Frames come out upright: the display matrix rotation that PyAV 18 exposes as
`VideoFrame.rotation` (counter-clockwise degrees) is applied with torch.rot90. Flips in the matrix are
not applied.

Bad files raise StreamVLMError. Packets that fail to decode are skipped; if some frames decoded, they are
returned and a warning is logged (a truncated or partly corrupt file still yields its good part).

iter_frames walks a file of any length frame by frame with the same decoding and picking code as
read_video's fps path, holding a couple of decoded frames at a time.

Bounded work. What a read may cost is settled before a frame is converted:
- a frame larger than MAX_PIXELS is refused from the stream's header;
- `admit(count)` (read_video) hears how many frames the sampling will return before decoding starts, and
  may refuse by raising (the runtime checks the count against the model's context);
- `resize` (a function of one upright uint8 frame) runs on each picked frame as it is converted, so only
  the resized frames are held: with the model's own resize (`StreamVLM.read_video`) the pixels are those
  preprocessing would have made from the full-size frames, and a 4000x3000 source costs one full-size
  frame at a time;
- num_frames sampling returns each frame of the file at most once: asking a 1-frame video for 1024
  frames gives 1 frame, not 1024 copies of it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from fractions import Fraction
from itertools import islice
from pathlib import Path

import av
import numpy as np
import torch

from streamvlm.errors import StreamVLMError

try:
    import decord as _decord
except Exception:  # ImportError, or a decord whose native library fails to load
    _decord = None

log = logging.getLogger(__name__)

# Float slack when comparing frame times with range bounds and sampling ticks (seconds).
_EPS = 1e-6

MAX_PIXELS = 40_000_000
"""Largest frame (width x height) the reader decodes; 8K UHD (33 MP) passes. Larger ones are refused from
the stream's header, before a frame is decoded."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == is ambiguous
class VideoClip:
    """Frames sampled from a video file."""

    frames: torch.Tensor
    """uint8 (T, H, W, 3), RGB, upright."""
    timestamps: torch.Tensor
    """float64 (T,), seconds from the start of the stream (presentation time)."""
    path: str
    duration: float
    """Seconds, of the whole video stream (best estimate from the container)."""
    fps: float
    """Frames per second of output: the sampling rate actually used."""

    def __len__(self) -> int:
        return self.frames.shape[0]


@dataclass(frozen=True, eq=False)
class TimedFrame:
    """One frame of a video file, as iter_frames yields it."""

    time: float
    """Seconds from the start of the stream (presentation time), as read_video's timestamps."""
    frame: torch.Tensor
    """uint8 (H, W, 3), RGB, upright. Treat it as read-only: a frame picked for several ticks in a row
    may share memory with the previous one."""


@dataclass(frozen=True)
class _Info:
    """What read_video needs to know about a file before decoding it."""

    path: Path
    duration: float  # seconds
    fps: float  # average rate, 0.0 when unknown
    width: int  # coded size, before rotation
    height: int
    codec: str
    rotation: int  # counter-clockwise degrees, multiple of 90
    num_frames: int  # from the container, 0 when unknown
    time_base: Fraction
    origin: int  # pts of the stream start
    first_pts: int | None  # pts of the first decodable frame

    @property
    def hold(self) -> float:
        """How long the last frame stays on screen, for ticks after it (seconds)."""
        return 1.0 / self.fps if self.fps > 0 else 0.0


@dataclass
class _Report:
    """What happened while decoding, for warnings about damaged files."""

    decoded: int = 0
    errors: int = 0
    first_error: str = ""
    eof: bool = False
    last_time: float | None = None


# ---------------------------------------------------------------- public API


def probe_video(path: str | os.PathLike) -> dict:
    """Describe a video file: duration (s), fps (average), width, height, codec, rotation, num_frames.

    width and height are those of the frames read_video returns (after rotation); num_frames is the
    container's count, 0 when the container does not store one. Decodes the first frame to check that
    the file is readable. Raises StreamVLMError on a bad file.
    """
    info = _probe(path)
    width, height = (info.height, info.width) if info.rotation % 180 else (info.width, info.height)
    return {
        "path": str(info.path),
        "duration": info.duration,
        "fps": info.fps,
        "width": width,
        "height": height,
        "codec": info.codec,
        "rotation": info.rotation,
        "num_frames": info.num_frames,
    }


def read_video(
    path: str | os.PathLike,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    start: float = 0.0,
    end: float | None = None,
    max_frames: int | None = None,
    resize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    admit: Callable[[int], None] | None = None,
) -> VideoClip:
    """Decode frames of a video file in [start, end) seconds.

    num_frames: N frames, the one nearest each of N targets spaced evenly over [start, end) from start
        (np.linspace with endpoint=False, as transformers' default uniform sampler does over indices);
        a range with fewer than N frames gives each of its frames once (a frame is never repeated).
    fps: one frame per 1/fps seconds from start, the latest frame at or before each tick (above the
        file's own rate a frame fills several ticks).
    neither: every frame. max_frames caps the count by thinning uniformly.
    resize: applied to each picked frame, uint8 (H, W, 3) upright -> uint8 (h, w, 3), as it is converted.
    admit: called with the number of frames the sampling returns (at most; for every-frame reads, the
        container's estimate) before anything is decoded; raise in it to refuse the read.
    """
    check_sampling("read_video", num_frames, fps, start, end, max_frames)
    info = _probe(path)
    stop = _stop("read_video", info, start, end)
    finish = _finisher(info.rotation, resize)
    if num_frames is None and fps is None and max_frames is not None:
        if (stop - start) * info.fps > max_frames:  # too many: sample uniformly while decoding
            num_frames = max_frames
    if num_frames is not None:
        n = min(num_frames, max_frames or num_frames)
        if admit is not None:
            admit(n)
        targets = start + (stop - start) * np.arange(n) / n
        times, frames = _read_nearest(info, targets, start, stop, finish)
        rate = len(times) / (stop - start)
    elif fps is not None:
        ticks = start + np.arange(_tick_count(start, stop, fps)) / fps
        rate = fps
        if max_frames is not None and len(ticks) > max_frames:
            rate = fps * max_frames / len(ticks)
            ticks = ticks[_uniform(len(ticks), max_frames)]
        if admit is not None:
            admit(len(ticks))
        times, frames = _read_picks(info, start, stop, lambda items: _sweep(items, ticks, stop, info.hold, _latest),
                                    finish)
    else:
        if admit is not None:
            admit(max(1, math.ceil((stop - start) * info.fps)) if info.fps else max(1, info.num_frames))
        times, frames = _read_picks(info, start, stop, lambda items: _until(items, end), finish)
        if max_frames is not None and len(times) > max_frames:  # the fps estimate was low
            keep = _uniform(len(times), max_frames)
            times, frames = times[keep], frames[torch.from_numpy(keep)]
        rate = info.fps
    return VideoClip(frames, torch.from_numpy(times), str(info.path), info.duration, float(rate))


def iter_frames(
    path: str | os.PathLike,
    *,
    fps: float | None = None,
    start: float = 0.0,
    end: float | None = None,
    max_frames: int | None = None,
    resize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[TimedFrame]:
    """Decode frames of a video file in [start, end) seconds one at a time, for files too long to hold.

    fps: one frame per 1/fps seconds from start, the latest frame at or before each tick, as read_video
        picks them; None: every frame. max_frames stops after that many frames (read_video thins instead).
    resize: as read_video's.
    The file is probed here, so a bad file or a start past its end raises StreamVLMError before the first
    frame; probe_video gives the duration for a progress bar. Decoding starts at the first next(); the file
    stays open until the iterator is exhausted or closed (close() it, or use contextlib.closing, when
    stopping early). A file that breaks part way logs a warning and ends the iteration.
    """
    check_sampling("iter_frames", None, fps, start, end, max_frames)
    info = _probe(path)
    stop = _stop("iter_frames", info, start, end)
    if fps is not None:
        # the same float arithmetic as read_video's tick array, so both pick the same frames
        ticks = islice((start + k / fps for k in range(_tick_count(start, stop, fps))), max_frames)
        picks = _decode_picks(info, start, stop, lambda items: _sweep(items, ticks, stop, info.hold, _latest))
    else:
        picks = _decode_picks(info, start, stop, lambda items: islice(_until(items, end), max_frames))
    return _timed_frames(picks, _finisher(info.rotation, resize))


def write_video(
    path: str | os.PathLike, frames: torch.Tensor | np.ndarray, fps: float = 8.0, codec: str = "mpeg4"
) -> Path:
    """Encode uint8 (T, H, W, 3) RGB frames to a video file (yuv420p; H and W must be even).

    codec: any encoder in av.codecs_available; "mpeg4" is always in the PyAV wheel, "libx264" usually.
    The container follows the file extension (.mp4, .mkv, .avi, ...).
    """
    array = _check_frames(frames)
    if not fps > 0:
        raise StreamVLMError(f"write_video: fps must be positive, got {fps}")
    if codec not in av.codecs_available:
        raise StreamVLMError(f"write_video: codec {codec!r} is not in this PyAV build; use 'mpeg4' or 'libx264'")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _, height, width, _ = array.shape
    try:
        with av.open(str(out), "w") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # the encoder's default (~200 kb/s) smears colours; ~2 bits per pixel keeps them within a few levels
            stream.bit_rate = max(1_000_000, int(width * height * fps * 2))
            for image in array:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())
    except av.FFmpegError as e:
        raise StreamVLMError(f"write_video: could not write {out} with codec {codec!r}: {e}") from e
    return out


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Call write(tmp) on a temporary file beside `path` (same suffix), then rename it onto `path`: a crash
    never leaves half a file, and two writers racing both end with a complete one."""
    import tempfile

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# ---------------------------------------------------------------- checks


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise StreamVLMError(f"video file not found: {p}. Check the path (relative paths start at {Path.cwd()}).")
    if p.is_dir():
        raise StreamVLMError(f"{p} is a directory, not a video file. Pass one video file.")
    if not os.access(p, os.R_OK):
        raise StreamVLMError(f"cannot read {p}: permission denied. Fix its permissions or copy it somewhere readable.")
    if p.stat().st_size == 0:
        raise StreamVLMError(f"{p} is empty (0 bytes); the download or copy probably failed. Fetch it again.")
    return p


def check_sampling(caller: str, num_frames, fps, start, end, max_frames) -> None:
    if num_frames is not None and fps is not None:
        raise StreamVLMError(f"{caller}: give num_frames or fps, not both")
    if num_frames is not None and num_frames < 1:
        raise StreamVLMError(f"{caller}: num_frames must be at least 1, got {num_frames}")
    if fps is not None and not fps > 0:
        raise StreamVLMError(f"{caller}: fps must be positive, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise StreamVLMError(f"{caller}: max_frames must be at least 1, got {max_frames}")
    if start < 0:
        raise StreamVLMError(f"{caller}: start must be >= 0 seconds, got {start}")
    if end is not None and end <= start:
        raise StreamVLMError(f"{caller}: end ({end}) must be after start ({start})")


def _stop(caller: str, info: _Info, start: float, end: float | None) -> float:
    """The end of the sampled range: `end`, clamped to the video's duration."""
    if start >= info.duration:
        raise StreamVLMError(f"{caller}: start={start}s is past the end of {info.path} ({info.duration:.3f}s long)")
    return info.duration if end is None else min(end, info.duration)


def _check_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise StreamVLMError(
            f"write_video: frames must be uint8 (T, H, W, 3) RGB with T >= 1, got {array.dtype} {tuple(array.shape)}"
        )
    if array.shape[1] % 2 or array.shape[2] % 2:
        raise StreamVLMError(
            "write_video: height and width must be even for yuv420p, "
            f"got {array.shape[1]}x{array.shape[2]}; crop or pad"
        )
    return np.ascontiguousarray(array)


# ---------------------------------------------------------------- PyAV


@contextmanager
def _open(p: Path) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    try:
        container = av.open(str(p), metadata_errors="ignore")
    except (av.FFmpegError, OSError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise StreamVLMError(
            f"cannot read {p} as a video ({reason}). It is not a video file, or it is corrupt or truncated "
            "(an .mp4 cut short loses its index). Re-download it or re-encode it with ffmpeg."
        ) from e
    with container:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "no streams"
            raise StreamVLMError(f"{p} has no video stream (it has: {kinds}). Pass a file with video in it.")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield container, stream


def _check_pixels(p: Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise StreamVLMError(
            f"{p.name} has {width}x{height} frames ({width * height / 1e6:.0f} MP); the reader takes at most "
            f"{MAX_PIXELS / 1e6:.0f} MP a frame. Scale it down first (e.g. ffmpeg -i IN -vf scale=1920:-2 OUT).")


def _probe(path: str | os.PathLike) -> _Info:
    p = _check_file(path)
    with _open(p) as (container, stream):
        _check_pixels(p, stream.codec_context.width or 0, stream.codec_context.height or 0)  # before decoding
        report = _Report()
        with closing(_frames(container, stream, 0.0, report)) as items:
            first = next(items, None)
        if first is None:
            raise StreamVLMError(
                f"no frame of {p} could be decoded ({report.first_error or 'the stream is empty'}). "
                "The file is corrupt or truncated; re-download or re-encode it."
            )
        first_time, frame = first
        _check_pixels(p, frame.width, frame.height)  # a header may leave the size out
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        hold = 1.0 / fps if fps else 0.0
        return _Info(
            path=p,
            # at least to the end of the first frame: damaged headers can report 0
            duration=max(_duration(container, stream, fps), first_time + hold),
            fps=fps,
            width=frame.width,
            height=frame.height,
            codec=stream.codec_context.name,
            rotation=_quarter_turns(frame.rotation) * 90,
            num_frames=stream.frames or 0,
            time_base=stream.time_base,
            origin=stream.start_time or 0,
            first_pts=frame.pts,
        )


def _duration(container, stream, fps: float) -> float:
    """Seconds of the video stream: its own duration, else the container's, else frames / fps, else a scan."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    if stream.frames and fps:
        return stream.frames / fps
    return _scan_duration(container, stream)


def _scan_duration(container, stream) -> float:
    """Demux (no decoding) to the last packet; for raw streams that store no duration."""
    origin, end = stream.start_time or 0, 0
    try:
        for packet in container.demux(stream):
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is not None:
                end = max(end, stamp + (packet.duration or 0) - origin)
    except av.FFmpegError:
        pass  # damaged tail: the packets read so far give the estimate
    return float(end * stream.time_base) if stream.time_base else 0.0


def _frames(container, stream, start: float, report: _Report) -> Iterator[tuple[float, av.VideoFrame]]:
    """Yield (seconds, frame) in presentation order for frames at or after `start`.

    Skips packets the decoder rejects and stops at a demuxing error, counting both in `report`.
    """
    tb, origin = stream.time_base, stream.start_time or 0
    if start > 0:
        try:  # lands on the keyframe at or before start; earlier frames are dropped below
            container.seek(origin + int(start / tb), stream=stream, backward=True)
        except av.FFmpegError as e:
            log.debug("seek to %.3fs in %s failed (%s); decoding from the beginning", start, container.name, e)
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            report.eof = True
            return
        except av.FFmpegError as e:
            _note_error(report, e)
            report.eof = True
            return
        try:
            decoded = packet.decode()
        except av.FFmpegError as e:
            _note_error(report, e)
            continue
        for frame in decoded:
            if frame.pts is None:  # raw streams: continue the clock from the last frame
                t = 0.0 if report.last_time is None else report.last_time + 1.0 / float(stream.guessed_rate or 25)
            else:
                t = float((frame.pts - origin) * tb)
            report.decoded += 1
            report.last_time = t
            if t >= start - _EPS:
                yield t, frame


def _note_error(report: _Report, error: av.FFmpegError) -> None:
    report.errors += 1
    report.first_error = report.first_error or (getattr(error, "strerror", None) or str(error))


def _read_picks(info: _Info, start: float, stop: float | None, pick, finish) -> tuple[np.ndarray, torch.Tensor]:
    """All of _decode_picks at once: (T,) float64 seconds and uint8 (T, h, w, 3) finished frames.

    Each decoded frame is finished (rotated, resized) as it arrives, so the full-size frames are never held
    together; a frame picked several times is finished once."""
    times, frames, last_array, last_frame = [], [], None, None
    for t, array in _decode_picks(info, start, stop, pick):
        if array is not last_array:
            last_array, last_frame = array, finish(array)
        times.append(t)
        frames.append(last_frame)
    return np.asarray(times, dtype=np.float64), torch.stack(frames)


def _decode_picks(info: _Info, start: float, stop: float | None, pick) -> Iterator[tuple[float, np.ndarray]]:
    """Decode from start with PyAV, let `pick` choose frames before stop, yield (seconds, RGB) for those.

    RGB is uint8 (H, W, 3) before rotation; a frame picked several times in a row is converted once and
    yielded as the same array. Streams: holds the frames `pick` looks back on and the last array. The file
    is open from the first next() until the end or close(). Warns about damage and raises StreamVLMError
    when nothing was picked, once `pick` is done.
    """
    report = _Report()
    count, last_frame, last_array = 0, None, None
    with _open(info.path) as (container, stream), closing(_frames(container, stream, start, report)) as items:
        for t, frame in pick(items):
            if frame is not last_frame:
                last_frame, last_array = frame, _to_rgb(info, frame)
            count += 1
            yield t, last_array
    _warn_if_damaged(info, start, report)
    if not count:
        if report.errors or report.first_error:
            raise StreamVLMError(
                f"no frame of {info.path} in [{start}, {stop}) s could be decoded ({report.first_error}); "
                f"the last good frame is at {report.last_time}s. The file is corrupt or truncated."
            )
        raise StreamVLMError(f"{info.path} has no frame in [{start}, {stop}) s; widen the range")


def _timed_frames(picks: Iterator[tuple[float, np.ndarray]], finish) -> Iterator[TimedFrame]:
    last_array, last_frame = None, None
    with closing(picks):  # close() here closes the file now, not when the garbage collector gets to it
        for t, array in picks:
            if array is not last_array:
                last_array, last_frame = array, finish(array)
            yield TimedFrame(t, last_frame)


def _finisher(rotation: int, resize):
    """RGB (H, W, 3) as decoded -> the frame handed out: upright, then resized."""
    def finish(array: np.ndarray) -> torch.Tensor:
        frame = torch.from_numpy(array)
        if rotation:
            frame = _upright(frame[None], rotation)[0]
        return frame if resize is None else resize(frame)
    return finish


def _to_rgb(info: _Info, frame: av.VideoFrame) -> np.ndarray:
    try:
        if frame.width == info.width and frame.height == info.height:
            # Pitfall: naming a size, even the frame's own, sends PyAV (18.1) through a scaling context that
            # cost 25x the plain conversion (6 against 0.24 ms a frame of the world's 96 px videos, decode
            # included), for the same pixels.
            return frame.to_ndarray(format="rgb24")
        # a mid-stream resolution change is scaled back to the first frame's size
        return frame.to_ndarray(format="rgb24", width=info.width, height=info.height)
    except av.FFmpegError as e:  # decode errors are handled in _frames
        raise StreamVLMError(f"cannot convert the frames of {info.path} to RGB ({e}); re-encode the file") from e


def _warn_if_damaged(info: _Info, start: float, report: _Report) -> None:
    fewer = start <= 0 and info.num_frames and report.decoded < info.num_frames
    # more than a frame (or 0.1 s) of the stream after the last decoded frame: containers without a
    # frame count (mkv, webm) still store a duration
    missing = info.duration - ((report.last_time or 0.0) + info.hold) > max(info.hold, 0.1)
    if report.errors or (report.eof and (fewer or missing)):
        log.warning(
            "%s looks truncated or corrupt: decoded %d frame(s)%s up to %.3fs, %d error(s) (%s); "
            "returning the frames that decoded",
            info.path,
            report.decoded,
            f" of {info.num_frames}" if info.num_frames else "",
            report.last_time or 0.0,
            report.errors,
            report.first_error or "stream ended early",
        )


# ---------------------------------------------------------------- picking frames


def _until(items: Iterable[tuple[float, object]], stop: float | None):
    """Items before stop (times are increasing, so the first one past it ends the walk)."""
    for item in items:
        if stop is not None and item[0] >= stop - _EPS:
            return
        yield item


def _tick_count(start: float, stop: float, fps: float) -> int:
    """How many ticks start + k/fps fall in [start, stop) (at least one)."""
    return max(1, math.ceil((stop - start) * fps - _EPS))


def _sweep(items: Iterable[tuple[float, object]], times: Iterable[float], stop: float, hold: float, rule):
    """One item per sampling time, walking items and times (both increasing, from start on) together.

    `rule(prev, cur, t)` gives the item for time t once `cur` is far enough past t, else None; it needs
    one item of lookback, so this streams, and `times` may be lazy. Times left when an item at or after
    `stop` arrives go to the last item before stop (times are all before stop). Times left when the items
    run out go to the last item only up to `hold` after it (its display time): later times fall in a part
    of the file that did not decode.
    """
    times = iter(times)
    t, prev = next(times, None), None
    for cur in items:
        if cur[0] >= stop - _EPS:
            while prev is not None and t is not None:
                yield prev
                t = next(times, None)
            return
        while t is not None and (picked := rule(prev, cur, t)) is not None:
            yield picked
            t = next(times, None)
        if t is None:
            return
        prev = cur
    while prev is not None and t is not None and t < prev[0] + hold + _EPS:
        yield prev
        t = next(times, None)


def _nearest(prev, cur, t: float):
    """The item nearest t (ties go to the earlier one), once an item at or after t is seen."""
    if cur[0] < t:
        return None
    return prev if prev is not None and t - prev[0] <= cur[0] - t else cur


def _latest(prev, cur, t: float):
    """The latest item at or before t (the first item for t before it), once an item after t is seen."""
    if cur[0] <= t + _EPS:
        return None
    return prev if prev is not None else cur


def _uniform(total: int, count: int) -> np.ndarray:
    """`count` indices spread evenly over range(total), starting at 0."""
    return (np.arange(count) * total) // count


# ---------------------------------------------------------------- decord


def _once(picks):
    """Picks without consecutive repeats of one item (frames are picked in order, so repeats are adjacent)."""
    last = None
    for item in picks:
        if item is not last:
            yield item
        last = item


def _read_nearest(info: _Info, targets: np.ndarray, start: float, stop: float,
                  finish) -> tuple[np.ndarray, torch.Tensor]:
    if _decord_pays(info, len(targets), start, stop):
        result = _read_nearest_decord(info, targets, start, stop, finish)
        if result is not None:
            return result
    return _read_picks(info, start, stop, lambda items: _once(_sweep(items, targets, stop, info.hold, _nearest)),
                       finish)


# decord's decoder holds far more than the frames it returns (measured with decord 0.6: about 200 MB for a
# 1080p file even a frame at a time, against 70 MB for PyAV's sequential decode), so it is used only where
# its random access saves real decoding: frames up to 1080p, and ranges holding at least _DECORD_SPACING
# frames per frame asked.
_DECORD_MAX_PIXELS = 1920 * 1088
_DECORD_SPACING = 4
# Frames per get_batch call; each call holds its frames at full size until they are finished.
_DECORD_BATCH = 4


def _decord_pays(info: _Info, count: int, start: float, stop: float) -> bool:
    return info.width * info.height <= _DECORD_MAX_PIXELS and (stop - start) * info.fps >= _DECORD_SPACING * count


def _read_nearest_decord(info: _Info, targets: np.ndarray, start: float, stop: float, finish):
    """(times, frames) through decord's random access, or None where decord cannot be trusted to agree."""
    if _decord is None or info.rotation or info.first_pts is None:
        return None  # decord rotates by itself, and only for some containers
    try:
        # decord's bundled FFmpeg prints to stderr; PyAV keeps FFmpeg quiet, and failures reach us as
        # exceptions either way
        _decord.logging.set_level(_decord.logging.QUIET)
        reader = _decord.VideoReader(str(info.path), num_threads=0)
        # decord's seconds are relative to the stream start; back to integer pts so times are computed
        # with the same Fraction arithmetic as the PyAV path (bit-identical floats, identical tie-breaks)
        seconds = reader.get_frame_timestamp(range(len(reader)))[:, 0]
        rel_pts = [int(p) for p in np.round(seconds / float(info.time_base))]
        if not rel_pts or rel_pts[0] != info.first_pts - info.origin or np.any(np.diff(rel_pts) <= 0):
            return None
        times = [float(p * info.time_base) for p in rel_pts]
        items = ((t, index) for index, t in enumerate(times) if t >= start - _EPS)
        picks = list(_once(_sweep(items, targets, stop, info.hold, _nearest)))
        if not picks:
            return None
        frames = []
        for first in range(0, len(picks), _DECORD_BATCH):
            batch = reader.get_batch([index for _, index in picks[first:first + _DECORD_BATCH]]).asnumpy()
            if batch.shape[1:] != (info.height, info.width, 3):  # (K, H, W, 3) uint8
                return None
            frames.extend(finish(np.ascontiguousarray(array)) for array in batch)
        _warn_if_damaged(info, start, _Report(decoded=len(times), eof=True, last_time=times[-1]))
        return np.array([t for t, _ in picks], dtype=np.float64), torch.stack(frames)
    except Exception as e:  # DECORDError, RuntimeError, ...: PyAV may still read the file
        log.debug("decord could not read %s (%s); using PyAV", info.path, e)
        return None


# ---------------------------------------------------------------- rotation


def _quarter_turns(rotation: float) -> int:
    turns = round(rotation / 90)
    if abs(rotation - 90 * turns) > 1:
        log.warning("rotation of %s degrees is not a multiple of 90; rotating by %d", rotation, 90 * turns)
    return turns % 4


def _upright(frames: torch.Tensor, rotation: int) -> torch.Tensor:
    """Rotate (T, H, W, 3) frames counter-clockwise by `rotation` degrees, as the display matrix says."""
    turns = _quarter_turns(rotation)
    if turns == 0:
        return frames
    # rot90 from axis 1 (down) toward axis 2 (right) turns the picture counter-clockwise
    return torch.rot90(frames, turns, dims=(1, 2)).contiguous()
