"""A session: one KV cache and one timeline, fed frames and asked questions.

Data flow of a session's life:

    append_frames(f0..f3)   [turn opening text][f0 tokens][f1 tokens]...      -> cache
    append_frames(f4)       [f4 tokens]                                       -> cache
    ask("q1")               [video tail][text after video, q1, answer opening] -> logits -> answer tokens
                            (each answer token is fed back one at a time), then [closing text]
    append_frames(f5..)     [next turn opening][f5 tokens]...
    ask("q2")               sees f0..f5, q1 and its answer, and q2

Frames are never re-encoded: asking costs the question and the answer, whatever the stream's age.

Who owns what: the session keeps its timeline (input frames, the frame held for its pair), its cache and
its turns; the layout (text, positions, M-RoPE) is the `SequenceBuilder`'s, eviction the `MemoryPolicy`'s,
choosing tokens the generation module's. The decoder runs what the builder places.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

import torch

from streamvlm.cache import KVCache
from streamvlm.cancel import check_cancelled
from streamvlm.decoder import Decoder
from streamvlm.errors import StreamVLMError
from streamvlm.flops import FlopCounter
from streamvlm.generation import Answer, SamplingConfig, stream_answer
from streamvlm.memory import MemoryBudget, MemoryPolicy
from streamvlm.sequence import Piece, QuestionPlan, SequenceBuilder, TextPiece, padded_span
from streamvlm.types import VISION, Turn
from streamvlm.video.preprocess import FrameInput, as_frame_tensor

FORK_ROOM = 256
"""The most cache entries a fork reserves past its copy at every layer: room for a question (64) and its
answer's max_new_tokens, up to this; a longer answer grows the buffers as any cache's do."""


class Session:
    """One stream's cache and dialogue; made by `StreamVLM.session()`. Not thread-safe: one caller at a time.

    adapter: the family adapter; decoder: the routed decoder; preprocess: uint8 frames -> pixels;
    max_chunk_frames: frames of tokens fed through the decoder at once.
    """

    def __init__(self, adapter, decoder: Decoder, preprocess: Callable[[torch.Tensor], torch.Tensor],
                 max_chunk_frames: int, sampling: SamplingConfig, memory: MemoryBudget | None = None,
                 system: str | None = None):
        self._adapter = adapter
        self._decoder = decoder
        self._preprocess = preprocess
        self._max_chunk_frames = max_chunk_frames
        self._sampling = sampling
        parts = self._parts = adapter.decoder
        self.cache = KVCache(parts.num_layers, parts.num_kv_heads, parts.head_dim, adapter.dtype, adapter.device)
        self.flops = FlopCounter.for_decoder(parts)
        self.turns: list[Turn] = []
        # The token trace (4 bytes a token) is not kept under a memory budget, whose point is that nothing
        # grows with the stream.
        self._seq = SequenceBuilder(adapter, system, trace=memory is None)
        self._memory = (MemoryPolicy(memory, self.cache, parts.max_positions, parts.rotary.inv_freq)
                        if memory is not None else None)
        self._frames = 0  # input frames taken, including one held for its pair
        self._last_timestamp: float | None = None
        self._pending: tuple[torch.Tensor, list[float]] | None = None  # preprocessed frames awaiting their pair
        self._tokens_seen = 0
        self._question_evicted = 0
        self._peak_kv_bytes = 0
        self._said = False  # the open turn has text from say()
        self._ended = False  # its last answer was not fed back (ask_stream(..., last=True))
        self._broken: str | None = None  # a forward stopped part-way: what stopped it

    def fork(self, decoder: Decoder | None = None, **sampling) -> Session:
        """An independent session that goes on from here: the same cache, timeline and turns, copied (the
        model's weights are shared). What either does next leaves the other as it is, and asked the same, the
        fork answers exactly as this session would. The server keeps a session forked after a video's ingest
        and forks it again for each request about the same video (`streamvlm.serve.prefix`).

        decoder: the fork's decoder (another thread's router for the same model and routing; default this
        session's). Keyword arguments override this session's SamplingConfig.
        """
        self._check_open()
        decoder = self._decoder if decoder is None else decoder
        if decoder.parts is not self._parts:
            raise StreamVLMError("a session can only be forked onto a decoder of the same model")
        if decoder.router.spec() != self._decoder.router.spec():
            raise StreamVLMError(f"a session routed by {self._decoder.router.spec()!r} cannot go on under "
                                 f"{decoder.router.spec()!r}: its cache holds what its own routing kept")
        # What is the model's is shared; what is the session's (cache, timeline, turns, counters) is copied.
        shared = (self._adapter, self._adapter.tokenizer, self._decoder, self._preprocess, self._parts,
                  self._seq.layout, self._sampling)
        memo = {id(thing): thing for thing in shared}
        cfg = self._sampling.with_overrides(**sampling)
        with torch.inference_mode():
            memo[id(self.cache)] = self.cache.copy(room=min(FORK_ROOM, 64 + cfg.max_new_tokens))
            twin = copy.deepcopy(self, memo)
        twin._decoder = decoder
        twin._sampling = cfg
        return twin

    # -- feeding ---------------------------------------------------------------------------------

    def _room(self, tokens: int, what: str) -> None:
        """Evict under a budget, then check that `tokens` more positions fit the model's context."""
        if self._memory is not None:
            held = self._memory.make_room(tokens, self._seq.next_pos)
            if held is not None:
                self._seq.renumbered(held)
        limit = self._parts.max_positions
        if self._seq.next_pos + tokens > limit:
            raise StreamVLMError(
                f"{what} needs {tokens} more tokens but the session holds {self._seq.next_pos} of the model's "
                f"{limit}-token context; use fewer frames (a lower fps or --max-frames), a shorter question, "
                "or a new session")

    def _run(self, pieces: list[Piece], logits: str) -> torch.Tensor | None:
        """Place pieces at the end of the sequence and run them through the decoder into the cache. Every
        forward starts here: a thread whose work was cancelled (`streamvlm.cancel`) stops here."""
        check_cancelled()
        try:
            chunk = self._seq.place(pieces)
            out = self._decoder.forward(chunk, self.cache, self.flops, logits=logits)
        except BaseException as e:
            # Stopped part-way (Ctrl-C, an error): some layers may hold the chunk and the others not, which no
            # later forward can tell from routing. Nothing more is fed to that cache.
            self._broken = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise
        self._tokens_seen += len(chunk)
        self._peak_kv_bytes = max(self._peak_kv_bytes, self.cache.kv_bytes)
        return out

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
        self._check_open()
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
                parts.append(self._preprocess(frames[max(first - have, 0):last - have]))
            return torch.cat(parts) if len(parts) > 1 else parts[0]

        if usable < total:
            self._pending = (pixels(usable, total), (held_times + times)[usable:])
        if usable:
            all_times = held_times + times
            self._ingest([all_times[i:i + step] for i in range(0, usable, step)],
                         lambda first, last: self._adapter.encode_frames(pixels(first * step, last * step)),
                         count_vision=True)

    @torch.inference_mode()
    def append_encoded(self, features: torch.Tensor, timestamps: Sequence[float] | None = None) -> None:
        """Push frames that were already encoded (`StreamVLM.encode`): (T, tokens_per_frame, feature_dim),
        one row per frame of tokens (frames_per_step input frames). timestamps: one per input frame
        (T * frames_per_step), or one per row (the time of its first input frame)."""
        self._check_open()
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
        self._ingest(spans, lambda first, last: features[first:last], count_vision=False)

    @torch.inference_mode()
    def _feed_pending(self) -> None:
        """Feed a frame held for its pair, paired with copies of itself."""
        if self._pending is None:
            return
        held, times = self._pending
        self._pending = None
        self._ingest([padded_span(times, self._adapter.frames_per_step)], lambda first, last: self._adapter.encode_frames(held), count_vision=True)

    def _ingest(self, spans: list[list[float]], encode, count_vision: bool) -> None:
        """Feed len(spans) frames of tokens, frame i made of the input frames at spans[i] (seconds), whose
        features encode(first, last) returns, in chunks of at most max_chunk_frames frames."""
        adapter = self._adapter
        count, tpf = len(spans), adapter.vision.tokens_per_frame
        step = self._max_chunk_frames
        if self._memory is None:
            self._room(count * tpf + adapter.video_tail().shape[0] + 1,
                       f"appending {count} frames ({tpf} tokens each)")
        else:  # chunks of at most a quarter of the budget, so eviction always has room to work
            step = max(1, min(step, self._memory.chunk_frames_cap // tpf))
        for first in range(0, count, step):
            last = min(first + step, count)
            plan = self._seq.plan_frames(spans[first:last])
            self._room((last - first) * tpf + plan.text_tokens, f"appending {last - first} frames")
            features = encode(first, last)  # (t, tpf, feature_dim)
            if count_vision:
                self.flops.vision += (last - first) * adapter.vision.vision_flops_per_frame
            self._run(self._seq.frame_pieces(plan, features), logits="none")

    def say(self, text: str) -> None:
        """Text the user writes in the open turn at this point: before its first frame (the template places
        it, as it places text before a video in a message), or between frames, where it is written as is. The
        question that follows ends the turn; it may then be empty."""
        self._check_open()
        if not isinstance(text, str):
            raise StreamVLMError(f"say() takes text, got {type(text).__name__}")
        if not text:
            return
        self._feed_pending()  # a frame held for its pair goes before the text
        self._seq.say(text)
        self._said = True

    # -- asking ----------------------------------------------------------------------------------

    def ask(self, question: str, **sampling) -> str:
        """Answer a question about everything seen so far; the exchange stays in the cache (last=True: see
        `ask_stream`)."""
        return "".join(self.ask_stream(question, **sampling))

    def ask_stream(self, question: str, *, last: bool = False, **sampling) -> Iterator[str]:
        """Like `ask`, yielding the answer's text as it is generated.

        Keyword overrides of the session's SamplingConfig: max_new_tokens, temperature, top_k, top_p,
        seed, ignore_stop. Stopping the iteration early still closes the turn in the cache.

        last=True: the session's last question (a one-shot `generate`, a server request's fork, thrown away
        after the answer). The turn is recorded but its end (the answer's last token and the closing text) is
        not fed into the cache, which saves a forward (a third of a one-word answer's); the session then
        refuses anything more.
        """
        cfg = self._sampling.with_overrides(**sampling)
        room = cfg.max_new_tokens if self._memory is not None else 1  # a budget keeps room for the answer
        return self._answer(self._open_question(question, extra_tokens=room), cfg, last)

    @torch.inference_mode()
    def score(self, question: str, answer_ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced logits for a given answer: (len(answer_ids) + 1, vocab), row i predicting answer
        token i (the last row predicts what follows the answer). The exchange stays in the cache, as
        after `ask`."""
        answer_ids = [int(i) for i in answer_ids]
        plan = self._open_question(question, extra_tokens=len(answer_ids))
        self._before_question(plan)
        context = self._seq.next_pos + self._seq.tokens(plan.pieces)
        logits = self._run(list(plan.pieces) + [TextPiece(tuple(answer_ids))], logits="all")
        self._close_turn(plan, Answer(answer_ids, stop_reason="scored"), context)
        return logits[-(len(answer_ids) + 1):]

    def _open_question(self, question: str, extra_tokens: int) -> QuestionPlan:
        """Check the question and lay out its user turn (nothing of the turn is fed yet; a frame held for its
        pair is fed now, closing the video)."""
        self._check_open()
        if not isinstance(question, str) or not (question.strip() or self._said):
            raise StreamVLMError("the question is empty; ask something about the video")
        self._feed_pending()
        plan = self._seq.question(question)
        prompt = self._seq.tokens(plan.pieces)
        self._room(prompt + len(plan.closing_ids) + extra_tokens, f"the question ({prompt} tokens)")
        self._seq.commit(plan)
        return plan

    @torch.inference_mode()
    def _before_question(self, plan: QuestionPlan) -> None:
        """Let the router drop cached vision entries that matter little for this question."""
        chunk = self._seq.preview(plan.pieces)  # the prompt's embeddings and positions, not yet placed
        drop = self._decoder.router.question_evictions(self.cache, chunk.embeds, chunk.rope_ids())
        if drop is None or drop.numel() == 0:
            return
        for layer in range(self.cache.num_layers):
            pos, kinds = self.cache.positions(layer), self.cache.kinds(layer)
            gone = torch.isin(pos, drop) & (kinds == VISION)
            self.cache.keep(layer, torch.nonzero(~gone).squeeze(1))
            self._question_evicted += int(gone.sum())

    def _answer(self, plan: QuestionPlan, cfg: SamplingConfig, last: bool = False) -> Iterator[str]:
        answer = Answer([])
        context = 0
        try:
            self._before_question(plan)
            with torch.inference_mode():
                logits = self._run(list(plan.pieces), logits="last")
            context = self._seq.next_pos
            # Room left for answer tokens, keeping the closing text inside the context.
            room = self._parts.max_positions - self._seq.next_pos - len(plan.closing_ids)

            @torch.inference_mode()
            def step(token: int) -> torch.Tensor:
                return self._run([TextPiece((token,))], logits="last")

            stop_ids = set() if cfg.ignore_stop else set(self._adapter.stop_token_ids)
            yield from stream_answer(answer, logits, step, cfg, self._adapter.tokenizer, stop_ids, room,
                                     self._adapter.device)
        finally:
            self._close_turn(plan, answer, context, feed=not last)

    @torch.inference_mode()
    def _close_turn(self, plan: QuestionPlan, answer: Answer, context: int, feed: bool = True) -> None:
        """Feed what closes the assistant turn (a token generated but not yet fed, then the closing text) and
        record the turn; feed=False records it only, and ends the session."""
        rest = ((answer.pending,) if answer.pending is not None else ()) + plan.closing_ids
        broken = self._broken is not None  # one of the answer's forwards stopped part-way: nothing more is fed
        if rest and feed and not broken:
            self._run([TextPiece(rest)], logits="none")
        if not feed:
            self._ended = True
        if not feed or broken:
            self._decoder.finished()  # a batched decoder's next step waits for no chunk of ours
        text = self._adapter.tokenizer.decode(answer.ids, skip_special_tokens=True)
        self._seq.close_turn(plan, text)
        self._said = False
        self.turns.append(Turn(question=plan.question, answer=text, answer_ids=tuple(answer.ids),
                               frames_seen=self._frames, stream_time=self._last_timestamp,
                               stop_reason=answer.stop_reason, context_tokens=context))

    def _check_open(self) -> None:
        if self._broken is not None:
            raise StreamVLMError(f"a forward of this session stopped part-way ({self._broken}), so its cache holds "
                                 "part of a chunk; it takes nothing more: start a new session, or fork one kept "
                                 "from before")
        if self._ended:
            raise StreamVLMError("this session asked its last question (last=True) and takes nothing more; "
                                 "fork it before that question to go on from there")

    def token_ids(self) -> list[int]:
        """The session's sequence as token ids, with every frame token and video tail written as the video
        placeholder id, i.e. the input_ids transformers' processor builds for the same dialogue."""
        return self._seq.token_ids()

    # -- reporting -------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes the session holds of its own (the weights are the model's): its cache's buffers and a frame
        held for its pair."""
        held = self._pending[0] if self._pending is not None else None
        return self.cache.reserved_bytes + (held.numel() * held.element_size() if held is not None else 0)

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
        tokens = self._seq.next_pos
        return {
            "routing": self._decoder.router.spec(),
            "frames": self._frames,
            "tokens": tokens,
            "tokens_seen": self._tokens_seen,
            "turns": len(self.turns),
            "kv_bytes": self.cache.kv_bytes,
            "kv_bytes_dense": tokens * self._parts.num_layers * self.cache.bytes_per_entry,
            "kv_bytes_reserved": self.cache.reserved_bytes,
            "kv_bytes_peak": self._peak_kv_bytes,
            "evicted_entries": self._question_evicted + (self._memory.evicted if self._memory else 0),
            "memory_budget_entries_per_layer": self._memory.limit if self._memory else None,
            "kv_entries_per_layer": self.cache.entries_per_layer,
            "tokens_processed_per_layer": list(self.flops.tokens_processed_per_layer),
            "flops": self.flops.as_dict(),
        }
