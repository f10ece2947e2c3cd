"""Small random checkpoints in the Hugging Face layout, built offline.

`streamvlm init-tiny DIR` and the tests use the same builder: the model is made with transformers'
own config and model classes and saved with `save_pretrained`, the tokenizer is a byte-level BPE
trained here with the `tokenizers` library, and the preprocessing configs are written as the
checkpoint's JSON files. Nothing is downloaded.

A random checkpoint answers with noise: it exists to prove the runtime equals transformers and to
measure speed, not to watch video.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Special tokens of the ChatML layout that LLaVA-OneVision (Qwen2) checkpoints use.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# LLaVA-OneVision's ChatML layout: a user turn writes its media first, then each text part on a new line;
# an assistant turn is rendered exactly as the generation prompt plus the answer, so a dialogue rendered
# turn by turn equals the whole dialogue rendered at once. Written for this project.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\\n' + message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'video' %}{{ '<video>' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ '\\n' + part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Text the BPE merges are learned from: enough English to give words multi-byte tokens.
_CORPUS = [
    "What happens in the video? Describe the scene in detail.",
    "A red square moves from the left to the right while a blue circle appears in the middle.",
    "The person picks up the cup from the table and walks to the door.",
    "How many objects are there now? There are three objects on the screen.",
    "Which way is the green triangle moving? It is moving up and to the left.",
    "The camera pans slowly across a kitchen, a street, a park and a room with a window.",
    "user assistant system video image frame question answer caption summary",
]


@dataclass(frozen=True)
class TinySpec:
    """Shape of a random LLaVA-OneVision checkpoint.

    The defaults give a model of a few MB that runs in milliseconds on a CPU; `real_small()` gives the
    shape of a real small model (for benchmarks, not tests).
    """

    hidden_size: int = 64
    """Language model width."""
    num_layers: int = 2
    """Language model decoder layers."""
    num_heads: int = 4
    """Query heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention when smaller than num_heads)."""
    intermediate_size: int = 128
    """Language model MLP width."""
    vision_hidden_size: int = 32
    """Vision tower width."""
    vision_layers: int = 2
    """Vision tower layers."""
    vision_heads: int = 2
    """Vision tower heads."""
    image_size: int = 28
    """Input side in pixels; image_size / patch_size patches per side."""
    patch_size: int = 7
    """Vision patch side in pixels."""
    vocab_size: int = 384
    """Tokenizer vocabulary (byte-level BPE; at least 256 + merges + special tokens)."""
    max_position_embeddings: int = 4096
    """Context length."""
    rope_theta: float = 1_000_000.0
    """RoPE base."""
    seed: int = 0
    """Seed for the random weights."""

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")

    @property
    def tokens_per_frame(self) -> int:
        side = -(-(self.image_size // self.patch_size) // 2)  # 2x2 bilinear pooling, rounded up
        return side * side

    @classmethod
    def real_small(cls, num_layers: int = 12, hidden_size: int = 640, seed: int = 0) -> TinySpec:
        """A random model with the shape of a real small one: 196 tokens per frame (a 27x27 SigLIP grid
        pooled to 14x14, as in LLaVA-OneVision), 12+ layers, hidden 512+."""
        return cls(
            hidden_size=hidden_size, num_layers=num_layers, num_heads=hidden_size // 64, num_kv_heads=2,
            intermediate_size=hidden_size * 4, vision_hidden_size=256, vision_layers=4, vision_heads=4,
            image_size=378, patch_size=14, vocab_size=2048, max_position_embeddings=32768, seed=seed,
        )


def build_tokenizer(vocab_size: int, special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
                    chat_template: str = CHAT_TEMPLATE, eos_token: str = "<|im_end|>",
                    pad_token: str = "<|endoftext|>", extra_special_tokens: dict | None = None):
    """A byte-level BPE tokenizer trained on a few sentences, wrapped for transformers. The defaults are
    LLaVA-OneVision's; other families pass their own special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if extra_special_tokens is None:
        extra_special_tokens = {"image_token": "<image>", "video_token": "<video>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=extra_special_tokens,
        chat_template=chat_template,
    )


def spread_weights(model) -> None:
    """Re-initialise a random model's matrices so that greedy answers vary (see build_model)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "embed_tokens" in name else 1.0 / p.shape[1] ** 0.5)


def build_model(spec: TinySpec, tokenizer):
    """A randomly initialised LlavaOnevisionForConditionalGeneration with the spec's shape."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden_size, intermediate_size=spec.vision_hidden_size * 4,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    torch.manual_seed(spec.seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    # transformers initialises with std 0.02, under which a random model repeats one token forever.
    # Unit-variance embeddings and 1/sqrt(fan_in) matrices keep each new token visible in the residual
    # stream, so greedy answers vary and parity tests can tell two implementations apart.
    spread_weights(model)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def preprocessor_config(spec: TinySpec) -> dict:
    """What LLaVA-OneVision's processors read: resize to a square, rescale, normalize (SigLIP: 0.5/0.5)."""
    return {
        "do_resize": True,
        "size": {"height": spec.image_size, "width": spec.image_size},
        "resample": 3,  # PIL's BICUBIC
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }


def write_tiny_checkpoint(out_dir: str | Path, spec: TinySpec | None = None, tokenizer=None) -> Path:
    """Write a random LLaVA-OneVision checkpoint to `out_dir` in the Hugging Face layout.

    tokenizer: a transformers tokenizer of exactly spec.vocab_size tokens (default: a byte-level BPE
    trained here with that vocabulary size).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a progress bar for a few MB written locally is noise
    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        if spec.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size {spec.vocab_size} is below the 256 byte tokens plus specials")
        tokenizer = build_tokenizer(spec.vocab_size)
    model = build_model(spec, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    grid = spec.image_size // spec.patch_size
    common = preprocessor_config(spec)
    (out / "preprocessor_config.json").write_text(json.dumps(
        {**common, "image_processor_type": "LlavaOnevisionImageProcessor", "processor_class": "LlavaOnevisionProcessor"},
        indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(
        {**common, "video_processor_type": "LlavaOnevisionVideoProcessor", "processor_class": "LlavaOnevisionProcessor"},
        indent=2))
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": grid * grid,
         "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}, indent=2))
    (out / "streamvlm_tiny.json").write_text(json.dumps({"random_weights": True, **asdict(spec)}, indent=2))
    logger.info("wrote a random LLaVA-OneVision checkpoint to %s", out)
    return out
