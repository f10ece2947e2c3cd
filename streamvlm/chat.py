"""The chat layout, read from the checkpoint's own chat template.

A stream cannot re-render the whole conversation each turn (that would re-encode old frames), so the
session appends the template's output piece by piece. The pieces come from rendering the dialogue with
sentinel strings in place of the question and the answer and cutting at them:

    [end of previous turn] before_video <frames...> <video tail> after_video   <- one user turn
    answer tokens, closing                                                     <- the assistant turn

`before_video` must not depend on the question (true when the template writes media before the text,
as every supported family does); frames arrive before the question is known.

A turn may carry text the user wrote before its video (`preface`, e.g. "Watch this clip:"): it is a text
part before the video in the user message, so the template puts it where it puts such text (before the
video for templates that write parts in order, after it for those that write media first), exactly as the
family's processor would lay out the same message.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamvlm.errors import StreamVLMError

# Private-use characters: never in a real question or answer, and no template escapes them.
_QUESTION = "\ue000question\ue001"
_ANSWER = "\ue002answer\ue003"


@dataclass(frozen=True)
class UserTurnText:
    before_video: str
    """Text from the end of the dialogue so far up to the video placeholder (or the whole turn if none)."""
    after_video: str
    """Text after the video placeholder, through the opening of the assistant's answer."""


def user_message(question: str, with_video: bool, preface: tuple[str, ...] = ()) -> dict:
    """A user turn: the preface's text parts, the video, then the question (no part when it is empty)."""
    content = ([{"type": "text", "text": text} for text in preface] + ([{"type": "video"}] if with_video else [])
               + ([{"type": "text", "text": question}] if question else []))
    return {"role": "user", "content": content}


def system_message(text: str) -> dict:
    return {"role": "system", "content": [{"type": "text", "text": text}]}


def assistant_message(answer: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


class ChatLayout:
    def __init__(self, tokenizer, video_token: str):
        self.tokenizer = tokenizer
        self.video_token = video_token

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _delta(self, history: list[dict], message: dict) -> str:
        before = self.render(history, add_generation_prompt=False)
        text = self.render(history + [message], add_generation_prompt=True)
        if not text.startswith(before):
            raise StreamVLMError(
                "the checkpoint's chat template rewrites earlier turns when a new one is added, so a stream "
                "cannot append to it; streamvlm needs a template whose output for n turns starts with its "
                "output for the first n-1")
        return text[len(before):]

    def user_turn(self, history: list[dict], question: str, with_video: bool,
                  preface: tuple[str, ...] = ()) -> UserTurnText:
        """The text of a new user turn after `history` (which ends with an assistant turn, or is empty)."""
        delta = self._delta(history, user_message(question, with_video, preface))
        if not with_video:
            return UserTurnText(before_video="", after_video=delta)
        if delta.count(self.video_token) != 1:
            raise StreamVLMError(
                f"the chat template wrote the video placeholder {self.video_token!r} "
                f"{delta.count(self.video_token)} times for one video; expected once")
        before, after = delta.split(self.video_token)
        return UserTurnText(before_video=before, after_video=after)

    def before_video(self, history: list[dict], preface: tuple[str, ...] = ()) -> str:
        """The text of a new user turn before its video, which must not depend on the question."""
        turn = self.user_turn(history, _QUESTION, with_video=True, preface=preface)
        if _QUESTION in turn.before_video:
            raise StreamVLMError(
                "the chat template puts the question before the video; a stream needs the video first")
        return turn.before_video

    def closing(self, history: list[dict], question: str, with_video: bool, preface: tuple[str, ...] = ()) -> str:
        """Text that follows an answer to close the assistant turn (e.g. "<|im_end|>\\n")."""
        text = self.render(history + [user_message(question, with_video, preface), assistant_message(_ANSWER)],
                           add_generation_prompt=False)
        if text.count(_ANSWER) != 1:
            raise StreamVLMError("the chat template does not write the assistant's answer verbatim")
        return text.split(_ANSWER)[1]
