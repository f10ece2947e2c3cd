"""SmolVLM2 (Idefics3 architecture): SigLIP vision tower + pixel-shuffle connector + Llama decoder.

Each video frame is one image, never split into tiles: the tower's side x side patch grid (side =
image_size // patch_size) is pixel-shuffled, each scale_factor x scale_factor block of patches folded into
one token, and projected to the decoder's width: (side / scale_factor)^2 tokens per frame, row-major
(27 / 3 -> 81 for SmolVLM2-2.2B, 32 / 4 -> 64 for the 256M and 500M models).

transformers' SmolVLMProcessor writes a video as

    "You are provided the following series of {count in words} frames from a {H:MM:SS} [H:MM:SS] video.\\n"
    per frame: "\\nFrame from MM:SS:" <fake_token_around_image><global-img> <image> * tokens <fake_token_around_image>
    "\\n\\n"

and so do we, with one deviation: a stream does not know its frame count or duration when its first frame
arrives, so our opening line is "You are provided the following series of frames from a video.\\n". Every
other character, and each frame's MM:SS timestamp, is the processor's. No embedding closes a video.

Preprocessing: SmolVLM's video processor resizes a frame's longest edge to `size` (keeping the aspect
ratio), then squashes it to the max_image_size square, with LANCZOS. We resize once, straight to the vision
tower's image_size square, with bicubic (torch has no LANCZOS; transformers itself falls back to bicubic
where torchvision cannot do LANCZOS), so real checkpoints see pixels close to, not equal to, the
processor's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.models.base import DecoderParts, FamilyAdapter, VisionShape, standard_decoder_parts
from streamvlm.models.siglip import siglip_flops
from streamvlm.video.preprocess import PreprocessConfig

VIDEO_INTRO = "You are provided the following series of frames from a video.\n"
"""The processor's opening line without the frame count and duration, which a stream cannot know."""
VIDEO_OUTRO = "\n\n"

_LANCZOS = 1  # PIL's code, what SmolVLM's processor configs ask for


def _vision_flops_per_frame(config) -> float:
    """Analytic FLOPs (multiply-add = 2) of the SigLIP tower and the connector's projection per frame."""
    v, t = config.vision_config, config.text_config
    patches = (v.image_size // v.patch_size) ** 2
    # pixel shuffle only moves data; the projection maps patches / s^2 tokens of d * s^2 features each
    return siglip_flops(v) + float(2 * patches * v.hidden_size * t.hidden_size)


def _processor_config(model_dir: Path) -> dict:
    """The checkpoint's video processor config (video_preprocessor_config.json), else its image one."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = model_dir / name
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise StreamVLMError(f"{path} is not valid JSON ({e})") from None
    raise StreamVLMError(
        f"{model_dir} has no video_preprocessor_config.json or preprocessor_config.json; a SmolVLM checkpoint "
        "needs one to say how frames are rescaled and normalized")


def preprocess_config(cfg: dict, image_size: int) -> PreprocessConfig:
    """Our one-step resize for a SmolVLM processor config: straight to the image_size square (see the
    module docstring), then its rescale and normalization."""
    resample = int(cfg.get("resample", _LANCZOS))
    return PreprocessConfig(
        height=image_size, width=image_size,
        mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))), std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
        resample={0: "nearest", 2: "bilinear"}.get(resample, "bicubic"),
        do_resize=bool(cfg.get("do_resize", True)), do_rescale=bool(cfg.get("do_rescale", True)),
        do_normalize=bool(cfg.get("do_normalize", True)),
    )


def sampling_fps(cfg: dict) -> float:
    """Frames per second the processor samples at (`fps`, or `video_sampling.fps`), 1.0 if neither says."""
    fps = cfg.get("fps") or (cfg.get("video_sampling") or {}).get("fps")
    return float(fps) if fps else 1.0


class SmolVLMAdapter(FamilyAdapter):
    family = "smolvlm"
    language_model_path = "model.text_model"
    vision_tower_path = "model.vision_model"

    def __init__(self, model_dir: Path, model, tokenizer, preprocess: PreprocessConfig, decoder: DecoderParts,
                 vision: VisionShape, video_token: str, image_token: str, fake_image_token: str,
                 global_image_token: str, fps: float):
        super().__init__(model_dir, model, tokenizer, preprocess, decoder, vision, video_token)
        self.frame_token = image_token
        self.fake_image_token = fake_image_token
        """Written around each frame's tokens."""
        self.global_image_token = global_image_token
        """Opens a frame's tokens (a frame is SmolVLM's unsplit "global" image)."""
        self.assumed_fps = fps

    @classmethod
    def load(cls, model_dir: Path, dtype: torch.dtype, device: torch.device, tokenizer) -> SmolVLMAdapter:
        model = cls.load_frozen("SmolVLMForConditionalGeneration", model_dir, dtype, device)
        config = model.config
        v = config.vision_config
        side, scale = v.image_size // v.patch_size, config.scale_factor
        if side % scale:  # SigLIP's stride-patch_size convolution drops a remainder of pixels (384 / 14 -> 27)
            raise StreamVLMError(
                f"{model_dir}: a {side}x{side} patch grid (image_size {v.image_size} // patch_size {v.patch_size}) "
                f"does not fold by scale_factor {scale}; SmolVLM's pixel shuffle needs a multiple of it per side")
        # The connector's pixel shuffle is row-major over (side / scale)^2 blocks (tests check it).
        vision = VisionShape(grid=(side // scale, side // scale),
                             vision_flops_per_frame=_vision_flops_per_frame(config))
        # Token strings as SmolVLMProcessor reads them: the tokenizer's named tokens, else the defaults.
        image_token = getattr(tokenizer, "image_token", None) or "<image>"
        if tokenizer.convert_tokens_to_ids(image_token) != config.image_token_id:
            raise StreamVLMError(
                f"{model_dir}: the tokenizer's {image_token!r} is id {tokenizer.convert_tokens_to_ids(image_token)} "
                f"but config.json says image_token_id = {config.image_token_id}; the checkpoint is inconsistent")
        processor = _processor_config(model_dir)
        return cls(model_dir, model, tokenizer, preprocess_config(processor, v.image_size), cls.decoder_parts(model),
                   vision, video_token=getattr(tokenizer, "video_token", None) or "<video>", image_token=image_token,
                   fake_image_token=getattr(tokenizer, "fake_image_token", None) or "<fake_token_around_image>",
                   global_image_token=getattr(tokenizer, "global_image_token", None) or "<global-img>",
                   fps=sampling_fps(processor))

    @staticmethod
    def decoder_parts(model) -> DecoderParts:
        """The Llama decoder's modules; call again after something (e.g. LoRA) replaces projections."""
        return standard_decoder_parts(model.model.text_model, model.config.text_config, model.lm_head)

    def frame_features(self, pixels: torch.Tensor) -> torch.Tensor:
        # transformers' own image path (tower, pixel shuffle, projection) on a batch of one sample holding
        # T images; with no pixel_attention_mask every patch is real, as for the processor's unpadded frames.
        out = self.model.model.get_image_features(pixels[None], return_dict=True)
        feats = torch.cat(list(out.pooler_output))  # (T' * tokens_per_frame, d)
        tpf = self.vision.tokens_per_frame
        if feats.shape[0] != pixels.shape[0] * tpf:
            # Pitfall: transformers drops images whose pixels are all exactly 0 as batch padding.
            raise StreamVLMError(
                f"{pixels.shape[0]} frames gave {feats.shape[0] // tpf} frames of tokens: SmolVLM treats a frame "
                "whose preprocessed pixels are all 0 as padding; such a frame cannot be encoded")
        return feats.view(pixels.shape[0], tpf, -1)

    def video_tail(self) -> torch.Tensor:
        return self.decoder.embed_tokens.weight.new_empty(0, self.decoder.hidden_size)

    def video_intro(self) -> str:
        return VIDEO_INTRO

    def frame_text(self, index: int, seconds: float) -> tuple[str, str]:
        stamp = f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"
        return f"\nFrame from {stamp}:{self.fake_image_token}{self.global_image_token}", self.fake_image_token

    def video_outro(self) -> str:
        return VIDEO_OUTRO
