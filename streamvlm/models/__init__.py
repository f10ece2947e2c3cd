"""Model family adapters: a local Hugging Face checkpoint -> the parts the runtime uses."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.models.base import DecoderParts, FamilyAdapter, LayerParts, VisionShape

# config.json "model_type" -> "module:class" of its adapter, imported when a checkpoint of the family loads.
FAMILIES: dict[str, str] = {
    "llava_onevision": "streamvlm.models.llava_onevision:LlavaOneVisionAdapter",
    "qwen2_vl": "streamvlm.models.qwen2_5_vl:Qwen2VLAdapter",
    "qwen2_5_vl": "streamvlm.models.qwen2_5_vl:Qwen25VLAdapter",
    "qwen3_vl": "streamvlm.models.qwen3_vl:Qwen3VLAdapter",
    "smolvlm": "streamvlm.models.smolvlm:SmolVLMAdapter",
}


def adapter_class(model_type: str) -> type[FamilyAdapter] | None:
    """The adapter class of a config.json model_type, or None for an unsupported one."""
    target = FAMILIES.get(model_type)
    if target is None:
        return None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)

__all__ = ["FAMILIES", "adapter_class", "DecoderParts", "FamilyAdapter", "LayerParts", "VisionShape", "load_adapter"]


def _check_checkpoint_dir(model_dir: Path) -> dict:
    if not model_dir.exists():
        raise StreamVLMError(
            f"model directory {model_dir} does not exist; pass a local Hugging Face checkpoint folder "
            "(streamvlm never downloads), or make a random one with `streamvlm init-tiny DIR`")
    if not model_dir.is_dir():
        raise StreamVLMError(f"{model_dir} is a file; --model takes a checkpoint folder holding config.json")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise StreamVLMError(f"{model_dir} has no config.json; is it a Hugging Face checkpoint folder?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise StreamVLMError(f"{config_path} is not valid JSON ({e})") from None
    weights = list(model_dir.glob("*.safetensors")) + list(model_dir.glob("*.bin"))
    if not weights:
        raise StreamVLMError(f"{model_dir} holds no weights (*.safetensors); the checkpoint is incomplete")
    return config


def load_adapter(model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> FamilyAdapter:
    """Load a checkpoint folder with the adapter of its family; raise StreamVLMError for anything wrong."""
    model_dir = Path(model_dir).expanduser()
    config = _check_checkpoint_dir(model_dir)
    model_type = config.get("model_type")
    adapter_cls = adapter_class(model_type)
    if adapter_cls is None:
        raise StreamVLMError(
            f"{model_dir} holds a {model_type!r} checkpoint; supported families are: {', '.join(sorted(FAMILIES))}")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar is noise for a folder on local disk
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise StreamVLMError(f"could not load the tokenizer in {model_dir}: {e}") from None
    if tokenizer.chat_template is None:
        raise StreamVLMError(f"{model_dir} has no chat template (chat_template.jinja or in tokenizer_config.json)")
    logging.getLogger(__name__).info("loading %s checkpoint from %s (%s, %s)", model_type, model_dir, dtype, device)
    return adapter_cls.load(model_dir, dtype, device, tokenizer)
