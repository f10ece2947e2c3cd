"""What every model family adapter gives the runtime.

An adapter loads a local Hugging Face checkpoint with transformers' own model class and exposes the
pieces our decoder and session need. Differences between families live here, never as
`if family == ...` in the decoder or session.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from streamvlm.video.preprocess import PreprocessConfig


@dataclass(frozen=True)
class LayerParts:
    """One decoder layer's modules, as the checkpoint holds them (pre-norm attention then MLP)."""

    input_norm: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    post_attention_norm: nn.Module
    mlp: nn.Module
    """Called as mlp(x) on normed hidden states: (n, d) -> (n, d)."""


@dataclass(frozen=True)
class DecoderParts:
    """The language model's weights and shape, for `streamvlm.decoder.Decoder`."""

    embed_tokens: nn.Embedding
    layers: tuple[LayerParts, ...]
    rotary: nn.Module
    """rotary(x, position_ids (1, n)) -> (cos, sin), each (1, n, head_dim) in x's dtype."""
    norm: nn.Module
    lm_head: nn.Linear
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class VisionShape:
    """Per-frame token geometry after the family's pooling."""

    grid: tuple[int, int]
    """(rows, cols) of a frame's tokens; tokens_per_frame = rows * cols, in row-major order."""
    vision_flops_per_frame: float
    """Analytic FLOPs of encoding one frame (vision tower, projector, pooling)."""

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]


class FamilyAdapter(ABC):
    """A loaded checkpoint of one model family."""

    family: str
    """Name used in errors and `stats()`, e.g. "llava_onevision"."""

    def __init__(self, model_dir: Path, model: nn.Module, tokenizer, preprocess: PreprocessConfig,
                 decoder: DecoderParts, vision: VisionShape, video_token: str):
        self.model_dir = model_dir
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess_config = preprocess
        self.decoder = decoder
        self.vision = vision
        self.video_token = video_token
        """The placeholder the chat template writes where a video goes."""

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @staticmethod
    @abstractmethod
    def decoder_parts(model: nn.Module) -> DecoderParts:
        """The decoder's modules in `model`; called again after something (e.g. LoRA) replaces them."""

    @abstractmethod
    def frame_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (T, 3, h, w) on the model's device and dtype -> frame tokens
        (T, tokens_per_frame, hidden_size), differentiable (training the vision tower goes through it)."""

    @torch.inference_mode()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (T, 3, h, w) -> frame tokens (T, tokens_per_frame, hidden_size)."""
        return self.frame_features(pixels.to(self.device, self.dtype))

    @abstractmethod
    def video_tail(self) -> torch.Tensor:
        """Embeddings (n, hidden_size) that close a run of frames, before the text after the video."""

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Token ids that end an answer: the generation config's eos ids and the tokenizer's eos."""
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(ids))
