"""The built-in default model: what commands use when no --model is given.

A small LLaVA-OneVision (SigLIP-style tower on 96 px frames in 8 px patches, 36 tokens per frame, a
4-layer Qwen2-style decoder of width 128, a word-level tokenizer; 1.2 M parameters) trained from scratch on the procedural
world (`streamvlm.world`) with the project's own Lightning pipeline, plus a `mod` router trained for it by
distillation, trained together with the language model. Both ship inside the package
(`streamvlm/builtin_model`, about 5 MB), so nothing is made or downloaded at run time.
`train/configs/world_model.yaml` and `world_joint.yaml` reproduce them (README, "Reproduce it").

It knows only its world: coloured circles, squares and triangles that move, appear and leave. Words
outside that vocabulary read as unknown.
"""

from __future__ import annotations

from pathlib import Path

from streamvlm.errors import StreamVLMError

BUILTIN_DIR = Path(__file__).parent.parent / "builtin_model"

BUILTIN_NOTICE = ("note: the built-in model knows only its world of coloured shapes; ask e.g. \"what is there "
                  "now?\", \"how many objects are there now?\", \"what shape is the red object?\", \"what size "
                  "is the red square?\" or \"which way is the red square moving?\" (pass --model DIR for another "
                  "checkpoint)")

EXAMPLE_QUESTIONS = ("how many objects are there now?", "what shape is the red object?",
                     "which way is the red square moving?", "what is there now?")
"""Questions the built-in model answers about the sample video (answers: two; square; right; big red square
moving right and small blue circle moving up). The description comes last, as in the dialogues the model
was trained on: asked first, the answers after it ran on in its style ("square moving right")."""


def default_model_dir() -> Path:
    """The built-in checkpoint folder, inside the installed package."""
    if not (BUILTIN_DIR / "config.json").is_file():
        raise StreamVLMError(f"the built-in model is missing from this installation ({BUILTIN_DIR}); reinstall "
                             "streamvlm, or pass --model DIR")
    return BUILTIN_DIR


def is_builtin(model_dir: str | Path) -> bool:
    return Path(model_dir).resolve() == BUILTIN_DIR.resolve()
