"""A small random checkpoint of any family the runtime serves, from one call (init-tiny, the training
module's tiny checkpoints and the tests all go through it)."""

from __future__ import annotations

from pathlib import Path

from streamvlm.errors import StreamVLMError
from streamvlm.tiny import TinySpec, write_tiny_checkpoint
from streamvlm.tiny.qwen import write_tiny_qwen
from streamvlm.tiny.qwen3 import write_tiny_qwen3_vl
from streamvlm.tiny.smolvlm import TinySmolVLMSpec, write_tiny_smolvlm

FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm")


def write_tiny_family(out_dir: str | Path, family: str, seed: int = 0, num_layers: int | None = None,
                      hidden_size: int | None = None) -> Path:
    """Write a random checkpoint of `family` to out_dir: the family writer's default tiny shape, with
    num_layers and hidden_size (the language model's) replaced where given."""
    sizes = {k: v for k, v in (("num_layers", num_layers), ("hidden_size", hidden_size)) if v}
    if family == "llava_onevision":
        return write_tiny_checkpoint(out_dir, TinySpec(seed=seed, **sizes))
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return write_tiny_qwen(out_dir, family, seed=seed, **sizes)
    if family == "qwen3_vl":
        return write_tiny_qwen3_vl(out_dir, seed=seed, **sizes)
    if family == "smolvlm":
        return write_tiny_smolvlm(out_dir, spec=TinySmolVLMSpec(seed=seed, **sizes))
    raise StreamVLMError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
