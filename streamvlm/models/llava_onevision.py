"""LLaVA-OneVision: SigLIP vision tower + 2-layer MLP projector + Qwen2 decoder.

Video frames are encoded one by one (no anyres tiling): the tower's patch grid is projected, pooled
2x2 with bilinear interpolation to ceil(side / 2) per side (27x27 -> 14x14 = 196 tokens for the real
models), and a video closes with one `image_newline` embedding. transformers' processor expands the
`<video>` placeholder to frames * pooled tokens + 1 for that newline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from streamvlm.models.siglip import siglip_flops
from streamvlm.models.base import DecoderParts, FamilyAdapter, VisionShape, standard_decoder_parts
from streamvlm.video.preprocess import PreprocessConfig


def _vision_flops_per_frame(config) -> float:
    """Analytic FLOPs of the SigLIP tower, the projector and nothing else per frame."""
    v, t = config.vision_config, config.text_config
    patches = (v.image_size // v.patch_size) ** 2
    projector = 2 * patches * v.hidden_size * t.hidden_size + 2 * patches * t.hidden_size * t.hidden_size
    return siglip_flops(v) + float(projector)


class LlavaOneVisionAdapter(FamilyAdapter):
    family = "llava_onevision"

    @classmethod
    def load(cls, model_dir: Path, dtype: torch.dtype, device: torch.device, tokenizer) -> LlavaOneVisionAdapter:
        model = cls.load_frozen("LlavaOnevisionForConditionalGeneration", model_dir, dtype, device)
        config = model.config
        if config.vision_feature_select_strategy != "full":
            # "default" drops a CLS token SigLIP does not have; no released video checkpoint uses it.
            from streamvlm.errors import StreamVLMError
            raise StreamVLMError(
                f"{model_dir}: vision_feature_select_strategy={config.vision_feature_select_strategy!r} is not "
                "supported for video; LLaVA-OneVision checkpoints use 'full'")
        decoder = cls.decoder_parts(model)
        side = config.vision_config.image_size // config.vision_config.patch_size
        pooled = -(-side // 2)
        vision = VisionShape(grid=(pooled, pooled), vision_flops_per_frame=_vision_flops_per_frame(config))
        video_token = getattr(tokenizer, "video_token", None) or "<video>"
        return cls(model_dir, model, tokenizer, PreprocessConfig.from_checkpoint(model_dir), decoder, vision,
                   video_token)

    @staticmethod
    def decoder_parts(model) -> DecoderParts:
        """The Qwen2 decoder's modules; call again after something (e.g. LoRA) replaces projections."""
        return standard_decoder_parts(model.model.language_model, model.config.text_config, model.lm_head)

    def frame_features(self, pixels: torch.Tensor) -> torch.Tensor:
        # transformers' own video path (tower, feature layer, projector, 2x2 bilinear pooling) on a batch
        # of one video; every step is per frame, so T frames at once equal T calls of one frame.
        out = self.model.model.get_video_features(pixels[None], return_dict=True)
        feats = out.pooler_output[0, :-1]  # (T * tokens_per_frame, d); the last row is the newline
        return feats.view(pixels.shape[0], self.vision.tokens_per_frame, -1)

    tower_prefix = "model.vision_tower."

    def tower_features(self, pixels: torch.Tensor) -> torch.Tensor:
        # what get_video_features hands its projector: the feature layer's hidden states (strategy
        # "full", checked at load), (T, patches, vision hidden size)
        layer = self.model.config.vision_feature_layer
        hidden = self.model.model.vision_tower(pixels, output_hidden_states=True, return_dict=True).hidden_states
        return hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)

    def project_features(self, tower: torch.Tensor) -> torch.Tensor:
        # the projector, then 2x2 bilinear pooling, as get_video_features does after the tower
        inner = self.model.model
        return inner.apply_pooling(inner.multi_modal_projector(tower))

    def video_tail(self) -> torch.Tensor:
        return self.model.model.image_newline[None]  # (1, d); trains with the model (trainable="model")
