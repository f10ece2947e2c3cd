"""`StreamVLM`: a loaded checkpoint, a router, and the sessions that run on them."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from streamvlm.cores import single_core
from streamvlm.decoder import Decoder
from streamvlm.errors import FrameBudgetError, StreamVLMError
from streamvlm.generation import SamplingConfig
from streamvlm.memory import MemoryBudget
from streamvlm.models import FamilyAdapter, load_adapter
from streamvlm.routers import Router, resolve_routing
from streamvlm.sequence import SequenceBuilder
from streamvlm.session import Session
from streamvlm.video.files import TimedFrame, VideoClip, iter_frames, read_video
from streamvlm.video.preprocess import FrameInput, preprocess, resize_frame

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StreamVLMError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU (these CPUs have no fast bfloat16 matmul), bfloat16 on CUDA, unless told otherwise."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise StreamVLMError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


class StreamVLM:
    """A video language model that takes frames as they come.

    vlm = StreamVLM.from_pretrained("path/to/checkpoint")
    text = vlm.generate(frames, "What happens?")           # one shot
    session = vlm.session(); session.append_frames(frames); session.ask("...")
    """

    def __init__(self, adapter: FamilyAdapter, router: Router, sampling: SamplingConfig | None = None,
                 max_chunk_frames: int = 8, compile: bool = False):
        if max_chunk_frames < 1:
            raise ValueError("max_chunk_frames must be at least 1")
        self.adapter = adapter
        self.router = router.to(adapter.device).eval()
        self.router.bind(adapter.decoder)
        if hasattr(self.router, "bind_vision"):  # a router that ranks with the vision tower (cls_knee's CLS/MAP)
            self.router.bind_vision(adapter)
        self.decoder = Decoder(adapter.decoder, self.router, compile=compile)
        self.sampling = sampling or SamplingConfig()
        self.max_chunk_frames = max_chunk_frames
        """Frames fed through the decoder in one chunk; bounds the attention workspace of a big append."""

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, routing=None, *, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, sampling: SamplingConfig | None = None,
                        max_chunk_frames: int = 8, compile: bool = False) -> StreamVLM:
        """Load a local Hugging Face checkpoint folder (never the hub).

        routing: None or "dense"; a spec string such as "mod:0.2" or "mod:0.2:interleaved"; a RoutingConfig;
        a router directory (routing.json + router.safetensors); or a Router instance. device: default CUDA when present, else CPU. dtype: default
        bfloat16 on CUDA, float32 on CPU. compile: run decode steps through torch.compile (compiles on the first
        answer token, seconds on a CPU; off by default: on the CPUs measured eager is as fast).

        Loading runs on one core (it is mostly reading files), so a thread that loads a model and leaves the
        computing to others keeps no OpenMP team (`streamvlm.cores`).
        """
        device = resolve_device(device)
        with single_core():
            adapter = load_adapter(model_dir, resolve_dtype(dtype, device), device)
            router = resolve_routing(routing, adapter.decoder.num_layers, adapter.decoder.hidden_size,
                                     adapter.model_dir)
            return cls(adapter, router, sampling, max_chunk_frames, compile)

    def with_routing(self, routing) -> StreamVLM:
        """The same loaded model with another router (weights are shared, nothing is reloaded)."""
        parts = self.adapter.decoder
        router = resolve_routing(routing, parts.num_layers, parts.hidden_size, self.adapter.model_dir)
        return StreamVLM(self.adapter, router, self.sampling, self.max_chunk_frames, self.decoder.compiled)

    def fork(self) -> StreamVLM:
        """The same loaded model with a copy of its router, for another thread (some training-free routers keep
        per-call state, so one router must never serve two threads at once)."""
        return StreamVLM(self.adapter, copy.deepcopy(self.router), self.sampling, self.max_chunk_frames,
                         self.decoder.compiled)

    def batched(self, batcher) -> StreamVLM:
        """This model, its router and weights shared, whose sessions' forwards run in `batcher`'s steps with
        the other sessions it runs (continuous batching: `streamvlm.batching`). Drive each session from its
        own thread, and call `streamvlm.cores.one_core()` first in it: the batcher's step thread computes, and
        a driving thread that ran a parallel op on several cores would keep an OpenMP team that slows it."""
        view = copy.copy(self)
        view.decoder = batcher.decoder(self.decoder)
        return view

    @property
    def tokenizer(self):
        return self.adapter.tokenizer

    @property
    def tokens_per_frame(self) -> int:
        return self.adapter.vision.tokens_per_frame

    def preprocess(self, frames: FrameInput) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> float (T, 3, h, w), resized and normalized as the checkpoint says."""
        return preprocess(frames, self.adapter.preprocess_config, self.adapter.dtype, self.adapter.device)

    def resize(self, frame: torch.Tensor) -> torch.Tensor:
        """One uint8 frame (H, W, 3) -> uint8 (h, w, 3) at the size preprocessing makes, by the same op (so
        preprocessing a resized frame gives the same pixels as preprocessing the original)."""
        return resize_frame(frame, self.adapter.preprocess_config)

    def frame_capacity(self, reserve_tokens: int = 0) -> int:
        """How many input frames a fresh session's context holds, leaving `reserve_tokens` positions for the
        question, the answer and anything else. Counts the chat text around the frames; the session still
        checks exactly as it feeds them."""
        fixed, later = self._frame_positions
        room = self.adapter.decoder.max_positions - reserve_tokens - fixed
        return 0 if room < 0 else (1 + room // later) * self.adapter.frames_per_step

    @functools.cached_property
    def _frame_positions(self) -> tuple[int, int]:
        """(positions a video takes with one frame step: its chat text, the step's tokens, the video's tail and
        one more; positions each further step takes), planned once: every server request asks."""
        adapter = self.adapter
        step = adapter.frames_per_step
        plan = SequenceBuilder(adapter, trace=False).plan_frames([[0.0] * step, [1.0] * step])
        first, later = (len(ids) + self.tokens_per_frame for ids in plan.text_ids)
        return adapter.video_tail().shape[0] + 1 + first, later

    def read_video(self, path, *, num_frames: int | None = None, fps: float | None = None, start: float = 0.0,
                   end: float | None = None, max_frames: int | None = None, reserve_tokens: int = 0,
                   admit: Callable[[int], None] | None = None) -> VideoClip:
        """`streamvlm.video.files.read_video` with this model's bounds: the frame count is checked against the
        context (frame_capacity(reserve_tokens)) before anything is decoded (FrameBudgetError), and each
        frame is resized to the model's input size as it is decoded, so full-size frames are never held
        together. The pixels the model sees are the same as preprocessing the full-size frames.
        admit: a check of the frame count of your own instead (e.g. against a budget other media share)."""
        return read_video(path, num_frames=num_frames, fps=fps, start=start, end=end, max_frames=max_frames,
                          resize=self.resize, admit=admit or self._within_context(reserve_tokens))

    def _within_context(self, reserve_tokens: int) -> Callable[[int], None]:
        """A read's admit: refuses (FrameBudgetError) more frames than frame_capacity(reserve_tokens)."""
        capacity = self.frame_capacity(reserve_tokens)

        def admit(count: int) -> None:
            if count > capacity:
                limit = self.adapter.decoder.max_positions
                raise FrameBudgetError(
                    f"{count} frames need about {count * self.tokens_per_frame // self.adapter.frames_per_step} "
                    f"tokens, but the model's {limit}-token context holds at most {capacity} frames"
                    f"{' besides the text' if reserve_tokens else ''}; ask for at most {capacity} frames "
                    "(fewer num_frames, a lower fps, or max_frames)", count, capacity)

        return admit

    def iter_frames(self, path, *, fps: float | None = None, start: float = 0.0, end: float | None = None,
                    max_frames: int | None = None) -> Iterator[TimedFrame]:
        """`streamvlm.video.files.iter_frames` with each frame resized to the model's input size as it is
        decoded (for files too long to hold; the count is bounded by the caller's memory budget)."""
        return iter_frames(path, fps=fps, start=start, end=end, max_frames=max_frames, resize=self.resize)

    @torch.inference_mode()
    def encode(self, frames: FrameInput) -> torch.Tensor:
        """uint8 frames (T, H, W, 3) -> frame tokens (T, tokens_per_frame, hidden_size), for
        `Session.append_encoded` (e.g. to encode once and feed several sessions)."""
        return self.adapter.encode_frames(self.preprocess(frames))

    def session(self, memory_budget: str | int | MemoryBudget | None = None, *, system: str | None = None,
                **sampling) -> Session:
        """A new session with its own cache; keyword arguments override the default SamplingConfig.

        system: a system prompt, rendered by the checkpoint's chat template before the first turn (None: the
        template's default).
        memory_budget: bound the cache for unbounded streams: entries per layer (20000), bytes of K/V
        ("64MB", "2GiB"), "auto" (half the model's context) or a MemoryBudget, clamped to the context; None
        or "none" keeps everything (the default).
        """
        return Session(self.adapter, self.decoder, self.preprocess, self.max_chunk_frames,
                       self.sampling.with_overrides(**sampling), MemoryBudget.parse(memory_budget), system)

    def generate(self, frames: FrameInput, prompt: str, *, timestamps: Sequence[float] | None = None,
                 **sampling) -> str:
        """Answer `prompt` about `frames` in a fresh session (the exact prompt transformers' processor builds
        for one video and one prompt). Keyword arguments: see SamplingConfig."""
        session = self.session()
        session.append_frames(frames, timestamps)
        return session.ask(prompt, last=True, **sampling)
