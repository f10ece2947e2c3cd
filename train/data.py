"""Video instruction data for training: samples, the dataset, the sampler and the data module.

Records come from record files in the formats `streamvlm.train.records` reads (LLaVA-Video, VideoLLM-online
streaming, VideoChat instructions, ShareGPT4Video captions). A Sample carries preprocessed pixels and the event
sequence the training module turns into tokens: for a LLaVA style record every frame, then the exchanges; for a
streaming one frames and exchanges interleaved by stream time, frames after the last exchange not decoded.
When a feature cache folder is set, the module saves the frozen vision tower's output at
`Sample.feature_path` and this dataset writes the frame timestamps beside it, so later epochs skip decoding
and the tower.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Iterator

import lightning
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from streamvlm.errors import StreamVLMError
from streamvlm.train.records import Exchange, Record, load_records, read_records, warn_bad_records
from streamvlm.video.files import check_sampling, probe_video, read_video
from streamvlm.video.preprocess import PreprocessConfig, preprocess, resize_frame
from streamvlm.paths import cache_dir

__all__ = [
    "EpochShuffleSampler", "Event", "Exchange", "Frames", "Record", "Sample", "VideoDataModule",
    "VideoInstructionDataset", "collate_samples", "load_records",
]

log = logging.getLogger(__name__)

# Float slack when comparing frame timestamps with exchange times (seconds).
_EPS = 1e-6
# read_video's `end` is exclusive: decode a little past the last exchange so a frame exactly at its
# time is kept (seconds; far below one frame interval).
_END_SLACK = 1e-3


# ---------------------------------------------------------------- sample format


@dataclass(frozen=True)
class Frames:
    """A run of frames: indices into the sample's frame tensor."""

    start: int
    end: int
    """Exclusive."""


Event = Frames | Exchange


@dataclass
class Sample:
    """One training example: frames (or where their features are cached) and the events over them."""

    id: str
    video: str
    """Absolute path of the video file."""
    pixels: torch.Tensor | None
    """float32 (T, 3, h, w) on CPU from the runtime's preprocess(); None when features are cached."""
    timestamps: torch.Tensor
    """float64 (T,), seconds from the start of the stream."""
    events: list[Event]
    """In sequence order; every frame index 0..T-1 is in exactly one Frames event."""
    feature_path: str | None
    """Where encoded features for this sample are (or will be) cached; None when caching is off."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Sample:
        """This sample with pixels on device (timestamps stay on the CPU: they are read on the host).

        Lightning moves batches with any object's `to`; without it, it would walk into the frozen
        events and fail ("A frozen dataclass was passed to `apply_to_collection`").
        """
        if self.pixels is None:
            return self
        return replace(self, pixels=self.pixels.to(device, non_blocking=non_blocking))


# ---------------------------------------------------------------- dataset


class VideoInstructionDataset(Dataset):
    """Records -> Samples: decode, preprocess (float32, CPU) and lay out events.

    Items are None for videos that fail to decode (strict=False; a warning names the file); collate_samples
    drops them. With feature_dir, an item whose features (`<key>.pt`, written by the training module) and
    timestamps (`<key>.json`, written here) are both cached is returned without decoding, pixels None.
    """

    def __init__(
        self,
        records: list[Record],
        preprocess_config: PreprocessConfig,
        num_frames: int | None = 8,
        fps: float | None = None,
        max_frames: int | None = 64,
        feature_dir: str | os.PathLike | None = None,
        strict: bool = False,
        encoder: str | None = None,
    ):
        """encoder: an identity of the weights that encode frames (a hash), part of the feature cache's key."""
        check_sampling("data", num_frames, fps, 0.0, None, max_frames)
        self.encoder = encoder
        self.records = list(records)
        self.preprocess_config = preprocess_config
        self.num_frames = num_frames
        self.fps = fps
        self.max_frames = max_frames
        self.feature_dir = Path(feature_dir).expanduser() if feature_dir is not None else None
        self.strict = strict
        if self.feature_dir is not None:
            self.feature_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | None:
        record = self.records[index]
        try:
            return self._load(record)
        except (StreamVLMError, OSError) as e:  # OSError: the file vanished or is unreadable (os.stat)
            if self.strict:
                raise StreamVLMError(f"{record.source} (id {record.id!r}): cannot read {record.video}: {e}") from e
            log.warning("skipping %s (record %r): %s", record.video, record.id, e)
            return None

    def feature_path(self, record: Record) -> str | None:
        """Where the features of `record` are cached: a hash of the file's identity, the sampling, the
        preprocessing and the encoder, so a changed video, setting or vision tower never reuses stale features.
        None when caching is off."""
        if self.feature_dir is None:
            return None
        stat = os.stat(record.video)
        key = {
            "video": record.video, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "num_frames": self.num_frames, "fps": self.fps, "max_frames": self.max_frames,
            "end": _decode_end(record), "preprocess": asdict(self.preprocess_config),
        }
        if self.encoder is not None:
            key["encoder"] = self.encoder
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return str(self.feature_dir / f"{digest}.pt")

    def _load(self, record: Record) -> Sample:
        feature_path = self.feature_path(record)
        timestamps = _cached_timestamps(feature_path) if feature_path is not None else None
        pixels = None
        if timestamps is None:
            pixels, timestamps = self._decode(record)
            if feature_path is not None:
                _write_timestamps(feature_path, record.video, timestamps)
        return Sample(record.id, record.video, pixels, timestamps, _events(record, timestamps), feature_path)

    def _decode(self, record: Record) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (T, 3, h, w) pixels and float64 (T,) timestamps of the frames the record uses."""
        cfg = self.preprocess_config  # frames are resized as they decode: full-size frames are never held together
        clip = read_video(record.video, num_frames=self.num_frames, fps=self.fps, max_frames=self.max_frames,
                          end=_decode_end(record), resize=partial(resize_frame, cfg=cfg))
        count = _frames_used(record, clip.timestamps)
        if count == 0:  # every exchange precedes the first frame: a text-only sample
            return torch.empty(0, 3, cfg.height, cfg.width), clip.timestamps[:0]
        return preprocess(clip.frames[:count], cfg), clip.timestamps[:count]


def _decode_end(record: Record) -> float | None:
    """Where decoding stops (s): just past the last exchange of a streaming record, None (the end) otherwise."""
    if record.kind != "stream":
        return None
    return record.exchanges[-1].time + _END_SLACK


def _frames_used(record: Record, timestamps: torch.Tensor) -> int:
    """How many leading frames the events use: all for LLaVA records, those up to the last exchange otherwise."""
    if record.kind != "stream":
        return len(timestamps)
    return bisect.bisect_right(timestamps.tolist(), record.exchanges[-1].time + _EPS)


def _events(record: Record, timestamps: torch.Tensor) -> list[Event]:
    """The event sequence over T = len(timestamps) frames (timestamps never decrease)."""
    if record.kind != "stream":
        return [Frames(0, len(timestamps)), *record.exchanges]
    times = timestamps.tolist()
    events: list[Event] = []
    start = 0
    for exchange in record.exchanges:
        end = bisect.bisect_right(times, exchange.time + _EPS)  # frames at or before the exchange
        if end > start:
            events.append(Frames(start, end))
            start = end
        events.append(exchange)
    return events


def _sidecar(feature_path: str) -> Path:
    return Path(feature_path).with_suffix(".json")


def _cached_timestamps(feature_path: str) -> torch.Tensor | None:
    """float64 (T,) timestamps when both the features and the timestamp sidecar exist, else None."""
    sidecar = _sidecar(feature_path)
    if not (os.path.isfile(feature_path) and sidecar.is_file()):
        return None
    try:
        return torch.tensor(json.loads(sidecar.read_text())["timestamps"], dtype=torch.float64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the damaged feature cache sidecar %s (%s); decoding the video again", sidecar, e)
        return None


def _write_timestamps(feature_path: str, video: str, timestamps: torch.Tensor) -> None:
    sidecar = _sidecar(feature_path)
    # written beside the target and renamed: loader workers and ranks may write the same sidecar at once
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ts-", suffix=".json", dir=sidecar.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"video": video, "timestamps": timestamps.tolist()}, f)
        os.replace(tmp, sidecar)
    except OSError as e:
        log.warning("cannot write the feature cache sidecar %s (%s); this video will be decoded every epoch",
                    sidecar, e)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def collate_samples(batch: list[Sample | None]) -> list[Sample]:
    """A batch is the list of its samples, without the ones that failed to decode (it may be empty)."""
    return [sample for sample in batch if sample is not None]


# ---------------------------------------------------------------- sampler


class EpochShuffleSampler(Sampler[int]):
    """A permutation of range(size) drawn from seed + epoch.

    The order depends on nothing but seed and epoch, so a run resumed at an epoch boundary sees the
    order an uninterrupted run would. Lightning calls set_epoch before each epoch (also through the
    DistributedSamplerWrapper it puts around this sampler under DDP).
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


# ---------------------------------------------------------------- data module

_SYNTHETIC_KEYS = {"num_videos", "val_videos", "out_dir", "seed", "fps", "seconds", "size", "streaming"}
_WORLD_KEYS = {"num_videos", "val_videos", "out_dir", "seed", "seconds", "size", "fps", "clips", "clip_seconds",
               "leavers", "dialogue"}


class VideoDataModule(lightning.LightningDataModule):
    """Video instruction data for Lightning: record files (or generated synthetic videos) to loaders."""

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        video_root: str | None = None,
        model_dir: str | None = None,
        num_frames: int | None = 8,
        fps: float | None = None,
        max_frames: int | None = 64,
        batch_size: int = 1,
        num_workers: int = 0,
        feature_cache: str | None = None,
        strict: bool = False,
        seed: int = 0,
        synthetic: dict | None = None,
        world: dict | None = None,
    ):
        """
        Args:
            train_file: training records, a JSON list or JSONL file (LLaVA-Video, VideoLLM-online streaming,
                VideoChat or ShareGPT4Video records; see `streamvlm.train.records`).
            val_file: validation records in the same formats; no validation when unset.
            video_root: folder that records' relative video paths start from (default: the record file's folder).
            model_dir: checkpoint folder whose preprocessor config says how frames are resized and
                normalized (unset when the training module calls set_preprocess_config).
            num_frames: frames sampled uniformly per video (null to sample by fps).
            fps: frames per second to sample instead of num_frames.
            max_frames: cap on frames per video, thinned uniformly.
            batch_size: samples per batch (a batch is a list of samples).
            num_workers: data loader worker processes (kept alive between epochs).
            feature_cache: folder for cached vision features and timestamps; off when unset.
            strict: raise on a malformed record or a missing or undecodable video instead of skipping it with a
                warning.
            seed: shuffling seed; epoch e uses seed + e, so resumed runs see the same order.
            synthetic: when train_file is unset, generate videos with known answers, e.g. {num_videos: 16,
                val_videos: 4, seed: 0, out_dir: ...} (also fps, seconds, size, streaming; out_dir
                defaults to streamvlm's cache folder / synthetic).
            world: when train_file is unset, generate procedural world videos (`streamvlm.world`)
                with their LLaVA-Video records and mid-stream records, e.g. {num_videos: 4000,
                val_videos: 64, seed: 0, out_dir: ...} (also size, seconds, fps); validation uses seed + 1.
                `clips: N` adds N short clips (`clip_seconds`, default 3; seed + 2) to the training set:
                every object stays, and a sample costs three frames instead of eight. `leavers: N` adds N
                videos (seed + 3) whose first leaver goes early and is asked about only by the recall
                questions, two per dialogue (`world.generate(..., leaver=True)`). `dialogue: rich` trains
                on one streaming record per video that asks more motion questions and ends with the
                description (`world.rich_dialogue`) instead of a streaming and a LLaVA record: half the
                passes over the frames for the same answers. The LLaVA records are still written.
        """
        super().__init__()
        check_sampling("data", num_frames, fps, 0.0, None, max_frames)
        if batch_size < 1:
            raise StreamVLMError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise StreamVLMError(f"num_workers must be >= 0, got {num_workers}")
        if train_file is None and synthetic is None and world is None:
            raise StreamVLMError("set train_file (a record file), synthetic (e.g. {num_videos: 16}) or world")
        if synthetic is not None and world is not None:
            raise StreamVLMError("set synthetic or world, not both")
        for name, spec, known in (("synthetic", synthetic, _SYNTHETIC_KEYS), ("world", world, _WORLD_KEYS)):
            unknown = set(spec or ()) - known
            if unknown:
                raise StreamVLMError(f"unknown {name} keys {sorted(unknown)}; known: {sorted(known)}")
        self.save_hyperparameters()
        self.train_file, self.val_file, self.video_root = train_file, val_file, video_root
        self.model_dir = model_dir
        self.num_frames, self.fps, self.max_frames = num_frames, fps, max_frames
        self.batch_size, self.num_workers = batch_size, num_workers
        self.feature_cache, self.strict, self.seed = feature_cache, strict, seed
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self.world = dict(world) if world is not None else None
        self.skipped: dict[str, int] = {}
        """reason ("malformed", "missing", "unreadable") -> records dropped in setup."""
        self.train_records: list[Record] | None = None
        """Training records with readable videos, after setup."""
        self.val_records: list[Record] | None = None
        """Validation records with readable videos, after setup; None without validation data."""
        self._preprocess_config: PreprocessConfig | None = None
        self._encoder: str | None = None
        self._datasets: dict[str, VideoInstructionDataset] = {}

    def set_preprocess_config(self, cfg: PreprocessConfig) -> None:
        """Use cfg for frames instead of reading model_dir's preprocessor config.

        Call it any time before the dataloaders are made (LightningModule.setup is early enough).
        """
        self._preprocess_config = cfg
        self._datasets.clear()

    def set_encoder(self, encoder: str) -> None:
        """Key cached features by encoder, an identity of the weights that encode frames (the training module
        sets a hash of them in its setup): features of another vision tower are then never reused."""
        self._encoder = encoder
        self._datasets.clear()

    @property
    def preprocess_config(self) -> PreprocessConfig:
        if self._preprocess_config is None:
            if self.model_dir is None:
                raise StreamVLMError("the data module needs model_dir (a checkpoint folder) to know how to "
                                     "preprocess frames, or a preprocess config via set_preprocess_config")
            self._preprocess_config = PreprocessConfig.from_checkpoint(self.model_dir)
        return self._preprocess_config

    @property
    def train_dataset(self) -> VideoInstructionDataset | None:
        return self._dataset("train", self.train_records)

    @property
    def val_dataset(self) -> VideoInstructionDataset | None:
        return self._dataset("val", self.val_records)

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node before setup: synthetic videos are written once
        if self._uses_synthetic():
            self._synthetic_files()

    def setup(self, stage: str | None = None) -> None:
        want_train = stage in (None, "fit") and self.train_records is None
        want_val = stage in (None, "fit", "validate") and self.val_records is None
        if not (want_train or want_val):
            return
        train_files, val_files = self._record_files()
        # Generated sets (synthetic, world) were written by our generator, each video atomically, and their
        # folder's manifest says they are complete: their videos are only checked to exist. Probing every
        # file took a minute on each rank for the world model's 13,000 videos.
        generated = self._uses_synthetic()
        if want_train:
            self.train_records = self._readable_records(train_files, probe=not generated)
        if want_val and val_files:
            self.val_records = self._readable_records(val_files, probe=not (generated and not self.val_file))

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise StreamVLMError("call setup('fit') before train_dataloader()")
        sampler = EpochShuffleSampler(len(self.train_dataset), self.seed)
        return self._loader(self.train_dataset, sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []  # Lightning runs no validation on an empty list
        return self._loader(self.val_dataset, None)

    # ------------------------------------------------------------ helpers

    def _dataset(self, split: str, records: list[Record] | None) -> VideoInstructionDataset | None:
        """The split's dataset, made on first use (the preprocess config may be set after setup)."""
        if records is None:
            return None
        if split not in self._datasets:
            self._datasets[split] = VideoInstructionDataset(
                records, self.preprocess_config, self.num_frames, self.fps, self.max_frames, self.feature_cache,
                self.strict, self._encoder)
        return self._datasets[split]

    def _loader(self, dataset: VideoInstructionDataset, sampler: Sampler | None) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False,
                          collate_fn=collate_samples, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def _readable_records(self, files: list[tuple[Path, str | None]], probe: bool = True) -> list[Record]:
        """Well-formed records of (record file, video root) pairs whose videos exist and (probe) probe."""
        records: list[Record] = []
        for path, root in files:
            found, problems = read_records(path, root)
            if problems and self.strict:
                raise StreamVLMError(problems[0])
            if problems and not found:
                raise StreamVLMError(f"no record of {path} is well formed; the first: {problems[0]}")
            warn_bad_records(problems)
            if problems:
                self.skipped["malformed"] = self.skipped.get("malformed", 0) + len(problems)
            records += found
        usable = self._drop_unreadable(records, probe)
        if not usable:
            names = ", ".join(str(path) for path, _ in files)
            raise StreamVLMError(f"no record of {names} has a readable video; see the warnings above")
        return usable

    def _drop_unreadable(self, records: list[Record], probe: bool = True) -> list[Record]:
        """Records whose video exists and (probe) probes; one warning per bad file, counted per record in
        skipped."""
        paths = sorted({record.video for record in records})
        check = _video_problem if probe else _video_missing
        # probing decodes one frame per file; threads overlap the file reads (PyAV releases the GIL)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            found = pool.map(check, paths)
            problems = dict(zip(paths, tqdm(found, total=len(paths), desc="checking videos", unit="file",
                                            disable=len(paths) < 1000)))
        if self.strict:
            for record in records:
                if problems[record.video] is not None:
                    raise StreamVLMError(f"{record.source} (id {record.id!r}): {problems[record.video][1]}")
        for path, problem in problems.items():
            if problem is not None:
                log.warning("skipping the records of %s: %s", path, problem[1])
        counts = Counter(problems[r.video][0] for r in records if problems[r.video] is not None)
        for reason, count in counts.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        return [record for record in records if problems[record.video] is None]

    def _uses_synthetic(self) -> bool:
        return self.train_file is None and (self.synthetic is not None or self.world is not None)

    def _record_files(self) -> tuple[list[tuple[Path, str | None]], list[tuple[Path, str | None]]]:
        """(record file, video root) pairs for train and val."""
        val = [(Path(self.val_file), self.video_root)] if self.val_file else []
        if not self._uses_synthetic():
            return [(Path(self.train_file), self.video_root)], val
        train_synthetic, val_synthetic = self._synthetic_files()
        # synthetic records name their videos relative to their own folder, whatever video_root says
        return [(path, None) for path in train_synthetic], val or [(path, None) for path in val_synthetic]

    def _synthetic_files(self) -> tuple[list[Path], list[Path]]:
        """Generate (or reuse) the synthetic or world train and val sets; returns their record files."""
        from streamvlm.train import synthetic

        if self.world is not None:
            return self._world_files()
        spec = dict(self.synthetic)
        out_dir = Path(spec.pop("out_dir", None) or cache_dir() / "synthetic").expanduser()
        seed = int(spec.pop("seed", self.seed))
        num_videos = int(spec.pop("num_videos", 16))
        val_videos = int(spec.pop("val_videos", 0))
        streaming = bool(spec.get("streaming", False))

        def files(json_path: Path) -> list[Path]:
            return [json_path, json_path.with_name(synthetic.STREAM_FILE)] if streaming else [json_path]

        train = files(synthetic.generate(out_dir / "train", num_videos, seed, **spec))
        # the val set comes from another seed, so it holds other videos
        val = files(synthetic.generate(out_dir / "val", val_videos, seed + 1, **spec)) if val_videos > 0 else []
        return train, val

    def _world_files(self) -> tuple[list[Path], list[Path]]:
        from streamvlm import world

        spec = dict(self.world)
        out_dir = Path(spec.pop("out_dir", None) or cache_dir() / "world").expanduser()
        seed = int(spec.pop("seed", self.seed))
        num_videos = int(spec.pop("num_videos", 1000))
        val_videos = int(spec.pop("val_videos", 0))
        clips = int(spec.pop("clips", 0))
        clip_seconds = float(spec.pop("clip_seconds", 3.0))
        leavers = int(spec.pop("leavers", 0))

        rich = spec.get("dialogue", "plain") == "rich"

        def files(folder: Path) -> list[Path]:
            # a rich dialogue ends with the description the LLaVA record holds: training on both would
            # ask it twice
            return [folder / world.STREAM_FILE] if rich else [folder / world.RECORD_FILE, folder / world.STREAM_FILE]

        train = files(world.generate(out_dir / f"train-{seed}", num_videos, seed, **spec))
        if clips:
            clip_spec = spec | {"seconds": clip_seconds}
            train += files(world.generate(out_dir / f"clips-{seed + 2}", clips, seed + 2, **clip_spec))
        if leavers:
            train += files(world.generate(out_dir / f"leavers-{seed + 3}", leavers, seed + 3, leaver=True, **spec))
        val = files(world.generate(out_dir / f"val-{seed + 1}", val_videos, seed + 1, **spec)) if val_videos else []
        return train, val


def _video_missing(path: str) -> tuple[str, str] | None:
    """("missing", message) when there is no file at path, else None."""
    return None if os.path.isfile(path) else ("missing", f"video file not found: {path}")


def _video_problem(path: str) -> tuple[str, str] | None:
    """(reason, message) when the video at path is missing or unreadable, else None."""
    missing = _video_missing(path)
    if missing is not None:
        return missing
    try:
        probe_video(path)
    except StreamVLMError as e:
        return "unreadable", str(e)
    return None
