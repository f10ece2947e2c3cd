"""The sequence builder: frames and text -> chunks with positions, laid out as the family lays them out.

One object turns a dialogue (runs of frames, questions, answers) into the token sequence that
transformers' processor and the checkpoint's chat template build for it, piece by piece, so a stream can
append to it. The session feeds its pieces to the decoder as they come; training lays a whole dialogue
out with the same object and feeds it as one chunk. Nothing here touches a cache or runs a layer.

    plan_frames(spans)      text ids around each frame of tokens (not committed: the caller makes room first)
    frame_pieces(plan, f)   commit: the frames' pieces (text before each frame, the frame's features)
    say(text)               text the user writes in the open turn: before its video, or between its frames
    question(q)             the question's pieces and the closing ids (not committed); commit(plan) after
    place(pieces)           -> Chunk: absolute positions, and M-RoPE positions for Qwen-VL families
    close_turn(q, answer)   the exchange joins the history the template renders later turns after

Layout of one user turn with a video (hooks of the family adapter, `FamilyAdapter`):

    [template text before the video] video_intro() frame_text(0)[0] <frame 0> frame_text(0)[1]
    frame_text(1)[0] <frame 1> ... frame_text(k)[1] video_outro() <video_tail()> [template text after]

Text the user writes before the turn's video (`say` before any frame) is the turn's preface: a text part
before the video in the user message, placed by the template (`ChatLayout`). Text written between frames
of one video cannot be said in a template (it has one placeholder per video), so it is written where it
stands: its ids go in front of the next frame's text, or of the video's outro when the question follows.

M-RoPE (Qwen-VL): text runs on from the largest position so far + 1 (as transformers' generate does); a
frame's (3, tokens) grid comes from the adapter's `vision_rope`, given the position after the text before
it and its video's first position.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from streamvlm.chat import ChatLayout, assistant_message, system_message, user_message
from streamvlm.errors import StreamVLMError
from streamvlm.types import TEXT, VISION, Chunk


@dataclass(frozen=True)
class TextPiece:
    ids: tuple[int, ...]
    targets: tuple[bool, ...] = ()
    """Per id: a token the assistant produces (answer tokens and the end-of-turn token), for training."""


@dataclass(frozen=True)
class TailPiece:
    """The family's embeddings that close a run of frames (`FamilyAdapter.video_tail`)."""


@dataclass(frozen=True)
class FramePiece:
    """The tokens of one frame of tokens, with what the family needs besides their embeddings."""

    embeds: torch.Tensor
    """(tokens_per_frame, d)."""
    frame: int
    """Session frame index (frames of tokens, see FamilyAdapter.frames_per_step)."""
    index_in_video: int
    """Index within the current video (the user turn's run of frames)."""
    elapsed: float
    """Seconds since the video's first frame."""
    deepstack: torch.Tensor | None = None
    """(L, tokens_per_frame, d) DeepStack features, or None."""


Piece = TextPiece | TailPiece | FramePiece


@dataclass(frozen=True)
class FramePlan:
    """Frames of tokens laid out but not yet committed."""

    text_ids: tuple[list[int], ...]
    """Per frame, the ids of the text before it."""
    starts: tuple[float, ...]
    """Per frame, the time of its first input frame (M-RoPE time)."""
    shown: tuple[float, ...]
    """Per frame, the time it is shown at (the mean of its input frames, the stamp Qwen3-VL writes)."""
    opening: str
    """The turn's text before its video, when this plan opens the video; else ""."""
    video_t0: float

    @property
    def text_tokens(self) -> int:
        return sum(map(len, self.text_ids))


@dataclass(frozen=True)
class QuestionPlan:
    """A question's user turn laid out, not yet committed."""

    question: str
    with_video: bool
    pieces: tuple[Piece, ...]
    """The video's tail (when the turn has frames) and the prompt text through the answer's opening."""
    closing_ids: tuple[int, ...]
    """What closes the assistant turn after the answer (e.g. "<|im_end|>\\n")."""
    preface: tuple[str, ...] = ()
    """Text the user wrote before the turn's video."""


class SequenceBuilder:
    """The layout state of one dialogue. Not thread-safe; owned by one session or one training sample."""

    def __init__(self, adapter, system: str | None = None, trace: bool = True):
        self.adapter = adapter
        self.layout = ChatLayout(adapter.tokenizer, adapter.video_token)
        self.tpf = adapter.vision.tokens_per_frame
        self.hidden = adapter.decoder.hidden_size
        # A system prompt is the dialogue's first message; the template renders it in front of the first turn.
        self.history: list[dict] = [system_message(system)] if system is not None else []
        self.preamble = self.layout.render(self.history, add_generation_prompt=False)
        """The rendered system message, laid out in front of the first text."""
        self.next_pos = 0
        self.next_rope = 0
        """M-RoPE families: the rope position of the next text token."""
        self.frames = 0
        """Frames of tokens laid out so far (the session frame index of the next one)."""
        self.started = False
        """Whether anything was committed (the first text gets the tokenizer's special tokens, e.g. BOS)."""
        # The open video (the current user turn's frames): its text before the video once laid out, frames of
        # tokens so far, its first frame's time, its M-RoPE start, and the text owed after its last frame.
        self.open_video_text: str | None = None
        self.video_steps = 0
        self.video_t0 = 0.0
        self.video_rope = 0
        self.owed_text = ""
        self.preface: list[str] = []
        """Text the user wrote in the open turn before its video (the template places it)."""
        self._video_token_id = adapter.tokenizer.convert_tokens_to_ids(adapter.frame_token)
        self._trace = array("i") if trace else None

    def text_ids(self, text: str, first: bool) -> list[int]:
        return self.adapter.tokenizer(text, add_special_tokens=first)["input_ids"] if text else []

    # -- frames ----------------------------------------------------------------------------------

    def plan_frames(self, spans: Sequence[Sequence[float]]) -> FramePlan:
        """Lay out len(spans) frames of tokens, frame i made of input frames at spans[i] seconds."""
        adapter = self.adapter
        starts = tuple(span[0] for span in spans)
        shown = tuple(sum(span) / len(span) for span in spans)
        opening = self.layout.before_video(self.history, tuple(self.preface)) if self.open_video_text is None else ""
        video_t0 = starts[0] if self.open_video_text is None else self.video_t0
        texts, owed = [], self.owed_text
        for i, seconds in enumerate(shown):
            index = self.video_steps + i
            before, after = adapter.frame_text(index, seconds)
            texts.append((owed if index else self.preamble + opening + adapter.video_intro()) + before)
            owed = after
        ids = tuple(self.text_ids(t, first=not self.started and i == 0) for i, t in enumerate(texts))
        return FramePlan(ids, starts, shown, opening, video_t0)

    def frame_pieces(self, plan: FramePlan, features: torch.Tensor) -> list[Piece]:
        """Commit `plan` with its encoded frames (t, tokens_per_frame, feature_dim): the pieces to place."""
        d = self.hidden
        deepstack = self.adapter.vision.deepstack
        pieces: list[Piece] = []
        for i, ids in enumerate(plan.text_ids):
            if ids:
                pieces.append(TextPiece(tuple(ids)))
            stack = features[i, :, d:].unflatten(-1, (-1, d)).transpose(0, 1) if deepstack else None
            pieces.append(FramePiece(features[i, :, :d], self.frames, self.video_steps, plan.starts[i] - plan.video_t0,
                                     stack))
            self.owed_text = self.adapter.frame_text(self.video_steps, plan.shown[i])[1]
            self.video_steps += 1
            self.frames += 1
        if self.open_video_text is None:
            self.open_video_text = plan.opening
            self.video_t0 = plan.video_t0
        self.preamble = ""
        self.started = True
        return pieces

    def say(self, text: str) -> None:
        """Text the user writes at this point of the open turn: its preface when no frame of the turn is laid
        out yet, else text between two frames (laid out in front of what follows the last frame)."""
        if self.open_video_text is None:
            self.preface.append(text)
        else:
            self.owed_text += text

    # -- questions and answers -------------------------------------------------------------------

    def question(self, question: str) -> QuestionPlan:
        """The user turn of `question` after everything laid out so far (the open video, if any)."""
        with_video = self.open_video_text is not None
        preface = tuple(self.preface)
        turn = self.layout.user_turn(self.history, question, with_video, preface)
        if with_video and turn.before_video != self.open_video_text:
            raise StreamVLMError("the chat template's text before the video depends on the question; "
                                 "it cannot be streamed")
        closing = self.adapter.tokenizer(self.layout.closing(self.history, question, with_video, preface),
                                         add_special_tokens=False)["input_ids"]
        if with_video:
            text = self.owed_text + self.adapter.video_outro() + turn.after_video
        else:
            text = self.preamble + turn.before_video + turn.after_video
        pieces: list[Piece] = [TextPiece(tuple(self.text_ids(text, first=not self.started)))]
        if with_video:
            pieces.insert(0, TailPiece())
        return QuestionPlan(question, with_video, tuple(pieces), tuple(closing), preface)

    def commit(self, plan: QuestionPlan) -> None:
        """The question's text is being fed: the preamble went with it."""
        self.preamble = ""
        self.started = True

    def close_turn(self, plan: QuestionPlan, answer: str) -> None:
        """The exchange joins the history; the next frames open a new video."""
        self.history += [user_message(plan.question, plan.with_video, plan.preface), assistant_message(answer)]
        self.preface = []
        self.open_video_text = None
        self.video_steps = 0
        self.owed_text = ""

    def answer_piece(self, plan: QuestionPlan, answer: str, stop_ids: set[int]) -> TextPiece:
        """A whole answer and the closing text as one piece with training targets: the answer's tokens and the
        end-of-turn token that stops it are what the assistant says."""
        answer_ids = self.adapter.tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
        closing = plan.closing_ids
        targets = [True] * len(answer_ids) + [i == 0 and tok in stop_ids for i, tok in enumerate(closing)]
        return TextPiece(tuple(answer_ids) + closing, tuple(targets))

    # -- placing ---------------------------------------------------------------------------------

    def tokens(self, pieces: Sequence[Piece]) -> int:
        """How many positions `pieces` take."""
        tail = self.adapter.video_tail().shape[0]
        return sum(len(p.ids) if isinstance(p, TextPiece) else tail if isinstance(p, TailPiece) else self.tpf
                   for p in pieces)

    def place(self, pieces: Sequence[Piece]) -> Chunk:
        """The pieces as one Chunk at the end of the sequence so far; the positions move on past it."""
        adapter = self.adapter
        device = adapter.device
        embed = adapter.decoder.embed_tokens
        embeds, kinds, frames, spans, ropes, stacks = [], [], [], [], [], []
        cursor = self.next_rope
        n = 0
        for piece in pieces:
            if isinstance(piece, FramePiece):
                emb = piece.embeds
                if piece.deepstack is not None:
                    stacks.append(piece.deepstack)
                if adapter.mrope:
                    if piece.index_in_video == 0:
                        self.video_rope = cursor
                    ropes.append(adapter.vision_rope(cursor, self.video_rope, piece.index_in_video,
                                                     piece.elapsed).to(device))
                spans.append((n, n + emb.shape[0]))
                frame = piece.frame
            else:
                emb = (adapter.video_tail() if isinstance(piece, TailPiece)
                       else embed(torch.tensor(piece.ids, dtype=torch.long, device=device)))
                if adapter.mrope:
                    ropes.append(torch.arange(cursor, cursor + emb.shape[0], device=device).expand(3, emb.shape[0]))
                frame = -1
            if adapter.mrope and ropes[-1].numel():
                cursor = max(cursor, int(ropes[-1].max()) + 1)
            size = emb.shape[0]
            embeds.append(emb)
            kinds.append(torch.full((size,), VISION if frame >= 0 else TEXT, dtype=torch.uint8, device=device))
            frames.append(torch.full((size,), frame, dtype=torch.int32, device=device))
            if self._trace is not None:
                self._trace.extend(piece.ids if isinstance(piece, TextPiece) else [self._video_token_id] * size)
            n += size
        positions = torch.arange(self.next_pos, self.next_pos + n, device=device)
        chunk = Chunk(torch.cat(embeds), positions, torch.cat(kinds), torch.cat(frames), tuple(spans),
                      adapter.vision.grid, torch.cat(ropes, dim=1) if adapter.mrope else None,
                      torch.cat(stacks, dim=1) if stacks else None)
        self.next_pos += n
        self.next_rope = cursor
        return chunk

    def preview(self, pieces: Sequence[Piece]) -> Chunk:
        """The Chunk `place` would make of `pieces`, leaving the sequence where it is."""
        saved = self.next_pos, self.next_rope, self.video_rope, self._trace
        self._trace = None
        try:
            return self.place(pieces)
        finally:
            self.next_pos, self.next_rope, self.video_rope, self._trace = saved

    def renumbered(self, held: int) -> None:
        """After eviction renumbered the `held` positions still cached to 0..held-1: what comes next moves by
        the same shift, so the recent past keeps its relative layout (M-RoPE's text and open video too)."""
        shift = held - self.next_pos
        self.next_pos = held
        self.next_rope += shift
        self.video_rope += shift

    def token_ids(self) -> list[int]:
        """The sequence as token ids, every frame token and video tail written as the video placeholder id:
        the input_ids transformers' processor builds for the same dialogue."""
        if self._trace is None:
            raise StreamVLMError("a session with a memory budget does not keep its token sequence")
        return self._trace.tolist()


def target_rows(pieces: Sequence[Piece], builder: SequenceBuilder) -> tuple[list[int], list[int]]:
    """For pieces placed from position 0: (logit rows, target ids), row r predicting the token at r + 1."""
    rows, targets = [], []
    pos = 0
    for piece in pieces:
        if isinstance(piece, TextPiece):
            for i, (tok, is_target) in enumerate(zip(piece.ids, piece.targets)):
                if is_target and pos + i > 0:
                    rows.append(pos + i - 1)
                    targets.append(tok)
        pos += builder.tokens([piece])
    return rows, targets


def padded_span(times: list[float], step: int) -> list[float]:
    """The times of a frame of tokens short of its `step` input frames, padded with its last frame's time, as
    its pixels are padded with copies of the last frame (`FamilyAdapter.encode_frames`)."""
    return times + times[-1:] * (step - len(times))


def lay_out_dialogue(builder: SequenceBuilder, events, times: Sequence[float], encode, stop_ids: set[int]) -> list[Piece]:
    """A whole dialogue's pieces, laid out exactly as a session feeds it (training places them as one chunk).

    events: items with `.start`/`.end` (a run of input frames, indices into `times`) or `.question`/`.answer`
    (an exchange, the answer teacher-forced); every run is followed by an exchange or ends the dialogue.
    encode(start, end): features (ceil((end - start) / frames_per_step), tokens_per_frame, feature_dim) of
    input frames start..end-1. Frames fold in frames_per_step groups within a run; an odd last frame pairs
    with a copy of itself, as a session does when a question closes the video.
    """
    step = builder.adapter.frames_per_step
    pieces: list[Piece] = []
    for event in events:
        if hasattr(event, "start"):
            if event.end <= event.start:
                continue
            run = [float(t) for t in times[event.start:event.end]]
            spans = [run[i:i + step] for i in range(0, len(run), step)]
            spans[-1] = padded_span(spans[-1], step)
            pieces += builder.frame_pieces(builder.plan_frames(spans), encode(event.start, event.end))
            continue
        plan = builder.question(event.question)
        builder.commit(plan)
        pieces += list(plan.pieces) + [builder.answer_piece(plan, event.answer, stop_ids)]
        builder.close_turn(plan, event.answer)
    return pieces
