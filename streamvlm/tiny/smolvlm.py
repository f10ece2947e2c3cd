"""A small random SmolVLM2 checkpoint in the Hugging Face layout, built offline.

The model is transformers' SmolVLMForConditionalGeneration (SigLIP tower, pixel-shuffle connector, Llama
decoder) saved with `save_pretrained`; the tokenizer is a byte-level BPE trained here (streamvlm.tiny's
builder) with SmolVLM's special tokens and a chat template in SmolVLM's layout; the processor configs are
SmolVLM's JSON files. Like streamvlm.tiny's checkpoints it answers with noise: it exists to prove the
runtime equals transformers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from streamvlm.tiny import TinySpec, build_tokenizer, spread_weights

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                  "<global-img>", "<image>", "<video>")

# SmolVLM's layout: "<|im_start|>" once, then "Role: content<end_of_utterance>\n" per message (":" alone when
# the content opens with an image), media placeholders where the content puts them, and "Assistant:" as
# the generation prompt. Unlike the released template (which writes "Assistant: " + answer), an assistant
# turn is exactly the generation prompt plus the answer, so a dialogue appended turn by turn equals the
# dialogue rendered at once. Written for this project.
CHAT_TEMPLATE = (
    "{{ '<|im_start|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ 'Assistant:' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% else %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}{% endif %}"
    "{{ '<end_of_utterance>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySmolVLMSpec(TinySpec):
    """Shape of a random SmolVLM2 checkpoint: TinySpec's decoder and tower, a 32 px frame in 4 px patches
    and a pixel shuffle; a few hundred KB, milliseconds per frame on a CPU."""

    image_size: int = 32
    """Frame side in pixels; image_size // patch_size patches per side."""
    patch_size: int = 4
    """Vision patch side in pixels."""
    vocab_size: int = 400
    """Tokenizer vocabulary (byte-level BPE: 256 bytes, merges and the special tokens)."""
    rope_theta: float = 100_000.0
    """RoPE base."""
    scale_factor: int = 2
    """Pixel-shuffle factor: scale_factor x scale_factor patches fold into one token."""

    def __post_init__(self):
        super().__post_init__()
        if (self.image_size // self.patch_size) % self.scale_factor:
            raise ValueError(f"image_size {self.image_size} // patch_size {self.patch_size} patches per side must be "
                             f"a multiple of scale_factor {self.scale_factor}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size {self.vocab_size} is below the 256 byte tokens plus specials")

    @property
    def tokens_per_frame(self) -> int:
        return (self.image_size // self.patch_size // self.scale_factor) ** 2


def build_smolvlm_tokenizer(vocab_size: int):
    return build_tokenizer(
        vocab_size, special_tokens=SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE, eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        # the attribute names SmolVLMProcessor reads the token strings from
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>",
                              "fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
                              "end_of_utterance_token": "<end_of_utterance>"},
    )


def build_smolvlm_model(spec: TinySmolVLMSpec, tokenizer):
    """A randomly initialised SmolVLMForConditionalGeneration with the spec's shape."""
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    vision = SmolVLMVisionConfig(
        hidden_size=spec.vision_hidden_size, intermediate_size=spec.vision_hidden_size * 4,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta}, rms_norm_eps=1e-5,
        bos_token_id=None, eos_token_id=eou, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config = SmolVLMConfig(
        vision_config=vision, text_config=text, scale_factor=spec.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = SmolVLMForConditionalGeneration(config).eval()
    spread_weights(model)  # so greedy answers vary (see streamvlm.tiny.build_model)
    model.generation_config.eos_token_id = eou
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def processor_configs(spec: TinySmolVLMSpec) -> dict[str, dict]:
    """file name -> content of SmolVLM's processor configs, in the released checkpoints' format."""
    common = {
        "do_convert_rgb": True, "do_resize": True, "resample": 1,  # PIL's LANCZOS
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_pad": True, "max_image_size": {"longest_edge": spec.image_size},
        "processor_class": "SmolVLMProcessor",
    }
    sampling = {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": spec.image_size}}
    return {
        "preprocessor_config.json": {
            **common, "image_processor_type": "SmolVLMImageProcessor", "do_image_splitting": True,
            "size": {"longest_edge": 4 * spec.image_size}, "video_sampling": sampling},
        "video_preprocessor_config.json": {
            **common, "video_processor_type": "SmolVLMVideoProcessor", "size": {"longest_edge": spec.image_size},
            "do_sample_frames": False, "fps": sampling["fps"], "num_frames": sampling["max_frames"]},
        "processor_config.json": {"processor_class": "SmolVLMProcessor", "image_seq_len": spec.tokens_per_frame},
    }


def write_tiny_smolvlm(out_dir: str | Path, seed: int = 0, spec: TinySmolVLMSpec | None = None) -> Path:
    """Write a random SmolVLM2 checkpoint to `out_dir`: spec's shape (default: 16 tokens per frame, 2 vision and
    2 decoder layers) with weights drawn from `seed` (spec.seed when a spec is given)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    spec = spec or TinySmolVLMSpec(seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_smolvlm_tokenizer(spec.vocab_size)
    model = build_smolvlm_model(spec, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name, content in processor_configs(spec).items():
        (out / name).write_text(json.dumps(content, indent=2))
    (out / "streamvlm_tiny.json").write_text(json.dumps({"random_weights": True, "family": "smolvlm",
                                                        **asdict(spec)}, indent=2))
    logger.info("wrote a random SmolVLM2 checkpoint to %s", out)
    return out
