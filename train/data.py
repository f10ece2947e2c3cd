"""Video instruction data for training: samples, frame sampling, the token budget, the dataset, the sampler and
the data module.

Records come from record files in the formats `streamvlm.train.records` reads (LLaVA-Video, VideoLLM-online
streaming, VideoChat instructions, ShareGPT4Video captions). A Sample carries preprocessed pixels and the event
sequence the training module turns into tokens: for a LLaVA style record every frame, then the exchanges; for a
streaming one frames and exchanges interleaved by stream time.

Frames are sampled as the checkpoint's video processor samples them (`FrameSampling.from_checkpoint`) unless
the data config says otherwise. With a token budget (`VideoDataModule.set_token_budget`) a record too long for
the model's context is split at exchange boundaries into samples that fit, never cut inside an answer.

When a feature cache folder is set, the module saves the frozen vision tower's output at
`Sample.feature_path` and this dataset writes the frame timestamps beside it, so later epochs skip decoding
and the tower.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Iterator, Literal

import lightning
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from streamvlm.errors import StreamVLMError
from streamvlm.paths import cache_dir
from streamvlm.train.records import Exchange, Record, load_records, read_records, warn_bad_records
from streamvlm.video.files import check_sampling, probe_video, read_video
from streamvlm.video.preprocess import PreprocessConfig, preprocess, resize_frame

__all__ = [
    "EpochShuffleSampler", "Event", "Exchange", "FitReport", "FrameSampling", "Frames", "Record", "Sample",
    "TextTokens", "TokenBudget", "VideoDataModule", "VideoInstructionDataset", "collate_samples", "fit_records",
    "load_records",
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


# ---------------------------------------------------------------- frame sampling

_FPS_RULES = ("ticks", "floor", "round")
# Qwen-VL's processors and qwen-vl-utils: 2 frames per second, 4 to 768 frames.
_QWEN_FPS, _QWEN_MIN_FRAMES, _QWEN_MAX_FRAMES = 2.0, 4, 768
# SmolVLM2's processor: 1 frame per second, at most 64.
_SMOLVLM_FPS, _SMOLVLM_MAX_FRAMES = 1.0, 64


@dataclass(frozen=True)
class FrameSampling:
    """Which frames a sample decodes, over the span of the video it uses: the whole video for a LLaVA style
    record, up to the last exchange for a streaming one (from the part before's last exchange for a later part
    of a split one). Give num_frames or fps, or neither for every frame."""

    num_frames: int | None = None
    """N frames spread evenly over the span (a span with fewer frames gives each once)."""
    fps: float | None = None
    """Frames per second of the span, picked as fps_rule says."""
    fps_rule: Literal["ticks", "floor", "round"] = "ticks"
    """How fps picks frames. "ticks": the latest frame at each 1/fps tick from the span's start (streamvlm's
    reader: frames at the times a live stream gives them). "floor" / "round": as Hugging Face video processors
    do, span x fps frames rounded down (Qwen-VL's) or to the nearest (SmolVLM2's), kept within
    [min_frames, max_frames], spread evenly over the span."""
    min_frames: int = 1
    """Fewest frames an fps_rule of "floor" or "round" takes (a span with fewer frames gives all it has)."""
    max_frames: int | None = None
    """Most frames; more are thinned uniformly."""
    multiple: int = 1
    """Input frames per frame of tokens (Qwen-VL's temporal patch: 2). A LLaVA style sample's frame count is
    made a multiple of it, rounded as the processor rounds (num_frames to the nearest, fps counts down), so no
    pair is padded with a copy of its frame. A streaming sample's runs between exchanges are padded as a
    session pads them."""

    def __post_init__(self):
        check_sampling("frame sampling", self.num_frames, self.fps, 0.0, None, self.max_frames)
        if self.fps_rule not in _FPS_RULES:
            raise StreamVLMError(f"fps_rule must be one of {', '.join(_FPS_RULES)}, got {self.fps_rule!r}")
        if self.min_frames < 1 or self.multiple < 1:
            raise StreamVLMError(f"min_frames and multiple must be at least 1, got {self.min_frames} and "
                                 f"{self.multiple}")

    @classmethod
    def from_checkpoint(cls, model_dir: str | os.PathLike) -> FrameSampling | None:
        """How the checkpoint's video processor samples frames (`video_preprocessor_config.json`, else
        `preprocessor_config.json`), or None when its config says nothing about sampling (LLaVA-OneVision's
        processor takes the frames it is given).

        Qwen2-VL, Qwen2.5-VL, Qwen3-VL (configs with a `temporal_patch_size`): `num_frames` when set (rounded
        to a multiple of the temporal patch), else `fps` (default 2, as qwen-vl-utils samples) frames per
        second rounded down to a multiple of it, within `min_frames` (4) and `max_frames` (768). SmolVLM2:
        `fps` (1) frames per second, rounded, at most `num_frames` (64; SmolVLM's processor reads num_frames as
        a cap) or `video_sampling`'s values. Other processors: `num_frames`, or `fps` with `min_frames` and
        `max_frames`. `do_sample_frames` is not read: it says whether transformers' processor samples the
        frames itself or takes them sampled elsewhere, not how many the model expects.
        """
        model_dir = Path(model_dir)
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = model_dir / name
            if path.is_file():
                try:
                    cfg = json.loads(path.read_text())
                except (OSError, ValueError) as e:
                    raise StreamVLMError(f"cannot read {path} ({e}); it must be the processor's JSON config") from e
                return cls.from_processor_config(cfg)
        return None

    @classmethod
    def from_processor_config(cls, cfg: dict) -> FrameSampling | None:
        """from_checkpoint's rules on a processor config already read."""
        kinds = " ".join(str(cfg.get(key, "")) for key in ("video_processor_type", "image_processor_type",
                                                               "processor_class"))
        sampling = cfg.get("video_sampling") or {}
        if "SmolVLM" in kinds:
            return cls(fps=float(cfg.get("fps") or sampling.get("fps") or _SMOLVLM_FPS), fps_rule="round",
                       max_frames=int(cfg.get("num_frames") or sampling.get("max_frames") or _SMOLVLM_MAX_FRAMES))
        if "temporal_patch_size" in cfg:
            multiple = int(cfg["temporal_patch_size"] or 1)
            max_frames = int(cfg.get("max_frames") or _QWEN_MAX_FRAMES)
            if cfg.get("num_frames"):
                return cls(num_frames=int(cfg["num_frames"]), max_frames=max_frames, multiple=multiple)
            return cls(fps=float(cfg.get("fps") or _QWEN_FPS), fps_rule="floor",
                       min_frames=int(cfg.get("min_frames") or _QWEN_MIN_FRAMES), max_frames=max_frames,
                       multiple=multiple)
        max_frames = int(cfg["max_frames"]) if cfg.get("max_frames") else None
        if cfg.get("num_frames"):
            return cls(num_frames=int(cfg["num_frames"]), max_frames=max_frames)
        if cfg.get("fps"):
            return cls(fps=float(cfg["fps"]), fps_rule="floor", min_frames=int(cfg.get("min_frames") or 1),
                       max_frames=max_frames)
        return None

    @property
    def counts_span(self) -> bool:
        """Whether the frame count depends on the span's length (fps counted as a processor counts it)."""
        return self.fps is not None and self.fps_rule != "ticks"

    def count(self, span: float) -> int:
        """Frames an fps_rule of "floor" or "round" takes over `span` seconds."""
        exact = span * self.fps
        n = math.floor(exact + 1e-9) if self.fps_rule == "floor" else round(exact)
        n = max(n, self.min_frames)
        if self.max_frames is not None:
            n = min(n, self.max_frames)
        return max(1, self._round_down(n))

    def read_args(self, span: float | None) -> dict:
        """read_video's num_frames, fps and max_frames; span (seconds) is needed when counts_span."""
        if self.num_frames is not None:
            n = self.num_frames
            if self.multiple > 1:  # Qwen-VL's processors round num_frames to the nearest multiple
                n = max(self.multiple, round(n / self.multiple) * self.multiple)
            return {"num_frames": n, "fps": None, "max_frames": self.max_frames}
        if self.counts_span:
            if span is None:
                raise ValueError("fps counted over the span needs the span's length")
            return {"num_frames": self.count(span), "fps": None, "max_frames": None}
        return {"num_frames": None, "fps": self.fps, "max_frames": self.max_frames}

    def bound(self, span: float | None, rate: float | None) -> int | None:
        """The most frames a span of `span` seconds of a video at `rate` frames per second gives (either may
        be None: unknown); None when nothing bounds it."""
        available = math.ceil(span * rate) + 1 if span is not None and rate else None
        if self.num_frames is not None or self.counts_span:
            asked = self.read_args(span if span is not None else 0.0)["num_frames"]
            if span is None and self.counts_span:  # unknown length: as many as max_frames allows
                asked = self.max_frames
            wanted = asked if self.max_frames is None or asked is None else min(asked, self.max_frames)
        elif self.fps is not None and span is not None:
            ticks = max(1, math.ceil(span * self.fps - _EPS))
            wanted = ticks if self.max_frames is None else min(ticks, self.max_frames)
        else:
            wanted = self.max_frames
        if wanted is None:
            return available
        return wanted if available is None else min(wanted, available)

    def trim(self, count: int) -> int:
        """A LLaVA style sample's frame count made a multiple of `multiple` (kept when it has fewer)."""
        return count if count < self.multiple else self._round_down(count)

    def _round_down(self, n: int) -> int:
        return n if n < self.multiple else n // self.multiple * self.multiple


DEFAULT_SAMPLING = FrameSampling(num_frames=8, max_frames=64)
"""Frames of a checkpoint whose processor says nothing about sampling, when the data config says nothing either."""


# ---------------------------------------------------------------- token budget


class TextTokens:
    """A tokenizer as a text -> token count function (picklable, so loader workers can hold it)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


@dataclass(frozen=True)
class TokenBudget:
    """How many positions a sample takes in the model's context, and how many there are.

    A sample's length is counted from its events as the sequence builder lays them out: each run of frames
    takes video_text, plus ceil(frames / frames_per_step) frames of tokens of tokens_per_frame + frame_text
    each; each exchange takes its question's and answer's tokens (count_text) plus exchange_text; every sample
    takes fixed_text once. With only the first four fields the count is a lower bound (no template text);
    `for_adapter` measures the rest on a loaded model, so the count is within a few tokens of the layout
    (text tokenized alone can merge differently in context, and digits of times and frame counts vary:
    exchange_text and video_text carry 2 tokens of slack each).

    A sample fits when its count is at most max_positions - reserve.
    """

    max_positions: int
    """The model's context length (`DecoderParts.max_positions`)."""
    tokens_per_frame: int
    """Tokens of one frame of tokens (`VisionShape.tokens_per_frame`)."""
    count_text: Callable[[str], int]
    """Text -> its token count (`TextTokens(tokenizer)`)."""
    frames_per_step: int = 1
    """Input frames per frame of tokens (Qwen-VL: 2; an odd run is padded to a pair)."""
    frame_text: int = 0
    """Text tokens around each frame of tokens (Qwen3-VL's timestamps, SmolVLM2's frame captions)."""
    video_text: int = 0
    """Text and tail tokens around each run of frames (the family's video intro, outro and tail)."""
    exchange_text: int = 0
    """Chat-template tokens of one exchange besides its question and answer (turn markers, end of turn)."""
    fixed_text: int = 0
    """Tokens every sample has once (a BOS, a system prompt the template writes)."""
    reserve: int = 0
    """Positions kept free."""

    def __post_init__(self):
        if self.max_positions < 1 or self.tokens_per_frame < 1 or self.frames_per_step < 1:
            raise StreamVLMError("a token budget needs positive max_positions, tokens_per_frame and frames_per_step, "
                                 f"got {self.max_positions}, {self.tokens_per_frame}, {self.frames_per_step}")

    @classmethod
    def for_adapter(cls, adapter, reserve: int = 0) -> TokenBudget:
        """The budget of a loaded model (`StreamVLM.adapter`), its template costs measured by laying dialogues
        out with the runtime's sequence builder (as training and sessions lay them out)."""
        from streamvlm.sequence import SequenceBuilder, lay_out_dialogue

        step = adapter.frames_per_step
        tpf = adapter.vision.tokens_per_frame
        count_text = TextTokens(adapter.tokenizer)
        question, answer = "What happens in the video?", "A red square moves to the left."

        def length(*events: Event) -> int:
            frames = max((e.end for e in events if isinstance(e, Frames)), default=0)
            times = [1000.0 + i for i in range(frames)]  # four-digit times: Qwen3-VL writes them per frame
            builder = SequenceBuilder(adapter, trace=False)
            width = adapter.decoder.hidden_size * (1 + adapter.vision.deepstack)
            pieces = lay_out_dialogue(builder, events, times,
                                      lambda a, b: torch.zeros(math.ceil((b - a) / step), tpf, width), set())
            return builder.tokens(pieces)

        ask = Exchange(question, answer)
        one = length(Frames(0, step), ask)
        per_step = length(Frames(0, 2 * step), ask) - one
        per_exchange = length(Frames(0, step), ask, ask) - one
        per_video = length(Frames(0, step), ask, Frames(step, 2 * step), ask) - one - per_exchange - per_step
        texts = count_text(question) + count_text(answer)
        return cls(
            max_positions=adapter.decoder.max_positions, tokens_per_frame=tpf, count_text=count_text,
            frames_per_step=step, frame_text=max(0, per_step - tpf), video_text=max(0, per_video) + 2,
            exchange_text=max(0, per_exchange - texts) + 2,
            fixed_text=max(0, one - per_video - per_step - per_exchange), reserve=reserve)

    @property
    def limit(self) -> int:
        """The most tokens a sample may take."""
        return self.max_positions - self.reserve

    def frames_tokens(self, frames: int) -> int:
        """Tokens of one run of `frames` input frames (0 for none)."""
        if frames <= 0:
            return 0
        return self.video_text + math.ceil(frames / self.frames_per_step) * (self.tokens_per_frame + self.frame_text)

    def exchange_tokens(self, exchange: Exchange) -> int:
        return self.count_text(exchange.question) + self.count_text(exchange.answer) + self.exchange_text

    def tokens(self, events: Sequence[Event]) -> int:
        """Tokens of a sample laid out from `events` (a LLaVA style one: [Frames(0, T), *exchanges])."""
        return self.fixed_text + sum(self.frames_tokens(e.end - e.start) if isinstance(e, Frames)
                                     else self.exchange_tokens(e) for e in events)

    def fits(self, events: Sequence[Event]) -> bool:
        return self.tokens(events) <= self.limit

    def text_bound(self, exchange: Exchange) -> int:
        """At least exchange_tokens(exchange), without tokenizing: a text of b UTF-8 bytes is taken to need at
        most b + 1 tokens (true of byte-level BPE and of SentencePiece with byte fallback)."""
        return (len(exchange.question.encode()) + len(exchange.answer.encode()) + 2) + self.exchange_text


# ---------------------------------------------------------------- fitting records to the context


@dataclass
class FitReport:
    """What fitting a split's records to the token budget did."""

    records: int = 0
    """Records planned."""
    split: int = 0
    """Records split into several samples."""
    samples: int = 0
    """Samples the split records became."""
    dropped_exchanges: int = 0
    """Exchanges left out because, with the frames they need, they alone exceed the budget."""
    skipped: int = 0
    """Records of which nothing fits (not even the frames and one exchange)."""
    skipped_ids: list[str] = field(default_factory=list)
    """The first few skipped records' ids, for the log."""

    def message(self, split: str, budget: TokenBudget) -> str | None:
        """One line for the log, None when every record fit whole."""
        if not (self.split or self.dropped_exchanges or self.skipped):
            return None
        parts = [f"{split}: of {self.records} records for the {budget.limit}-token budget"]
        if self.split:
            parts.append(f"{self.split} were split into {self.samples} samples at exchange boundaries")
        if self.dropped_exchanges:
            parts.append(f"{self.dropped_exchanges} exchanges were left out (with their frames, each alone is "
                         "too long)")
        if self.skipped:
            parts.append(f"{self.skipped} were skipped (even their frames and first exchange are too long; e.g. "
                         f"{', '.join(self.skipped_ids)})")
        return "; ".join(parts) + ". Fewer frames (num_frames, fps, max_frames) make more of them fit."


VideoInfo = tuple[float, float]
"""(duration in seconds, frames per second) of a probed video."""


def fit_records(records: Sequence[Record], budget: TokenBudget, sampling: FrameSampling,
                videos: dict[str, VideoInfo] | None = None) -> tuple[list[Record], FitReport]:
    """Records split so that each fits the budget, as the dataset will sample their frames.

    A LLaVA style record keeps all its frames in every part, and its exchanges in order go into as many parts
    as needed (frames first, then as many whole exchanges as fit). A streaming record is cut at exchange
    boundaries into consecutive parts, each with the frames since the part before's last exchange. An exchange
    that does not fit even alone (with its frames) is left out; a record none of whose exchanges fits is
    skipped. Frame counts are planned from the sampling and the video's length and rate (`videos`: path ->
    (duration, fps) of probed videos; a LLaVA style record's video whose length decides its frame count and
    matters is probed here and added); the dataset checks each loaded sample again and cuts it at an exchange
    boundary in the rare case the plan was short.
    """
    report = FitReport(records=len(records))
    fitted: list[Record] = []
    videos = {} if videos is None else videos
    for record in records:
        plan = _Plan(record, budget, sampling, videos)
        parts = plan.parts()
        report.dropped_exchanges += plan.dropped
        if not parts:
            report.skipped += 1
            if len(report.skipped_ids) < 3:
                report.skipped_ids.append(record.id)
            continue
        if len(parts) > 1:
            report.split += 1
            report.samples += len(parts)
            parts = [replace(part, id=f"{record.id}#{i + 1}") for i, part in enumerate(parts)]
        fitted += parts
    return fitted, report


class _Plan:
    """One record's parts under a budget (see fit_records)."""

    def __init__(self, record: Record, budget: TokenBudget, sampling: FrameSampling, videos: dict[str, VideoInfo]):
        self.record, self.budget, self.sampling, self.videos = record, budget, sampling, videos
        self.duration, self.rate = videos.get(record.video, (None, None))
        self.dropped = 0
        self._costs: dict[int, int] = {}

    def parts(self) -> list[Record]:
        record, budget = self.record, self.budget
        # without tokenizing: a record whose frames and text, both bounded from above, fit, fits whole
        text = sum(map(budget.text_bound, record.exchanges))
        if self._frame_tokens_bound() + budget.fixed_text + text <= budget.limit:
            return [record]
        if record.kind == "llava" and self.duration is None and self.sampling.num_frames is None:
            # the frame count follows the video's length, unknown until probed (generated videos are not
            # probed at setup): probe it rather than plan for max_frames
            self._probe()
            if self._frame_tokens_bound() + budget.fixed_text + text <= budget.limit:
                return [record]
        if record.kind == "stream":
            return self._stream_parts()
        return self._llava_parts()

    def _probe(self) -> None:
        try:
            info = probe_video(self.record.video)
        except (StreamVLMError, OSError):
            return  # the dataset skips it when it fails to decode
        self.duration, self.rate = self.videos[self.record.video] = (info["duration"], info["fps"])

    def _cost(self, index: int) -> int:
        if index not in self._costs:
            self._costs[index] = self.budget.exchange_tokens(self.record.exchanges[index])
        return self._costs[index]

    def _llava_parts(self) -> list[Record]:
        room = self.budget.limit - self.budget.fixed_text - self._frame_tokens_bound()
        groups: list[list[Exchange]] = []
        current: list[Exchange] = []
        used = 0
        for index, exchange in enumerate(self.record.exchanges):
            cost = self._cost(index)
            if cost > room:  # not even alone with the frames
                self.dropped += 1
                continue
            if used + cost > room:
                groups.append(current)
                current, used = [], 0
            current.append(exchange)
            used += cost
        if current:
            groups.append(current)
        return [replace(self.record, exchanges=tuple(group)) for group in groups]

    def _stream_parts(self) -> list[Record]:
        parts: list[Record] = []
        start = self.record.start
        first = 0  # index of the current part's first exchange
        exchanges = self.record.exchanges
        index = 0
        while index < len(exchanges):
            if self._fits(start, first, index + 1):
                index += 1
                continue
            if index > first:  # close the part before this exchange; it opens the next
                parts.append(self._part(start, first, index))
                start, first = exchanges[index - 1].time, index
                continue
            self.dropped += 1  # this exchange alone is too long: the next part starts after it
            start, first, index = exchanges[index].time, index + 1, index + 1
        if index > first:
            parts.append(self._part(start, first, index))
        return parts

    def _part(self, start: float | None, first: int, end: int) -> Record:
        return replace(self.record, exchanges=self.record.exchanges[first:end], start=start)

    def _fits(self, start: float | None, first: int, end: int) -> bool:
        part = self._part(start, first, end)
        times = self._planned_times(part)
        runs = _events(part, torch.tensor(times, dtype=torch.float64)) if times else []
        frames = sum(self.budget.frames_tokens(e.end - e.start) for e in runs if isinstance(e, Frames))
        text = sum(self._cost(i) for i in range(first, end))
        return self.budget.fixed_text + frames + text <= self.budget.limit

    def _span(self, record: Record) -> float | None:
        start = record.start or 0.0
        stop = _decode_end(record)
        if self.duration is not None:
            stop = self.duration if stop is None else min(stop, self.duration)
        return None if stop is None else max(stop - start, 0.0)

    def _frame_tokens_bound(self) -> int:
        """The most tokens the whole record's frames take: one run for a LLaVA style record; for a streaming
        one up to a run per exchange, each with its video text and (frames in pairs) a padded pair."""
        record, budget = self.record, self.budget
        count = self.sampling.bound(self._span(record), self.rate) or 0
        if record.kind == "llava":
            return budget.frames_tokens(self.sampling.trim(count))
        runs = min(count, len(record.exchanges))
        if not runs:
            return 0
        padded = runs - 1 if budget.frames_per_step > 1 else 0
        return (budget.frames_tokens(count) + (runs - 1) * budget.video_text
                + padded * (budget.tokens_per_frame + budget.frame_text))

    def _planned_times(self, record: Record) -> list[float]:
        """Frame times a streaming part is expected to get: its planned count spread evenly over its span
        (after its start, which belongs to the part before)."""
        span = self._span(record)
        count = self.sampling.bound(span, self.rate) or 0
        if not count or span is None:
            return []
        origin = record.start or 0.0
        shift = 1 if record.start is not None else 0
        return [origin + span * (i + shift) / (count + shift) for i in range(count)]


# ---------------------------------------------------------------- dataset


class VideoInstructionDataset(Dataset):
    """Records -> Samples: decode, preprocess (float32, CPU) and lay out events.

    Items are None for videos that fail to decode (strict=False; a warning names the file); collate_samples
    drops them. With feature_dir, an item whose features (`<key>.pt`, written by the training module) and
    timestamps (`<key>.json`, written here) are both cached is returned without decoding, pixels None.
    With a budget, a loaded sample longer than it is cut after the last exchange that fits (a warning says so;
    fit_records plans records so that this is rare), and is None when not even its first exchange fits.
    """

    def __init__(
        self,
        records: list[Record],
        preprocess_config: PreprocessConfig,
        sampling: FrameSampling = DEFAULT_SAMPLING,
        feature_dir: str | os.PathLike | None = None,
        strict: bool = False,
        encoder: str | None = None,
        budget: TokenBudget | None = None,
        videos: dict[str, VideoInfo] | None = None,
    ):
        """
        Args:
            encoder: an identity of the weights that encode frames (a hash), part of the feature cache's key.
            videos: path -> (duration, fps) of videos probed already; sampling that counts frames over a
                video's length probes the others.
        """
        self.records = list(records)
        self.preprocess_config = preprocess_config
        self.sampling = sampling
        self.feature_dir = Path(feature_dir).expanduser() if feature_dir is not None else None
        self.strict = strict
        self.encoder = encoder
        self.budget = budget
        self.videos = dict(videos or {})
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
        """Where the features of `record` are cached: a hash of the file's identity, the sampling, the span,
        the preprocessing and the encoder, so a changed video, setting or vision tower never reuses stale
        features. The parts of a split LLaVA style record share their frames, so their features too.
        None when caching is off."""
        if self.feature_dir is None:
            return None
        stat = os.stat(record.video)
        key = {
            "video": record.video, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sampling": asdict(self.sampling), "start": record.start, "end": _decode_end(record),
            "preprocess": asdict(self.preprocess_config),
        }
        if self.encoder is not None:
            key["encoder"] = self.encoder
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return str(self.feature_dir / f"{digest}.pt")

    def _load(self, record: Record) -> Sample | None:
        feature_path = self.feature_path(record)
        timestamps = _cached_timestamps(feature_path) if feature_path is not None else None
        pixels = None
        if timestamps is None:
            pixels, timestamps = self._decode(record)
            if feature_path is not None:
                _write_timestamps(feature_path, record.video, timestamps)
        events = _events(record, timestamps)
        if self.budget is None or self.budget.fits(events):
            return Sample(record.id, record.video, pixels, timestamps, events, feature_path)
        return self._cut(record, pixels, timestamps, events, feature_path)

    def _cut(self, record: Record, pixels: torch.Tensor | None, timestamps: torch.Tensor, events: list[Event],
             feature_path: str | None) -> Sample | None:
        """The sample cut after its last exchange that fits the budget; None when its first does not."""
        budget = self.budget
        used, keep = budget.fixed_text, 0
        for index, event in enumerate(events):
            used += budget.frames_tokens(event.end - event.start) if isinstance(event, Frames) else \
                budget.exchange_tokens(event)
            if used > budget.limit:
                break
            if isinstance(event, Exchange):
                keep = index + 1
        total = sum(isinstance(e, Exchange) for e in events)
        kept = events[:keep]
        exchanges = sum(isinstance(e, Exchange) for e in kept)
        if not exchanges:
            log.warning("skipping record %r of %s: %d tokens, over the %d-token budget even with only its first "
                        "exchange", record.id, record.video, budget.tokens(events), budget.limit)
            return None
        log.warning("record %r of %s: keeping %d of its %d exchanges, the rest is over the %d-token budget",
                    record.id, record.video, exchanges, total, budget.limit)
        frames = max((e.end for e in kept if isinstance(e, Frames)), default=0)
        if frames == len(timestamps):  # the same frames: cached features stay valid
            return Sample(record.id, record.video, pixels, timestamps, kept, feature_path)
        if pixels is None:  # the cache holds every frame's features; this sample wants fewer
            pixels, _ = self._decode(record)
        # fewer frames than the feature cache's key stands for: this sample is not cached
        return Sample(record.id, record.video, pixels[:frames], timestamps[:frames], kept, None)

    def _decode(self, record: Record) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (T, 3, h, w) pixels and float64 (T,) timestamps of the frames the record uses."""
        cfg = self.preprocess_config  # frames are resized as they decode: full-size frames are never held together
        start, end = record.start or 0.0, _decode_end(record)
        span = None
        if self.sampling.counts_span or record.start is not None:
            duration = self._duration(record.video)
            if start >= duration:  # a later part of a split record whose exchanges all come after the video
                return torch.empty(0, 3, cfg.height, cfg.width), torch.empty(0, dtype=torch.float64)
            span = (duration if end is None else min(end, duration)) - start
        clip = read_video(record.video, start=start, end=end, resize=partial(resize_frame, cfg=cfg),
                          **self.sampling.read_args(span))
        times = clip.timestamps
        first = 0 if record.start is None else bisect.bisect_right(times.tolist(), record.start + _EPS)
        count = _frames_used(record, times)
        if record.kind != "stream":
            count = first + self.sampling.trim(count - first)
        if count <= first:  # every exchange precedes the first frame: a text-only sample
            return torch.empty(0, 3, cfg.height, cfg.width), times[:0]
        return preprocess(clip.frames[first:count], cfg), times[first:count]

    def _duration(self, path: str) -> float:
        if path not in self.videos:
            info = probe_video(path)
            self.videos[path] = (info["duration"], info["fps"])
        return self.videos[path][0]


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
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
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
            model_dir: checkpoint folder whose processor configs say how frames are resized and normalized
                (unless the training module calls set_preprocess_config) and sampled (unless it calls
                set_frame_sampling).
            num_frames: frames sampled uniformly per video. Unset with fps unset: the checkpoint's video
                processor decides (`FrameSampling.from_checkpoint`; Qwen-VL: 2 per second in pairs, SmolVLM2:
                1 per second), else 8.
            fps: frames per second to sample instead of num_frames (the latest frame at each 1/fps tick).
            max_frames: cap on frames per video, thinned uniformly (unset: the processor's, else 64).
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
        """reason -> records dropped: "malformed", "missing", "unreadable" in setup; "too_long" (nothing of
        them fits the token budget) when the datasets are made."""
        self.fitted: dict[str, FitReport] = {}
        """split ("train", "val") -> what fitting its records to the token budget did (with a budget set)."""
        self.train_records: list[Record] | None = None
        """Training records with readable videos, after setup."""
        self.val_records: list[Record] | None = None
        """Validation records with readable videos, after setup; None without validation data."""
        self._preprocess_config: PreprocessConfig | None = None
        self._family_sampling: FrameSampling | None = None
        self._family_known = False
        """Whether _family_sampling was set or read from model_dir (it may be None: the processor says nothing)."""
        self._budget: TokenBudget | None = None
        self._encoder: str | None = None
        self._videos: dict[str, VideoInfo] = {}
        self._datasets: dict[str, VideoInstructionDataset] = {}
        self._plans: dict[str, tuple[tuple, list[Record]]] = {}

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

    def set_frame_sampling(self, sampling: FrameSampling | None) -> None:
        """The model's own frame sampling (`FrameSampling.from_checkpoint(model_dir)`), used where the data
        config sets no num_frames or fps, instead of model_dir's. Call it before the dataloaders are made."""
        self._family_sampling = sampling
        self._family_known = True
        self._datasets.clear()

    def set_token_budget(self, budget: TokenBudget | None) -> None:
        """Fit samples to a model's context: records longer than `budget` are split at exchange boundaries
        or skipped, counted in `fitted` and logged once per split (see fit_records). None (the default)
        accepts every record whole. Call it before the dataloaders are made (the CLI's before_fit)."""
        self._budget = budget
        self._datasets.clear()

    @property
    def sampling(self) -> FrameSampling:
        """How frames are sampled: num_frames or fps from the data config when either is set, else the
        model's processor's sampling, else 8 frames; max_frames from the config, else the model's, else 64.
        Frames fold in the model's pairs (Qwen-VL) either way."""
        if not self._family_known:
            self._family_sampling = FrameSampling.from_checkpoint(self.model_dir) if self.model_dir else None
            self._family_known = True
        family = self._family_sampling
        multiple = family.multiple if family is not None else 1
        if self.num_frames is not None or self.fps is not None:
            cap = self.max_frames or (family.max_frames if family is not None else None) or DEFAULT_SAMPLING.max_frames
            return FrameSampling(num_frames=self.num_frames, fps=self.fps, max_frames=cap, multiple=multiple)
        sampling = family or DEFAULT_SAMPLING
        return sampling if self.max_frames is None else replace(sampling, max_frames=self.max_frames)

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
        """The split's dataset, made on first use (the preprocess config, sampling and budget may be set
        after setup)."""
        if records is None:
            return None
        if split not in self._datasets:
            sampling = self.sampling
            self._datasets[split] = VideoInstructionDataset(
                self._fitted(split, records, sampling), self.preprocess_config, sampling, self.feature_cache,
                self.strict, self._encoder, self._budget, self._videos)
        return self._datasets[split]

    def _fitted(self, split: str, records: list[Record], sampling: FrameSampling) -> list[Record]:
        """The split's records fitted to the token budget, planned (and logged) once per budget and sampling."""
        if self._budget is None:
            return records
        key = (self._budget, sampling, len(records))
        if split in self._plans and self._plans[split][0] == key:
            return self._plans[split][1]
        fitted, report = fit_records(records, self._budget, sampling, self._videos)
        self._plans[split] = (key, fitted)
        self.fitted[split] = report
        too_long = sum(r.skipped for r in self.fitted.values())
        if too_long:
            self.skipped["too_long"] = too_long
        message = report.message(split, self._budget)
        if message is not None:
            log.warning("%s", message)
        if not fitted:
            raise StreamVLMError(f"no {split} record fits the model's {self._budget.limit}-token context; "
                                 "sample fewer frames (num_frames, fps, max_frames)")
        return fitted

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
        skipped. Probed videos' durations and rates are kept for sampling and fitting."""
        paths = sorted({record.video for record in records})
        check = _video_problem if probe else _video_missing
        # probing decodes one frame per file; threads overlap the file reads (PyAV releases the GIL)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            found = pool.map(check, paths)
            checked = dict(zip(paths, tqdm(found, total=len(paths), desc="checking videos", unit="file",
                                           disable=len(paths) < 1000)))
        problems = {path: problem for path, (problem, _) in checked.items() if problem is not None}
        self._videos.update({path: info for path, (_, info) in checked.items() if info is not None})
        if self.strict:
            for record in records:
                if record.video in problems:
                    raise StreamVLMError(f"{record.source} (id {record.id!r}): {problems[record.video][1]}")
        for path, problem in problems.items():
            log.warning("skipping the records of %s: %s", path, problem[1])
        for record in records:
            if record.video in problems:
                reason = problems[record.video][0]
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
        return [record for record in records if record.video not in problems]

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


def _video_missing(path: str) -> tuple[tuple[str, str] | None, None]:
    """(("missing", message), None) when there is no file at path, else (None, None)."""
    return (None if os.path.isfile(path) else ("missing", f"video file not found: {path}")), None


def _video_problem(path: str) -> tuple[tuple[str, str] | None, VideoInfo | None]:
    """((reason, message), None) when the video at path is missing or unreadable, else (None, its
    (duration, fps))."""
    missing, _ = _video_missing(path)
    if missing is not None:
        return missing, None
    try:
        info = probe_video(path)
    except StreamVLMError as e:
        return ("unreadable", str(e)), None
    return None, (info["duration"], info["fps"])
