"""A session: one KV cache and one timeline, fed frames and asked questions.

Data flow of a session's life:

    append_frames(f0..f3)   [turn opening text][f0 tokens][f1 tokens]...      -> cache
    append_frames(f4)       [f4 tokens]                                       -> cache
    ask("q1")               [video tail][text after video, q1, answer opening] -> logits -> answer tokens
                            (each answer token is fed back one at a time), then [closing text]
    append_frames(f5..)     [next turn opening][f5 tokens]...
    ask("q2")               sees f0..f5, q1 and its answer, and q2

Frames are never re-encoded: asking costs the question and the answer, whatever the stream's age.
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from streamvlm.cache import KVCache
from streamvlm.rope import shift_rope
from streamvlm.memory import MemoryBudget
from streamvlm.chat import ChatLayout, assistant_message, system_message, user_message
from streamvlm.errors import StreamVLMError
from streamvlm.flops import FlopCounter
from streamvlm.generation import SamplingConfig, TokenChooser
from streamvlm.types import TEXT, VISION, Chunk, Turn
from streamvlm.video.preprocess import FrameInput, as_frame_tensor

if TYPE_CHECKING:
    from streamvlm.runtime import StreamVLM

logger = logging.getLogger(__name__)


Piece = tuple[torch.Tensor, int, Sequence[int] | None]
"""(embeddings (n, d), frame index or -1 for text, token ids or None for video embeddings)."""


@dataclass(frozen=True)
class FramePiece:
    """The tokens of one frame, with what the family needs besides their embeddings."""

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


def chunk_from_pieces(pieces: list[Piece], start: int, frame_grid: tuple[int, int] | None = None,
                      rope: torch.Tensor | None = None, deepstack: torch.Tensor | None = None) -> Chunk:
    """Concatenate pieces into a Chunk whose tokens sit at positions start, start + 1, ...; rope and deepstack
    are passed through (see Chunk)."""
    device = pieces[0][0].device
    embeds, kinds, frames, spans = [], [], [], []
    n = start
    for emb, frame, _ in pieces:
        size = emb.shape[0]
        embeds.append(emb)
        kinds.append(torch.full((size,), VISION if frame >= 0 else TEXT, dtype=torch.uint8, device=device))
        frames.append(torch.full((size,), frame, dtype=torch.int32, device=device))
        if frame >= 0:
            spans.append((n - start, n - start + size))
        n += size
    positions = torch.arange(start, n, device=device)
    return Chunk(torch.cat(embeds), positions, torch.cat(kinds), torch.cat(frames), tuple(spans), frame_grid,
                 rope, deepstack)


@dataclass
class _OpenTurn:
    """A question checked and laid out, not yet fed."""

    question: str
    with_video: bool
    prompt_pieces: list
    """Pieces for Session._run: the video tail (if the turn has frames) and the prompt text."""
    closing_ids: list[int]
    context_tokens: int = 0
    """Positions read before the answer's first token, set once the prompt is fed."""


class Session:
    """One stream's cache and dialogue; made by `StreamVLM.session()`. Not thread-safe: one caller at a time."""

    def __init__(self, vlm: StreamVLM, sampling: SamplingConfig, memory: MemoryBudget | None = None,
                 system: str | None = None):
        self._vlm = vlm
        self._adapter = vlm.adapter
        self._parts = vlm.adapter.decoder
        self._sampling = sampling
        self._layout = ChatLayout(vlm.adapter.tokenizer, vlm.adapter.video_token)
        parts = self._parts
        self.cache = KVCache(parts.num_layers, parts.num_kv_heads, parts.head_dim, vlm.adapter.dtype,
                             vlm.adapter.device)
        self.flops = FlopCounter.for_decoder(parts)
        self.turns: list[Turn] = []
        # A system prompt is the dialogue's first message; the template renders it in front of the first turn
        # (without one, the template's own default, if it has one).
        self._history: list[dict] = [system_message(system)] if system is not None else []
        # The rendered system message, fed in front of the first text the session feeds.
        self._preamble = self._layout.render(self._history, add_generation_prompt=False)
        self._next_pos = 0
        self._frames = 0  # input frames taken, including one held for its pair
        self._steps = 0  # frames of tokens fed (FamilyAdapter.frames_per_step input frames each)
        self._last_timestamp: float | None = None
        self._open_video_text: str | None = None  # the current turn's text before its video, once appended
        # The open video (the current user turn's frames): frames of tokens fed, the first one's time, its
        # M-RoPE start, and the text owed after its last frame (written before the next frame or the question).
        self._video_steps = 0
        self._video_t0 = 0.0
        self._video_rope = 0
        self._owed_text = ""
        self._next_rope = 0  # M-RoPE families: the rope position of the next text token
        self._pending: tuple[torch.Tensor, list[float]] | None = None  # preprocessed frames awaiting their pair
        self._video_token_id = vlm.adapter.tokenizer.convert_tokens_to_ids(vlm.adapter.frame_token)
        # The sequence as token ids, frame tokens and video tails written as the video placeholder id:
        # what transformers' processor would build for the same dialogue. 4 bytes a token; not kept under
        # a memory budget, whose point is that nothing grows with the stream.
        self._trace = array("i") if memory is None else None
        self._budget = memory
        self._limit = memory.entries_per_layer(parts.num_layers, self.cache.bytes_per_entry) if memory else None
        self._tokens_seen = 0
        self._evicted = 0
        self._peak_kv_bytes = 0

    # -- feeding ---------------------------------------------------------------------------------

    def _text_ids(self, text: str, first: bool | None = None) -> list[int]:
        # The first piece of a session gets the tokenizer's special tokens (a BOS where the family has one),
        # as transformers' processor does for the whole prompt. first: whether this text opens the session
        # (default: nothing fed yet).
        first = self._next_pos == 0 if first is None else first
        return self._adapter.tokenizer(text, add_special_tokens=first)["input_ids"]

    def _check_room(self, tokens: int, what: str) -> None:
        limit = self._parts.max_positions
        if self._next_pos + tokens > limit:
            raise StreamVLMError(
                f"{what} needs {tokens} more tokens but the session holds {self._next_pos} of the model's "
                f"{limit}-token context; use fewer frames (a lower fps or --max-frames), a shorter question, "
                "or a new session")

    def _embed_text(self, ids: Sequence[int]) -> torch.Tensor:
        return self._parts.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self._adapter.device))

    def _text_piece(self, ids: Sequence[int]) -> Piece:
        return self._embed_text(ids), -1, ids

    def _run(self, pieces: list[Piece | FramePiece], logits: str) -> torch.Tensor | None:
        """Feed pieces as one chunk at the end of the sequence, placing M-RoPE positions the Qwen-VL way: text
        runs on from the largest position so far + 1 (as the original code and transformers' generate do); a
        frame's grid comes from the adapter's vision_rope, given the position after the text before it and
        its video's first position."""
        adapter = self._adapter
        flat: list[Piece] = []
        ropes, stacks = [], []
        cursor = self._next_rope
        for piece in pieces:
            if isinstance(piece, FramePiece):
                flat.append((piece.embeds, piece.frame, None))
                if piece.deepstack is not None:
                    stacks.append(piece.deepstack)
                if adapter.mrope:
                    if piece.index_in_video == 0:
                        self._video_rope = cursor
                    ropes.append(adapter.vision_rope(cursor, self._video_rope, piece.index_in_video,
                                                     piece.elapsed).to(adapter.device))
            else:
                flat.append(piece)
                if adapter.mrope:
                    size = piece[0].shape[0]
                    ropes.append(torch.arange(cursor, cursor + size, device=adapter.device).expand(3, size))
            if adapter.mrope and ropes[-1].numel():
                cursor = max(cursor, int(ropes[-1].max()) + 1)
        chunk = chunk_from_pieces(flat, self._next_pos, adapter.vision.grid,
                                  torch.cat(ropes, dim=1) if adapter.mrope else None,
                                  torch.cat(stacks, dim=1) if stacks else None)
        out = self._vlm.decoder.forward(chunk, self.cache, self.flops, logits=logits)
        if self._trace is not None:
            for emb, _, ids in flat:
                self._trace.extend(ids if ids is not None else [self._video_token_id] * emb.shape[0])
        self._next_pos += len(chunk)
        self._next_rope = cursor
        self._tokens_seen += len(chunk)
        self._peak_kv_bytes = max(self._peak_kv_bytes, self.cache.kv_bytes)
        return out

    # -- memory budget ---------------------------------------------------------------------------

    @torch.inference_mode()
    def _make_room(self, incoming: int) -> None:
        """Under a memory budget, evict so that every layer can take `incoming` more entries and stay
        within it (see streamvlm.memory)."""
        if self._budget is None or max(self.cache.entries_per_layer) + incoming <= self._limit:
            return
        target = int(self._limit * (1 - self._budget.headroom)) - incoming
        # The recent window shrinks when the budget is tight, so prefix + window + incoming still fit.
        window = min(self._budget.recent(self._limit), max(target - self._budget.sink_tokens, 0))
        recent_from = self._next_pos - window
        for layer in range(self.cache.num_layers):
            length = self.cache.length(layer)
            if length <= target:
                continue
            pos, kinds = self.cache.positions(layer), self.cache.kinds(layer)
            middle = (pos >= self._budget.sink_tokens) & (pos < recent_from)
            # Oldest vision entries go first; old dialogue text only when vision alone is not enough.
            order = torch.cat([torch.nonzero(middle & (kinds == VISION)).squeeze(1),
                               torch.nonzero(middle & (kinds != VISION)).squeeze(1)])
            drop = order[: length - max(target, 0)]
            keep = torch.ones(length, dtype=torch.bool, device=pos.device)
            keep[drop] = False
            self.cache.keep(layer, torch.nonzero(keep).squeeze(1))
            self._evicted += drop.numel()
            if self.cache.length(layer) + incoming > self._limit:
                raise StreamVLMError(
                    f"the memory budget of {self._limit} entries per layer cannot hold {incoming} new tokens "
                    f"next to the {self.cache.length(layer)} it must keep (prefix and recent window); raise "
                    "the budget or lower max_new_tokens")
        self._renumber()

    def _renumber(self) -> None:
        """Give the positions still held (at any layer) consecutive numbers, re-rotating cached keys.

        With M-RoPE every entry moves by its scalar shift on all three axes (exact: each rotary frequency
        reads one axis, and all three move alike), and the rope positions of what comes next (text, the open
        video's grid) move by the shift of the newest entries, so the recent past keeps its relative layout.
        """
        held = torch.cat([self.cache.positions(l) for l in range(self.cache.num_layers)]).unique()  # sorted
        if held.numel() and int(held[-1]) == held.numel() - 1:
            return
        inv_freq = self._parts.rotary.inv_freq
        for layer in range(self.cache.num_layers):
            old = self.cache.positions(layer)
            new = torch.searchsorted(held, old)
            self.cache.set_positions(layer, new, shift_rope(self.cache.keys(layer), new - old, inv_freq))
        shift = held.numel() - self._next_pos
        self._next_pos = held.numel()
        self._next_rope += shift
        self._video_rope += shift

    def _frame_times(self, count: int, timestamps: Sequence[float] | None) -> list[float]:
        """Seconds of `count` new input frames: the caller's, or frame i at i / the family's assumed fps."""
        if count == 0:
            raise StreamVLMError("no frames given")
        if timestamps is None:
            return [(self._frames + i) / self._adapter.assumed_fps for i in range(count)]
        times = [float(t) for t in timestamps]
        if len(times) != count:
            raise StreamVLMError(f"got {count} frames but {len(times)} timestamps")
        self._last_timestamp = times[-1]
        return times

    @torch.inference_mode()
    def append_frames(self, frames: FrameInput, timestamps: Sequence[float] | None = None) -> None:
        """Encode frames and push their tokens into the cache. Any chunking gives the same result.

        frames: uint8 (T, H, W, 3) tensor or array, or a list of (H, W, 3); timestamps: T seconds, optional.
        A family that folds frames in pairs (Qwen-VL) holds an odd last frame until its pair arrives; a
        question feeds it first, paired with a copy of itself (as transformers pads an odd frame count).
        """
        frames = as_frame_tensor(frames)
        times = self._frame_times(frames.shape[0], timestamps)
        self._frames += frames.shape[0]
        step = self._adapter.frames_per_step
        held, held_times = self._pending if self._pending is not None else (None, [])
        self._pending = None
        have = len(held_times)
        total = have + frames.shape[0]
        usable = total - total % step

        def pixels(first: int, last: int) -> torch.Tensor:
            """Preprocessed input frames first..last-1 of the held frames followed by the new ones."""
            parts = [held[first:min(last, have)]] if first < have else []
            if last > have:
                parts.append(self._vlm.preprocess(frames[max(first - have, 0):last - have]))
            return torch.cat(parts) if len(parts) > 1 else parts[0]

        if usable < total:
            self._pending = (pixels(usable, total), (held_times + times)[usable:])
        if usable:
            all_times = held_times + times
            self._ingest(usable // step, [all_times[i:i + step] for i in range(0, usable, step)],
                         lambda first, last: self._adapter.encode_frames(pixels(first * step, last * step)),
                         count_vision=True)

    @torch.inference_mode()
    def append_encoded(self, features: torch.Tensor, timestamps: Sequence[float] | None = None) -> None:
        """Push frames that were already encoded (`StreamVLM.encode`): (T, tokens_per_frame, feature_dim),
        one row per frame of tokens (frames_per_step input frames). timestamps: one per input frame
        (T * frames_per_step), or one per row (the time of its first input frame)."""
        tpf, dim = self._adapter.vision.tokens_per_frame, self._adapter.feature_dim
        if features.dim() != 3 or tuple(features.shape[1:]) != (tpf, dim):
            raise StreamVLMError(f"encoded frames must have shape (T, {tpf}, {dim}), got {tuple(features.shape)}")
        features = features.to(self._adapter.device, self._adapter.dtype)
        rows, step = features.shape[0], self._adapter.frames_per_step
        if timestamps is not None and step > 1 and len(timestamps) == rows * step:
            times = self._frame_times(rows * step, timestamps)
            spans = [times[i:i + step] for i in range(0, rows * step, step)]
        elif timestamps is not None:
            spans = [[t] for t in self._frame_times(rows, timestamps)]
        else:
            spans = [[(self._frames + i * step + j) / self._adapter.assumed_fps for j in range(step)]
                     for i in range(rows)]
        self._feed_pending()  # after the checks: a refused call feeds nothing
        self._frames += rows * step
        self._ingest(rows, spans, lambda first, last: features[first:last], count_vision=False)

    @torch.inference_mode()
    def _feed_pending(self) -> None:
        """Feed a frame held for its pair, paired with copies of itself."""
        if self._pending is None:
            return
        held, times = self._pending
        self._pending = None
        span = times + times[-1:] * (self._adapter.frames_per_step - len(times))  # padded as the pixels are
        self._ingest(1, [span], lambda first, last: self._adapter.encode_frames(held), count_vision=True)

    def _ingest(self, count: int, spans: list[list[float]], encode, count_vision: bool) -> None:
        """Feed `count` frames of tokens, frame i made of the input frames at spans[i] (seconds), whose
        features encode(first, last) returns, max_chunk_frames per chunk, with the family's text around
        each frame. A frame of tokens starts at its first input frame (M-RoPE time) and is shown at their
        mean (the stamp Qwen3-VL writes)."""
        adapter = self._adapter
        times = [span[0] for span in spans]
        shown = [sum(span) / len(span) for span in spans]
        tpf, d = adapter.vision.tokens_per_frame, self._parts.hidden_size
        opening = self._layout.before_video(self._history) if self._open_video_text is None else ""
        if self._open_video_text is None:
            self._video_t0 = times[0]
        step = self._vlm.max_chunk_frames
        if self._budget is None:
            self._check_room(count * tpf + adapter.video_tail().shape[0] + 1,
                             f"appending {count} frames ({tpf} tokens each)")
        else:  # chunks of at most a quarter of the budget, so eviction always has room to work
            step = max(1, min(step, (self._limit // 4) // tpf))
        for first in range(0, count, step):
            last = min(first + step, count)
            # The text before each frame: the turn's opening before a video's first frame, else what the
            # previous frame owes; then the family's own text before this frame.
            texts, owed = [], self._owed_text
            for i in range(first, last):
                index = self._video_steps + i - first
                before, after = adapter.frame_text(index, shown[i])
                texts.append((owed if index else self._preamble + opening + adapter.video_intro()) + before)
                owed = after
            text_ids = [self._text_ids(t, first=self._next_pos == 0 and i == 0) if t else []
                        for i, t in enumerate(texts)]
            incoming = (last - first) * tpf + sum(map(len, text_ids))
            if self._budget is not None:
                self._make_room(incoming)
            self._check_room(incoming, f"appending {last - first} frames")
            feats = encode(first, last)  # (t, tpf, feature_dim)
            if count_vision:
                self.flops.vision += (last - first) * adapter.vision.vision_flops_per_frame
            pieces: list[Piece | FramePiece] = []
            for i, ids in zip(range(first, last), text_ids):
                if ids:
                    pieces.append(self._text_piece(ids))
                index = self._video_steps
                stack = feats[i - first, :, d:].unflatten(-1, (-1, d)).transpose(0, 1) if adapter.vision.deepstack else None
                pieces.append(FramePiece(feats[i - first, :, :d], self._steps, index, times[i] - self._video_t0, stack))
                self._owed_text = adapter.frame_text(index, shown[i])[1]
                self._video_steps += 1
                self._steps += 1
            self._run(pieces, logits="none")
            self._preamble = ""
            if self._open_video_text is None:
                self._open_video_text = opening

    # -- asking ----------------------------------------------------------------------------------

    def ask(self, question: str, **sampling) -> str:
        """Answer a question about everything seen so far; the exchange stays in the cache."""
        return "".join(self.ask_stream(question, **sampling))

    def ask_stream(self, question: str, **sampling) -> Iterator[str]:
        """Like `ask`, yielding the answer's text as it is generated.

        Keyword overrides of the session's SamplingConfig: max_new_tokens, temperature, top_k, top_p,
        seed, ignore_stop. Stopping the iteration early still closes the turn in the cache.
        """
        cfg = self._sampling.with_overrides(**sampling)
        room = cfg.max_new_tokens if self._budget is not None else 1  # a budget keeps room for the answer
        return self._answer(self._open_question(question, extra_tokens=room), cfg)

    @torch.inference_mode()
    def score(self, question: str, answer_ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced logits for a given answer: (len(answer_ids) + 1, vocab), row i predicting answer
        token i (the last row predicts what follows the answer). The exchange stays in the cache, as
        after `ask`."""
        answer_ids = [int(i) for i in answer_ids]
        turn = self._open_question(question, extra_tokens=len(answer_ids))
        self._before_question(turn)
        turn.context_tokens = self._next_pos + sum(p[0].shape[0] for p in turn.prompt_pieces)
        logits = self._run(turn.prompt_pieces + [self._text_piece(answer_ids)], logits="all")
        self._close_turn(turn, answer_ids, None, "scored")
        return logits[-(len(answer_ids) + 1):]

    def _open_question(self, question: str, extra_tokens: int) -> _OpenTurn:
        """Check the question and build the pieces of its user turn (nothing of the turn is fed yet; a frame
        held for its pair is fed now, closing the video)."""
        if not isinstance(question, str) or not question.strip():
            raise StreamVLMError("the question is empty; ask something about the video")
        self._feed_pending()
        with_video = self._open_video_text is not None
        turn_text = self._layout.user_turn(self._history, question, with_video)
        if with_video and turn_text.before_video != self._open_video_text:
            raise StreamVLMError("the chat template's text before the video depends on the question; "
                                 "it cannot be streamed")
        closing_ids = self._adapter.tokenizer(self._layout.closing(self._history, question, with_video),
                                              add_special_tokens=False)["input_ids"]
        video_end = self._owed_text + self._adapter.video_outro()
        prompt_ids = self._text_ids(video_end + turn_text.after_video if with_video
                                    else self._preamble + turn_text.before_video + turn_text.after_video)
        pieces = [self._text_piece(prompt_ids)]
        if with_video:
            tail = self._adapter.video_tail()
            pieces.insert(0, (tail, -1, None))
        prompt_len = sum(p[0].shape[0] for p in pieces)
        self._make_room(prompt_len + len(closing_ids) + extra_tokens)
        self._check_room(prompt_len + len(closing_ids) + extra_tokens, f"the question ({len(prompt_ids)} tokens)")
        self._preamble = ""  # in prompt_ids, fed with the question
        return _OpenTurn(question, with_video, pieces, closing_ids)

    @torch.inference_mode()
    def _before_question(self, turn: _OpenTurn) -> None:
        """Let the router drop cached vision entries that matter little for this question."""
        embeds = torch.cat([piece[0] for piece in turn.prompt_pieces])
        start = self._next_rope if self._adapter.mrope else self._next_pos
        rope_ids = torch.arange(start, start + embeds.shape[0], device=embeds.device)[None]
        if self._adapter.mrope:
            rope_ids = rope_ids.expand(3, 1, -1)
        drop = self._vlm.router.question_evictions(self.cache, embeds, rope_ids)
        if drop is None or drop.numel() == 0:
            return
        for layer in range(self.cache.num_layers):
            pos, kinds = self.cache.positions(layer), self.cache.kinds(layer)
            gone = torch.isin(pos, drop) & (kinds == VISION)
            self.cache.keep(layer, torch.nonzero(~gone).squeeze(1))
            self._evicted += int(gone.sum())

    def _answer(self, turn: _OpenTurn, cfg: SamplingConfig) -> Iterator[str]:
        tokenizer = self._adapter.tokenizer
        stop_ids = set() if cfg.ignore_stop else set(self._adapter.stop_token_ids)
        chooser = TokenChooser(cfg, self._adapter.device)
        ids: list[int] = []
        pending: int | None = None  # the last generated token, until it is fed to the model
        stop_reason = "max_new_tokens"
        emitted = ""
        try:
            self._before_question(turn)
            with torch.inference_mode():
                logits = self._run(turn.prompt_pieces, logits="last")
            turn.context_tokens = self._next_pos
            # Room left for answer tokens, keeping the closing text inside the context.
            room = self._parts.max_positions - self._next_pos - len(turn.closing_ids)
            while True:
                token = chooser(logits)
                if token in stop_ids:
                    stop_reason = "stop_token"
                    break
                ids.append(token)
                pending = token
                text = tokenizer.decode(ids, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # hold back a half-decoded multi-byte character
                    yield text[len(emitted):]
                    emitted = text
                if len(ids) >= min(cfg.max_new_tokens, room):
                    stop_reason = "max_new_tokens" if len(ids) >= cfg.max_new_tokens else "context_full"
                    break
                with torch.inference_mode():
                    logits = self._run([self._text_piece([token])], logits="last")
                pending = None
            final = tokenizer.decode(ids, skip_special_tokens=True)
            if final != emitted:
                yield final[len(emitted):]
        except GeneratorExit:
            stop_reason = "cancelled"
            raise
        finally:
            self._close_turn(turn, ids, pending, stop_reason)

    def _close_turn(self, turn: _OpenTurn, ids: list[int], pending: int | None, stop_reason: str) -> None:
        """Feed what closes the assistant turn (a token generated but not yet fed, then the closing text)."""
        with torch.inference_mode():
            rest = ([pending] if pending is not None else []) + turn.closing_ids
            if rest:
                self._run([self._text_piece(rest)], logits="none")
        answer = self._adapter.tokenizer.decode(ids, skip_special_tokens=True)
        self._history += [user_message(turn.question, turn.with_video), assistant_message(answer)]
        self.turns.append(Turn(question=turn.question, answer=answer, answer_ids=tuple(ids),
                               frames_seen=self._frames, stream_time=self._last_timestamp, stop_reason=stop_reason,
                               context_tokens=turn.context_tokens))
        self._open_video_text = None
        self._video_steps = 0
        self._owed_text = ""

    def token_ids(self) -> list[int]:
        """The session's sequence as token ids, with every frame token and video tail written as the video
        placeholder id, i.e. the input_ids transformers' processor builds for the same dialogue."""
        if self._trace is None:
            raise StreamVLMError("a session with a memory budget does not keep its token sequence")
        return self._trace.tolist()

    # -- reporting -------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Figures of the session so far.

        routing: the router's --routing string.
        frames: frames ingested. tokens: positions the cache spans (the length a dense cache has; under a
        memory budget, after renumbering). tokens_seen: tokens fed since the start.
        kv_bytes: exact bytes of cached keys and values. kv_bytes_dense: the same with routing off.
        kv_bytes_peak: the largest kv_bytes so far. evicted_entries: entries dropped by the memory budget or
        by a router's question-time selection.
        kv_bytes_reserved: bytes allocated (spare capacity and metadata included).
        kv_entries_per_layer, tokens_processed_per_layer: lists, one number per decoder layer.
        flops: {vision, llm, llm_dense}, analytic (see streamvlm.flops).
        """
        return {
            "routing": self._vlm.router.spec(),
            "frames": self._frames,
            "tokens": self._next_pos,
            "tokens_seen": self._tokens_seen,
            "turns": len(self.turns),
            "kv_bytes": self.cache.kv_bytes,
            "kv_bytes_dense": self._next_pos * self._parts.num_layers * self.cache.bytes_per_entry,
            "kv_bytes_reserved": self.cache.reserved_bytes,
            "kv_bytes_peak": self._peak_kv_bytes,
            "evicted_entries": self._evicted,
            "memory_budget_entries_per_layer": self._limit,
            "kv_entries_per_layer": self.cache.entries_per_layer,
            "tokens_processed_per_layer": list(self.flops.tokens_processed_per_layer),
            "flops": self.flops.as_dict(),
        }
