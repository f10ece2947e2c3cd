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

from streamvlm.kernels import use_onednn_linears
from streamvlm.parts import DecoderParts, LayerParts
from streamvlm.video.preprocess import PreprocessConfig


def standard_decoder_parts(lm: nn.Module, text_config, lm_head: nn.Linear) -> DecoderParts:
    """DecoderParts of a Llama-style text model (Llama, Qwen2, Qwen3): lm.embed_tokens, lm.layers (pre-norm
    self_attn + mlp, per-head q_norm/k_norm where the family has them), lm.rotary_emb and lm.norm."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    layers = tuple(
        LayerParts(
            input_norm=layer.input_layernorm, q_proj=layer.self_attn.q_proj, k_proj=layer.self_attn.k_proj,
            v_proj=layer.self_attn.v_proj, o_proj=layer.self_attn.o_proj,
            post_attention_norm=layer.post_attention_layernorm, mlp=layer.mlp,
            q_norm=getattr(layer.self_attn, "q_norm", None), k_norm=getattr(layer.self_attn, "k_norm", None),
        )
        for layer in lm.layers
    )
    return DecoderParts(
        embed_tokens=lm.embed_tokens, layers=layers, rotary=lm.rotary_emb, norm=lm.norm, lm_head=lm_head,
        hidden_size=text_config.hidden_size, num_heads=text_config.num_attention_heads,
        num_kv_heads=text_config.num_key_value_heads, head_dim=head_dim,
        intermediate_size=text_config.intermediate_size, vocab_size=text_config.vocab_size,
        max_positions=text_config.max_position_embeddings,
    )


@dataclass(frozen=True)
class VisionShape:
    """Per-frame token geometry after the family's pooling."""

    grid: tuple[int, int]
    """(rows, cols) of a frame's tokens; tokens_per_frame = rows * cols, in row-major order."""
    vision_flops_per_frame: float
    """Analytic FLOPs of encoding one frame of tokens (vision tower, projector, pooling)."""
    deepstack: int = 0
    """Extra feature sets per token for the first decoder layers (Qwen3-VL's DeepStack); encoded frames
    then carry (1 + deepstack) * hidden_size features per token: the token, then each layer's addition."""

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]


def _own_memory(model: nn.Module) -> None:
    """Copy the parameters and buffers into memory of their own. transformers leaves CPU weights in the
    checkpoint file's memory map: a file rewritten in place (a checkpoint saved again into the same folder)
    would change the weights under a running model, and a file cut shorter would kill the process with SIGBUS
    at its next forward. Tied weights stay tied (one Parameter, copied once)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


class FamilyAdapter(ABC):
    """A loaded checkpoint of one model family.

    Besides the weights, an adapter says how a family lays a video out in its sequence, through hooks whose
    defaults are LLaVA-OneVision's (frames back to back, no text between them, plain RoPE):

        [template text before the video] video_intro() frame_text(0)[0] <frame 0 tokens> frame_text(0)[1]
        frame_text(1)[0] <frame 1 tokens> ... frame_text(k)[1] video_outro() <video_tail()> [template text after]

    A "frame" here is one frame of tokens: frames_per_step input frames (Qwen-VL folds 2 into one).
    """

    family: str
    """Name used in errors and `stats()`, e.g. "llava_onevision"."""
    frames_per_step: int = 1
    """Input frames the vision tower folds into one frame of tokens (Qwen-VL's temporal patch: 2)."""
    mrope: bool = False
    """True when the decoder uses 3-D multimodal RoPE; `vision_rope` then gives each frame's positions."""
    assumed_fps: float = 1.0
    """Frame rate assumed for frames given without timestamps (frame i at i / assumed_fps seconds)."""

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
        self.frame_token = video_token
        """The token transformers' processor writes once per frame token (Session.token_ids uses it)."""

    @staticmethod
    def load_frozen(model_class: str, model_dir: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
        """transformers' `model_class` loaded from a local folder onto `device`, in eval mode, no gradients; on
        the CPU its weights in memory of their own and its linear layers through oneDNN (streamvlm.kernels)."""
        import transformers

        model = getattr(transformers, model_class).from_pretrained(model_dir, dtype=dtype, local_files_only=True)
        model = model.to(device).eval()
        model.requires_grad_(False)
        if device.type == "cpu":
            _own_memory(model)
            use_onednn_linears(model)
        return model

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
        """Preprocessed pixels (T, 3, h, w) on the model's device and dtype, T a multiple of frames_per_step
        -> frame tokens (T / frames_per_step, tokens_per_frame, feature_dim), differentiable (training the
        vision tower goes through it)."""

    language_model_path = "model.language_model"
    """Where the decoder stack sits in transformers' model (what LoRA adapts and trainable "all" trains)."""
    vision_tower_path = "model.vision_tower"
    """Where the vision tower sits in transformers' model."""

    def language_model(self, model: nn.Module | None = None) -> nn.Module:
        """The decoder stack (embeddings and layers, not the LM head) of `model` (default: this adapter's)."""
        return (model or self.model).get_submodule(self.language_model_path)

    def vision_tower(self, model: nn.Module | None = None) -> nn.Module:
        """The vision tower of `model` (default: this adapter's), without the projector."""
        return (model or self.model).get_submodule(self.vision_tower_path)

    def lm_head(self, model: nn.Module | None = None) -> nn.Module:
        return (model or self.model).lm_head

    tower_prefix: str | None = None
    """Name prefix of the weights `tower_features` reads (the ones a feature cache must be keyed by), for a
    family whose encoder splits into `tower_features` and `project_features`; None when it does not split."""

    def tower_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The first part of `frame_features`, what a training cache can keep while the rest trains:
        `project_features(tower_features(p))` equals `frame_features(p)`. Families that do not split
        return the whole encoder's output here (for a frame count padded as `encode_frames` pads it) and
        leave `project_features` the identity."""
        return self.frame_features(self._pad_to_step(pixels))

    def project_features(self, tower: torch.Tensor) -> torch.Tensor:
        """The rest of `frame_features` after `tower_features` (differentiable)."""
        return tower

    @property
    def feature_dim(self) -> int:
        """Features per encoded token: hidden_size, times (1 + deepstack) for DeepStack families."""
        return self.decoder.hidden_size * (1 + self.vision.deepstack)

    @torch.inference_mode()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (T, 3, h, w) -> frame tokens (ceil(T / frames_per_step), tokens_per_frame,
        feature_dim). A count that is not a multiple of frames_per_step is padded with copies of the last
        frame, as transformers' Qwen-VL video processors do."""
        return self.frame_features(self._pad_to_step(pixels.to(self.device, self.dtype)))

    def _pad_to_step(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels padded to a multiple of frames_per_step with copies of the last frame."""
        if pad := -pixels.shape[0] % self.frames_per_step:
            pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
        return pixels

    @abstractmethod
    def video_tail(self) -> torch.Tensor:
        """Embeddings (n, hidden_size) that close a run of frames, before the text after the video."""

    def video_intro(self) -> str:
        """Text a video opens with, after the template's text before the video placeholder."""
        return ""

    def frame_text(self, index: int, seconds: float) -> tuple[str, str]:
        """Text before and after the tokens of frame `index` of a video, shown at `seconds` of the stream (the
        mean time of the input frames folded into it)."""
        return "", ""

    def video_outro(self) -> str:
        """Text that closes a video, before `video_tail()` and the template's text after the placeholder."""
        return ""

    def vision_rope(self, start: int, video_start: int, index: int, elapsed: float) -> torch.Tensor:
        """M-RoPE positions (3, tokens_per_frame) of frame `index` of a video whose first frame began at
        rope position `video_start` and `elapsed` seconds earlier; `start` is the rope position right after
        the text before this frame. Only families with mrope = True implement it."""
        raise NotImplementedError(f"{self.family} uses plain RoPE")

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Token ids that end an answer: the generation config's eos ids and the tokenizer's eos."""
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(ids))
