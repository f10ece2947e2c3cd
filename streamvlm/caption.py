"""Batch captioning of long videos: `streamvlm caption`.

Each video streams through one session: frames at the chosen rate are appended as they are decoded, a
caption is asked of the session at the end of every segment (so nothing is ever re-encoded), and a
summary of the whole video is asked at the end. A memory budget keeps hours-long videos in fixed memory.

Output is JSON Lines, one line per video, written whole (one write, flush, fsync) so a crash never
leaves half a line; re-running the same command skips the videos already in the output. Sharding uses
the launcher's environment (`accelerate launch` / `torchrun` set RANK and WORLD_SIZE): each rank writes
its own part and rank 0 merges the parts at the end. `num_shards`/`shard_index` split the inputs between
independent jobs (a cluster scheduler's job array).

`batch` > 1 captions that many videos at once, each on its own thread with its own session, their
language-model steps run together by one `Batcher` (the weights are read once a step for all of them). A
video's line is written when the video is done, by the main thread, so a crash loses only the videos in
flight, which a re-run does again; each video's captions are the same tokens as with `batch` 1.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import logging
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.prompts import GENERIC_PROMPTS

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv",
                  ".3gp", ".ogv"}
LIST_SUFFIXES = {".txt", ".lst", ".list"}


@dataclass(frozen=True)
class CaptionConfig:
    """How each video is captioned."""

    fps: float = 1.0
    """Frames per second fed to the model."""
    segment: float = 10.0
    """Seconds of video per caption."""
    prompt: str = GENERIC_PROMPTS.caption
    """Asked at the end of every segment (`streamvlm caption` asks the built-in model what it knows instead)."""
    summary_prompt: str = GENERIC_PROMPTS.summary
    """Asked once at the end."""
    max_new_tokens: int = 64
    """Longest caption or summary, in tokens."""
    memory_budget: str | None = "auto"
    """Cache bound per video: "auto" (half the model's context, in entries per layer), a token count, a size
    ("64MB"), or None for no bound."""
    frames_per_append: int = 8
    """Frames decoded before they are pushed into the session together."""
    ignore_stop: bool = False
    """Always generate max_new_tokens (benchmarks: equal work whatever the model says)."""

    def __post_init__(self):
        if self.fps <= 0 or self.segment <= 0:
            raise StreamVLMError("--fps and --segment must be positive")
        if self.max_new_tokens < 1 or self.frames_per_append < 1:
            raise StreamVLMError("--max-new-tokens must be at least 1")


# -- inputs ----------------------------------------------------------------------------------------


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (recursive, video suffixes), globs, and text files listing paths (one per line,
    relative to the list's folder; # comments) -> sorted unique absolute paths."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES]
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    entry = Path(line).expanduser()
                    found.append(entry if entry.is_absolute() else path.parent / entry)
        elif path.exists():
            found.append(path)
        elif any(ch in item for ch in "*?["):
            matches = [Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True)]
            found += [m for m in matches if m.is_file()]
        else:
            found.append(path)  # a missing file is reported in the output, like any unreadable video
    unique = sorted({p.resolve() if p.exists() else p.absolute() for p in found})
    if not unique:
        raise StreamVLMError(f"no videos found in {' '.join(inputs)}")
    return unique


# -- output ----------------------------------------------------------------------------------------


class JsonlOutput:
    """An append-only JSON Lines file written one whole line at a time, by one process at a time.

    On open, an exclusive lock is taken (flock on `.NAME.lock` next to the file, released by the kernel when
    the process ends, even on kill -9; the lock file stays), so a second run on the same file refuses
    instead of duplicating every record. Then a trailing partial line (from a crash or a full disk
    mid-write) is cut off, and the paths already recorded are read so a re-run can skip them. Errors a user
    can cause (a folder, a parent that cannot be made, a full disk) raise StreamVLMError; what was written
    stays.
    """

    def __init__(self, path: Path):
        self.path = path
        self.done: set[str] = set()
        self._fd = self._lock_fd = None
        if path.is_dir():
            raise StreamVLMError(f"--out {path} is a folder; give a file in it, e.g. {path / 'captions.jsonl'}")
        if not path.parent.is_dir():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StreamVLMError(f"--out {path}: cannot create the folder {path.parent} "
                                     f"({e.strerror or e}); give a file in a folder you can write") from None
            print(f"streamvlm: created the folder {path.parent} for --out", file=sys.stderr)
        self._lock()
        try:
            self._repair_and_read()
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            self.close()
            raise StreamVLMError(f"--out {path}: cannot write it ({e.strerror or e})") from None

    def _lock(self) -> None:
        lock = self.path.with_name(f".{self.path.name}.lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StreamVLMError(f"--out {self.path}: cannot create its lock file {lock} "
                                 f"({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StreamVLMError(f"{self.path} is being written by another caption run ({holder}); wait for it "
                                 "to finish, or give another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def _repair_and_read(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            logger.warning("%s ends with a partial line (an interrupted run or a full disk); dropping it", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for line in data[:end].splitlines():
            try:
                self.done.add(json.loads(line)["path"])
            except (ValueError, KeyError):
                logger.warning("%s has a line that is not a caption record; ignoring it", self.path)

    def write(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, line)  # one write of the whole line, then to disk before moving on
            if written != len(line):
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
            os.fsync(self._fd)
        except OSError as e:
            try:  # cut what part of the line got out; if this fails too, the next run's open repairs it
                os.ftruncate(self._fd, size)
            except OSError:
                pass
            raise StreamVLMError(f"cannot write to {self.path} ({e.strerror or e}); the {len(self.done)} "
                                 "record(s) already in it are kept: free space and run the same command again "
                                 "to resume") from None
        self.done.add(record["path"])

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None


# -- one video -------------------------------------------------------------------------------------


def caption_video(vlm, path: Path, cfg: CaptionConfig, frame_bar=None) -> dict:
    """Caption one video; returns its record (raises StreamVLMError for an unreadable video)."""
    from streamvlm.video.files import probe_video

    start = time.perf_counter()
    info = probe_video(path)
    if frame_bar is not None:
        frame_bar.reset(total=max(1, int(info["duration"] * cfg.fps)))
        frame_bar.set_description(path.name[:30])
    session = vlm.session(memory_budget=cfg.memory_budget, max_new_tokens=cfg.max_new_tokens,
                          ignore_stop=cfg.ignore_stop)
    segments: list[dict] = []
    pending: list[torch.Tensor] = []  # decoded frames not yet appended, (H, W, 3) each
    times: list[float] = []
    seg_start, in_segment, last_time, decode_s = 0.0, 0, 0.0, 0.0

    def flush() -> None:
        if pending:
            session.append_frames(torch.stack(pending), times[:])
            pending.clear()
            times.clear()

    def caption(end: float) -> None:
        nonlocal seg_start, in_segment
        flush()
        segments.append({"start": round(seg_start, 3), "end": round(end, 3), "text": session.ask(cfg.prompt)})
        seg_start, in_segment = end, 0

    frames = vlm.iter_frames(path, fps=cfg.fps)  # resized to the model's input size as they decode
    try:
        while True:
            t0 = time.perf_counter()
            item = next(frames, None)
            decode_s += time.perf_counter() - t0
            if item is None:
                break
            # Close every segment that ends at or before this frame (a stretch with no frames is skipped).
            while item.time >= seg_start + cfg.segment:
                if in_segment:
                    caption(seg_start + cfg.segment)
                else:
                    seg_start += cfg.segment
            pending.append(item.frame)
            times.append(item.time)
            in_segment += 1
            last_time = item.time
            if len(pending) >= cfg.frames_per_append:
                flush()
            if frame_bar is not None:
                frame_bar.update(1)
    finally:
        frames.close()
    if in_segment:
        caption(max(last_time, min(seg_start + cfg.segment, info["duration"])))
    if not segments:
        raise StreamVLMError(f"{path}: no frame could be decoded")
    summary = session.ask(cfg.summary_prompt)
    stats = session.stats()
    seconds = time.perf_counter() - start
    return {
        "path": str(path), "duration": info["duration"], "fps": cfg.fps, "segments": segments, "summary": summary,
        "stats": {"frames": stats["frames"], "llm_flops": stats["flops"]["llm"],
                  "llm_flops_dense": stats["flops"]["llm_dense"],
                  "flops_fraction": stats["flops"]["llm"] / stats["flops"]["llm_dense"],
                  "vision_flops": stats["flops"]["vision"], "kv_bytes_peak": stats["kv_bytes_peak"],
                  "evicted_entries": stats["evicted_entries"], "seconds": seconds, "decode_seconds": decode_s},
    }


# -- a whole run -----------------------------------------------------------------------------------


@dataclass
class RunSummary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    video_seconds: float = 0.0
    compute_seconds: float = 0.0

    def line(self) -> str:
        rate = self.video_seconds / self.compute_seconds if self.compute_seconds else 0.0
        return (f"captioned {self.done}, failed {self.failed}, skipped {self.skipped} (already in the output); "
                f"{self.video_seconds / 3600:.2f} h of video in {self.compute_seconds / 3600:.3f} h of compute = "
                f"{rate:.1f} h of video per hour")


def _distributed() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (accelerate launch, torchrun), else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_output(out: Path, num_shards: int, shard_index: int) -> Path:
    if num_shards == 1:
        return out
    return out.with_name(f"{out.stem}.shard-{shard_index}-of-{num_shards}{out.suffix}")


def run(inputs: list[str], out: Path, load_vlm, cfg: CaptionConfig, model_name: str, routing: str,
        num_shards: int = 1, shard_index: int = 0, progress: bool | None = None, batch: int = 1) -> RunSummary:
    """Caption every input video into `out`; returns the run's summary (of this process, or merged on rank 0).
    batch: videos captioned at once, their steps batched."""
    from tqdm.auto import tqdm

    if batch < 1:
        raise StreamVLMError(f"--batch must be at least 1, got {batch}")
    if not 0 <= shard_index < num_shards:
        raise StreamVLMError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
    videos = expand_inputs(inputs)[shard_index::num_shards]
    out = shard_output(out, num_shards, shard_index)
    rank, world = _distributed()
    state = None
    if world > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        rank, world = state.process_index, state.num_processes
    if world == 1:
        writer = JsonlOutput(out)
        already = writer.done
    else:  # each rank appends to its own part; the main output is only read until rank 0 merges
        writer = JsonlOutput(out.with_name(f"{out.stem}.part-{rank}-of-{world}{out.suffix}"))
        already = _read_done(out) | writer.done
    mine = videos[rank::world]
    todo = [v for v in mine if str(v) not in already]
    summary = RunSummary(skipped=len(mine) - len(todo))
    show = sys.stderr.isatty() if progress is None else progress
    vlm = load_vlm() if todo else None
    video_bar = tqdm(total=len(todo), desc="videos", unit="video", position=0, disable=not show or rank > 0)
    frame_bar = tqdm(total=1, desc="frames", unit="frame", position=1, leave=False,
                     disable=not show or rank > 0 or batch > 1)  # one video's frames: with batch > 1, several

    def finished(record: dict) -> None:
        if "error" in record:
            summary.failed += 1
        else:
            summary.done += 1
            summary.video_seconds += record["duration"]
        record.update(model=model_name, routing=routing)
        writer.write(record)
        video_bar.update(1)

    start = time.perf_counter()
    try:
        if batch == 1:
            for path in todo:
                finished(_caption_record(vlm, path, cfg, frame_bar))
        elif todo:
            _caption_batched(vlm, todo, cfg, batch, finished)
    finally:
        summary.compute_seconds = time.perf_counter() - start
        frame_bar.close()
        video_bar.close()
        writer.close()
    if state is not None:
        summary = _merge(state, out, world, summary)
    return summary


def _caption_record(vlm, path: Path, cfg: CaptionConfig, frame_bar=None) -> dict:
    """The video's record, or a record of its error: one bad file or a library failure on it must not stop a
    long batch."""
    try:
        return caption_video(vlm, path, cfg, frame_bar)
    except StreamVLMError as e:
        logger.warning("%s", e)
        return {"path": str(path), "error": str(e)}
    except Exception as e:  # noqa: BLE001
        logger.exception("captioning %s failed", path)
        return {"path": str(path), "error": f"internal error ({type(e).__name__}: {e}); please report it"}


def _caption_batched(vlm, todo: list[Path], cfg: CaptionConfig, batch: int, finished) -> None:
    """Caption `batch` videos at a time on worker threads, each with a router of its own (some training-free
    routers keep per-call state) and its forwards run by one Batcher; `finished(record)` on this thread as each
    video is done."""
    import threading

    from streamvlm.batching import Batcher
    from streamvlm.cores import one_core

    batcher = Batcher(max_batch=batch)
    local = threading.local()

    def work(path: Path) -> dict:
        if not hasattr(local, "vlm"):
            local.vlm = vlm.fork().batched(batcher)
        return _caption_record(local.vlm, path, cfg)

    try:
        # the workers only feed the batcher's step thread: one core each (streamvlm.cores)
        with ThreadPoolExecutor(batch, thread_name_prefix="streamvlm-caption", initializer=one_core) as pool:
            for future in as_completed([pool.submit(work, path) for path in todo]):
                finished(future.result())
    finally:
        batcher.close()


def _read_done(path: Path) -> set[str]:
    done = set()
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                done.add(json.loads(line)["path"])
            except (ValueError, KeyError):
                pass
    return done


def _merge(state, out: Path, world: int, summary: RunSummary) -> RunSummary:
    """Rank 0 appends every rank's part to `out` (skipping paths already there) and removes the parts."""
    import torch.distributed as dist

    totals = [None] * world
    dist.all_gather_object(totals, summary)
    state.wait_for_everyone()
    if state.process_index == 0:
        merged = JsonlOutput(out)
        for rank in range(world):
            path = out.with_name(f"{out.stem}.part-{rank}-of-{world}{out.suffix}")
            if not path.exists():
                continue
            for line in path.read_bytes().splitlines():
                record = json.loads(line)
                if record["path"] not in merged.done:
                    merged.write(record)
            path.unlink()
        merged.close()
        summary = RunSummary(*(sum(getattr(t, f) for t in totals) for f in
                               ("done", "failed", "skipped", "video_seconds", "compute_seconds")))
    state.wait_for_everyone()
    return summary
