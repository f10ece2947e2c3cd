"""What the commands ask when the user gives no question or prompt, for the model in use.

The built-in model reads only the words of its world (a 47-word vocabulary: colours, shapes, sizes,
directions, counts and the questions it was trained on); anything else reads as unknown tokens and its
answer means nothing. So with the built-in model every default is a question it was trained on, and with
any other checkpoint the defaults are plain English.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from streamvlm.world.builtin import EXAMPLE_QUESTIONS, is_builtin


@dataclass(frozen=True)
class DefaultPrompts:
    ask: tuple[str, ...]
    """`streamvlm ask` without -q, asked in this order."""
    question: str
    """One question about the video so far: `compare`'s --question, and what the examples ask as it plays."""
    caption: str
    """`caption`'s --prompt, asked at the end of every segment."""
    summary: str
    """`caption`'s --summary-prompt, asked once at the end of each video."""
    calibrate: tuple[str, ...]
    """`calibrate`'s questions without --question."""


GENERIC_PROMPTS = DefaultPrompts(
    ask=("What happens in the video?",),
    question="What happens in the video?",
    caption="Describe what happens in this part of the video.",
    summary="Summarize what happens in the whole video.",
    calibrate=("What happens in the video?", "What objects are visible?", "Describe the motion you see."),
)

BUILTIN_PROMPTS = DefaultPrompts(
    ask=EXAMPLE_QUESTIONS,
    question="what is there now?",
    caption="what is there now?",
    # It was trained on no question about a whole video; its description of the end is the closest.
    summary="what is there now?",
    calibrate=("what is there now?", "how many objects are there now?", "which way is the red square moving?"),
)


def default_prompts(model: str | Path | None) -> DefaultPrompts:
    """The defaults for a --model value (None: no --model, which is the built-in model)."""
    return BUILTIN_PROMPTS if model is None or is_builtin(model) else GENERIC_PROMPTS


def default_help(pick) -> str:
    """'default: X with the built-in model, Y otherwise' for --help, where pick(prompts) gives X and Y."""

    def shown(value) -> str:
        return " / ".join(map(repr, value)) if isinstance(value, tuple) else repr(value)

    return f"default: {shown(pick(BUILTIN_PROMPTS))} with the built-in model, {shown(pick(GENERIC_PROMPTS))} " \
           "otherwise".replace("%", "%%")
