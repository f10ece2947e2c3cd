"""The world model: a small LLaVA-OneVision that learns the procedural world (`streamvlm.world`).

Its starting point is a random checkpoint with a word-level tokenizer over the world's vocabulary (plus
the chat template's words), made here offline; `RouterTrainingModule(world=True, trainable="model")`
trains all of it with the project's own pipeline, and `export_model` writes the trained weights back as
a Hugging Face checkpoint folder, the form the runtime loads and the package ships.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, TinySpec, write_tiny_checkpoint
from streamvlm import world

UNKNOWN = "[UNK]"
CHAT_WORDS = ("user", "assistant", "system")
"""Words the chat template writes besides its special tokens."""

WORLD_SPEC = TinySpec(
    hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
    vision_hidden_size=96, vision_layers=3, vision_heads=4, image_size=96, patch_size=8,
    max_position_embeddings=2048, vocab_size=0, seed=0,
)
"""96 px frames in 8 px patches: a 12x12 grid pooled 2x2 to 36 tokens per frame. vocab_size is set from
the tokenizer. Measured with the tower alone and a linear head naming the shape of one object per frame
(16 frames a step, one thread): 128 px in 16 px patches took 1800 steps (256 s) to reach 70%; 96 px in
8 px patches took 300 steps (52 s). An object is then two to three patches across, not one; the whole
model trained at 128 px / 16 px never learned shapes (27% on held-out videos, chance 33%)."""


def build_word_tokenizer():
    """A word-level tokenizer: lowercased, split on spaces and punctuation, one id per known word."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = [*SPECIAL_TOKENS, UNKNOWN, *CHAT_WORDS, *world.vocabulary()]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=UNKNOWN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=UNKNOWN,
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"}, chat_template=CHAT_TEMPLATE,
    )


def sincos_2d(side: int, dim: int, scale: float = 0.5) -> torch.Tensor:
    """(side * side, dim) fixed 2-D sine-cosine codes of a side x side grid in row-major order (as MAE's
    ViT uses): the first half of the channels code the row, the second half the column."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    angle = torch.arange(side, dtype=torch.float64)[:, None] * omega[None]  # (side, dim / 4)
    code = torch.cat([angle.sin(), angle.cos()], dim=1)  # (side, dim / 2)
    rows = code[:, None, :].expand(side, side, -1)
    cols = code[None, :, :].expand(side, side, -1)
    return (scale * torch.cat([rows, cols], dim=-1)).reshape(side * side, dim).float()


def write_initial_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """The untrained world model (random weights, word-level tokenizer) in the Hugging Face layout.

    The vision tower's position embeddings start as 2-D sine-cosine codes instead of noise (they still
    train). Measured: from a random start, motion questions stayed at chance for the first 1900 steps
    (which way an object moves needs each token's place, which only motion questions reward), while
    count reached 82%.
    """
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    tokenizer = build_word_tokenizer()
    spec = replace(WORLD_SPEC, vocab_size=len(tokenizer), seed=seed)
    out = write_tiny_checkpoint(out_dir, spec, tokenizer)
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    key = "vision_tower.embeddings.position_embedding.weight"
    side = spec.image_size // spec.patch_size
    state[key] = sincos_2d(side, spec.vision_hidden_size)
    save_file(state, str(weights), metadata={"format": "pt"})
    return out


def initial_model_dir(seed: int = 0) -> Path:
    """The untrained world model, made once in the cache folder."""
    from streamvlm.paths import cache_dir

    target = cache_dir() / f"world-init-v5-{seed}"
    if not (target / "config.json").is_file():
        tmp = target.with_name(f".world-init-{os.getpid()}")
        write_initial_checkpoint(tmp, seed)
        try:
            os.replace(tmp, target)
        except OSError:  # another process (a DDP rank) made it first
            shutil.rmtree(tmp, ignore_errors=True)
            if not (target / "config.json").is_file():
                raise
    return target


def export_model(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Write the model of a checkpoint that trained it as a Hugging Face checkpoint folder of its family: the
    starting checkpoint's files with the trained weights. trainable="model" checkpoints hold every weight;
    trainable="all" ones hold the language model's; trainable="router+lora" ones hold LoRA adapters, merged
    into the language model's projections here. The rest comes from the starting checkpoint. A model trained
    under a training-free policy (skip, layer_drop, ...) gets that policy as `router/` in the folder, for
    `--routing OUT/router`; a MoD router is exported apart (`streamvlm-train export`)."""
    from streamvlm.models import load_adapter
    from streamvlm.routers import build_router, parse_routing, save_router
    from streamvlm.routers.registry import config_from_dict
    from streamvlm.train.weights import is_language_model_weight

    try:
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as e:
        raise StreamVLMError(f"cannot read checkpoint {checkpoint_path}: {e}") from None
    meta = ckpt.get("streamvlm")
    trainable = None if meta is None else meta.get("trainable")
    if trainable not in ("model", "all", "router+lora"):
        raise StreamVLMError(f"{checkpoint_path} did not train the model (trainable: model, all or router+lora); "
                             "a router checkpoint is exported with `streamvlm-train export`")
    source = Path(meta["model_dir"])
    if not (source / "config.json").is_file():
        raise StreamVLMError(f"the starting checkpoint {source} of {checkpoint_path} is gone; the export needs "
                             "its config and tokenizer")
    model = load_adapter(source, torch.float32, torch.device("cpu")).model
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if trainable == "router+lora":
        state = _merged_lora(model, state, meta["lora"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if trainable == "all":  # the frozen tower and projector are the starting checkpoint's
        missing = [k for k in missing if is_language_model_weight(k)]
    if trainable == "router+lora":  # only the adapted projections were written
        missing = []
    if unexpected or missing:
        raise StreamVLMError(f"{checkpoint_path} does not fit {source}: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}")
    about = {"steps": ckpt.get("global_step"), "epochs": ckpt.get("epoch"), "trainable": trainable}
    if meta.get("routing") is None and meta.get("spec") not in (None, "dense"):
        about["trained_under"] = meta["spec"]
    started = source / "streamvlm_model.json"
    if trainable != "model" and started.is_file():  # a trained model trained on: keep how it was made
        about["started_from"] = {k: v for k, v in json.loads(started.read_text()).items() if k != "spec"}
    world = bool((ckpt.get("datamodule_hyper_parameters") or {}).get("world")) or started.is_file()
    out = save_weights(source, model, out_dir, about, world=world)
    if "trained_under" in about:
        # The policy's whole config when the checkpoint holds it (a calibrated head mask is not in its spec).
        config = config_from_dict(meta["policy"]) if meta.get("policy") else parse_routing(about["trained_under"])
        save_router(build_router(config, meta["num_layers"], meta["hidden_size"]), out / "router",
                    meta["num_layers"], meta["hidden_size"])
    return out


def _merged_lora(model, state: dict, lora: dict) -> dict:
    """The weights of a LoRA checkpoint merged into the model's own: each adapted projection's weight
    becomes W + (alpha / rank) * B @ A. Returns the updated weights under the model's names."""
    merged = {}
    own = model.state_dict()
    scale = lora["alpha"] / lora["rank"]
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        path = key.split(".lora_A.")[0]
        b = state[key.replace(".lora_A.", ".lora_B.")]
        weight = f"{path}.weight"
        if weight not in own:
            raise StreamVLMError(f"the LoRA adapter {path} has no weight {weight} in the model to merge into")
        merged[weight] = own[weight] + scale * (b.float() @ a.float()).to(own[weight].dtype)
    if not merged:
        raise StreamVLMError("the checkpoint holds no LoRA adapters to merge")
    return merged


def save_weights(source: str | Path, model, out_dir: str | Path, about: dict, world: bool = True) -> Path:
    """Write `model` as a checkpoint folder: the files of the checkpoint folder `source` it was loaded from
    (config, tokenizer, preprocessing) with its weights, and `about` in streamvlm_model.json (with the world's
    recipe when it is a world model). The folder appears whole or not at all."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("*.safetensors", "streamvlm_tiny.json",
                                                                "streamvlm_model.json", "router"))
    model.save_pretrained(tmp)
    world_recipe = {"trained_on": "streamvlm.world",
                    "spec": asdict(WORLD_SPEC) | {"vocab_size": model.config.text_config.vocab_size}}
    (tmp / "streamvlm_model.json").write_text(json.dumps(
        {**about, **world_recipe} if world else about, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
